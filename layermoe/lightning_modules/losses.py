"""Classification, exact-match, option-scoring and loss-aggregation helpers of the LightningModule; the
per-sample loss itself is ``layermoe.scoring.per_sample_loss_from_logits`` (one definition shared with
scoring)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layermoe.scoring.losses import per_sample_loss_from_logits

LOSS_AGGREGATIONS = ("token_mean", "sample_mean")

__all__ = [
    "LOSS_AGGREGATIONS",
    "aggregate_losses",
    "candidate_logits",
    "greedy_exact_match",
    "label_loss",
    "label_positions",
    "per_sample_loss_from_logits",
    "supervised_log_likelihood",
    "supervised_token_counts",
]


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


def supervised_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """(B,) number of supervised (predicted) tokens per row: labels after the shift that are not -100."""
    return (labels[:, 1:] != -100).sum(dim=1)


def aggregate_losses(per_sample: torch.Tensor, labels: torch.Tensor, how: str) -> torch.Tensor:
    """One training loss from (B,) per-sample mean losses.

    ``token_mean``: every supervised token weighs the same (sum of token losses over the number of
    supervised tokens in the batch), as Hugging Face, peft and TRL reduce it; a long response counts more
    than a short one. ``sample_mean``: every row weighs the same. With one supervised token per row
    (classification) the two are identical.
    """
    if how == "sample_mean":
        return per_sample.mean()
    if how != "token_mean":
        raise ValueError(f"loss_aggregation must be one of {list(LOSS_AGGREGATIONS)}, got {how!r}")
    counts = supervised_token_counts(labels).to(device=per_sample.device, dtype=per_sample.dtype)
    return (per_sample * counts).sum() / counts.sum().clamp_min(1.0)


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


def supervised_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, mean: bool = False) -> torch.Tensor:
    """(B,) log-likelihood of each row's supervised tokens: their sum, or (``mean``) their mean per token.

    It is minus ``per_sample_loss_from_logits`` (the mean cross-entropy), times the token count for the sum.
    """
    mean_log_likelihood = -per_sample_loss_from_logits(logits, labels)
    if mean:
        return mean_log_likelihood
    count = supervised_token_counts(labels).to(mean_log_likelihood.device)
    return mean_log_likelihood * count


def greedy_exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: every supervised token is the argmax of the logits that predict it.

    That is exactly "greedy decoding from the prompt reproduces the reference response, end marker
    included": greedy decoding follows the reference for as long as each next token is the argmax given
    the reference prefix, which is what the teacher-forced logits give. (For chats, every assistant turn
    given the conversation before it.) Rows without a supervised token count as no match.
    """
    labels = labels.to(logits.device)
    targets = labels[:, 1:]
    supervised = targets != -100
    hits = (logits[:, :-1].argmax(dim=-1) == targets) | ~supervised
    return hits.all(dim=1) & supervised.any(dim=1)
