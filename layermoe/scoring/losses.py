"""Per-sample losses: what scoring differentiates, one scalar per sample so gradients stay per sample."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


def causal_lm_per_sample_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over each sample's supervised tokens, shape (B,).

    Labels follow Hugging Face's convention (-100 = ignored, the model's logits at t predict label
    t+1), so padded tokens and prompt tokens never count; a sample without supervised tokens has loss 0
    and therefore a zero gradient. Works for plain causal LM and classification as next-token
    prediction (one supervised token).
    """
    for field in ("input_ids", "labels"):
        if field not in batch:
            raise KeyError(
                f"batch is missing {field!r}; a scoring batch needs input_ids, attention_mask, labels"
            )
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    return per_sample_loss_from_logits(model(**kwargs).logits, batch["labels"])


def per_sample_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token cross-entropy over each sample's supervised tokens (HF shift, -100 ignored).

    Callers that need the logits anyway (the LightningModule's metrics) use this directly; a sample with
    no supervised token gets 0.
    """
    labels = labels.to(logits.device)
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != -100).to(token_loss.dtype)
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
