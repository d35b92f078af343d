"""Classification helpers of the LightningModule; the per-sample loss itself is
``layermoe.scoring.per_sample_loss_from_logits`` (one definition shared with scoring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layermoe.scoring.losses import per_sample_loss_from_logits

__all__ = ["candidate_logits", "label_loss", "label_positions", "per_sample_loss_from_logits"]


def label_positions(labels: torch.Tensor) -> torch.Tensor:
    """(B,) position of each row's label token; classification batches supervise exactly one per row."""
    supervised = labels != -100
    counts = supervised.sum(dim=1)
    if not bool((counts == 1).all()):
        raise ValueError(
            "classification batches must supervise exactly one label token per row; got counts "
            f"{counts.tolist()} (is the data module's task 'causal_lm'?)"
        )
    position = supervised.int().argmax(dim=1)
    if bool((position == 0).any()):
        raise ValueError("a label token at position 0 has no preceding token to predict it")
    return position


def candidate_logits(logits: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, C) logits of the candidate label tokens at the position that predicts each sample's label.

    ``logits`` is (B, T, V) over the whole sequence; the logits one step before the label predict it.
    """
    position = label_positions(labels).to(logits.device)
    rows = torch.arange(logits.shape[0], device=logits.device)
    at_label = logits[rows, position - 1]  # (B, V)
    return at_label.gather(1, candidates.to(logits.device))


def label_loss(label_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) cross-entropy of each row's label token from ``label_logits`` (B, V), the logits at the
    position that predicts it: ``per_sample_loss_from_logits`` for a single supervised token, without
    projecting every other position onto the vocabulary."""
    position = label_positions(labels)
    rows = torch.arange(labels.shape[0], device=labels.device)
    targets = labels[rows, position].to(label_logits.device)
    return F.cross_entropy(
        label_logits.to(torch.promote_types(label_logits.dtype, torch.float32)), targets, reduction="none"
    )
