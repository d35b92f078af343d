"""Per-sample loss from logits (the same definition as ``layermoe.scoring.causal_lm_per_sample_loss``).

The LightningModule needs the logits for its metrics too, so it computes the loss from one forward's
logits instead of calling the scoring function (which runs its own forward and returns only the loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def per_sample_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token cross-entropy over each sample's supervised tokens (HF shift, -100 ignored).

    A sample with no supervised token gets 0.
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:].to(logits.device)
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != -100).to(token_loss.dtype)
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


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
