"""Classification helpers of the LightningModule; the per-sample loss itself is
``layermoe.scoring.per_sample_loss_from_logits`` (one definition shared with scoring)."""

from __future__ import annotations

import torch

from layermoe.scoring.losses import per_sample_loss_from_logits

__all__ = ["candidate_logits", "per_sample_loss_from_logits"]


def candidate_logits(logits: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, C) logits of the candidate label tokens at the position that predicts each sample's label.

    Classification batches supervise exactly one token per row; the logits one step before it predict it.
    """
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
    rows = torch.arange(logits.shape[0], device=logits.device)
    at_label = logits[rows, position - 1]  # (B, V)
    return at_label.gather(1, candidates.to(logits.device))
