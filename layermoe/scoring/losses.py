"""Per-sample losses: what scoring differentiates, one scalar per sample so gradients stay per sample.

The built-in losses read Hugging Face dict batches (``input_ids``, ``attention_mask``, ``labels``, ...);
:func:`default_per_sample_loss` picks the one that matches the model's head, so a masked LM or a
sequence classifier is never scored with the causal next-token objective. Any other model, or any
other batch structure, needs the user's own ``per_sample_loss(batch)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PerSampleLossFn = Callable[[nn.Module, Any], torch.Tensor]


class UnsupportedBatchError(TypeError):
    """A built-in loss got a batch it cannot read (not a dict, or fields missing); the message has the fix."""


def _require_dict(batch: Any, loss: str, fields: tuple[str, ...]) -> None:
    if not isinstance(batch, Mapping):
        raise UnsupportedBatchError(
            f"the built-in {loss} loss needs dict batches ({', '.join(fields)}), but the loader yields "
            f"{type(batch).__name__}; define per_sample_loss(batch) -> Tensor[B] on the LightningModule "
            "(or pass LayerInfluenceCallback(loss_fn=...)) to score with your own loss"
        )
    missing = [f for f in fields if f not in batch]
    if missing:
        raise UnsupportedBatchError(
            f"the built-in {loss} loss needs the batch fields {list(fields)}, but {missing} are missing "
            f"(the batch has {sorted(map(str, batch))}); add them in the collate function, or define "
            "per_sample_loss(batch) -> Tensor[B] on the LightningModule"
        )


def _model_inputs(model: nn.Module, batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch fields that ``model.forward`` takes by name, ``labels`` excluded (the loss is ours)."""
    params = inspect.signature(model.forward).parameters
    return {k: v for k, v in batch.items() if k in params and k != "labels" and v is not None}


def causal_lm_per_sample_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over each sample's supervised tokens, shape (B,).

    Labels follow Hugging Face's convention (-100 = ignored, the model's logits at t predict label
    t+1), so padded tokens and prompt tokens never count; a sample without supervised tokens has loss 0
    and therefore a zero gradient. Works for plain causal LM and classification as next-token
    prediction (one supervised token).
    """
    _require_dict(batch, "causal-LM", ("input_ids", "labels"))
    kwargs = {"input_ids": batch["input_ids"], "use_cache": False}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    return per_sample_loss_from_logits(model(**kwargs).logits, batch["labels"])


def per_sample_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean next-token cross-entropy over each sample's supervised tokens (HF shift, -100 ignored).

    Callers that need the logits anyway (the LightningModule's metrics) use this directly; a sample with
    no supervised token gets 0.
    """
    return _token_mean_cross_entropy(logits[:, :-1, :], labels.to(logits.device)[:, 1:])


def _token_mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    token_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(labels.shape)
    mask = (labels != -100).to(token_loss.dtype)
    return (token_loss * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def masked_lm_per_sample_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(B,) mean cross-entropy over each sample's masked positions (labels -100 elsewhere, no shift)."""
    _require_dict(batch, "masked-LM", ("input_ids", "labels"))
    logits = model(**_model_inputs(model, batch)).logits
    return _token_mean_cross_entropy(logits, batch["labels"].to(logits.device))


def sequence_classification_per_sample_loss(
    model: nn.Module, batch: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """(B,) loss of a ``*ForSequenceClassification`` head per sample, by Hugging Face's own rule.

    ``config.problem_type`` (or, when unset, one label -> regression, integer labels -> single-label,
    else multi-label) selects squared error, cross-entropy or binary cross-entropy (mean over labels),
    so the mean over the batch equals the model's own ``loss``.
    """
    _require_dict(batch, "sequence-classification", ("labels",))
    logits = model(**_model_inputs(model, batch)).logits
    labels = batch["labels"].to(logits.device)
    num_labels = logits.shape[-1]
    problem = getattr(getattr(model, "config", None), "problem_type", None)
    if problem is None:
        if num_labels == 1:
            problem = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    compute = torch.promote_types(logits.dtype, torch.float32)
    if problem == "regression":
        diff = logits.to(compute).reshape(labels.shape[0], -1) - labels.to(compute).reshape(
            labels.shape[0], -1
        )
        return diff.pow(2).mean(dim=1)
    if problem == "single_label_classification":
        return F.cross_entropy(logits.to(compute).view(-1, num_labels), labels.view(-1), reduction="none")
    loss = F.binary_cross_entropy_with_logits(logits.to(compute), labels.to(compute), reduction="none")
    return loss.reshape(labels.shape[0], -1).mean(dim=1)


_KINDS: dict[str, tuple[str, PerSampleLossFn]] = {
    "causal": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", causal_lm_per_sample_loss),
    "masked": ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", masked_lm_per_sample_loss),
    "sequence_classification": (
        "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
        sequence_classification_per_sample_loss,
    ),
}


def _head_kinds(model: nn.Module) -> list[str]:
    """Which of transformers' auto-class families (causal LM, masked LM, sequence classification) the
    model's class belongs to, by the class names transformers itself registers."""
    from transformers.models.auto import modeling_auto

    name = type(model).__name__
    kinds = []
    for kind, (mapping, _) in _KINDS.items():
        names = set()
        for value in getattr(modeling_auto, mapping).values():
            names.update([value] if isinstance(value, str) else value)
        if name in names:
            kinds.append(kind)
    return kinds


def default_per_sample_loss(model: nn.Module) -> PerSampleLossFn:
    """The built-in per-sample loss for the model's head: causal LM, masked LM or sequence classification.

    Raises:
        TypeError: the model is none of these (or ambiguous); the message asks for ``per_sample_loss``.
    """
    kinds = _head_kinds(model)
    if len(kinds) == 1:
        return _KINDS[kinds[0]][1]
    what = "several heads" if kinds else "no causal-LM, masked-LM or sequence-classification head"
    raise TypeError(
        f"{type(model).__name__} has {what} that layermoe knows a loss for, so it cannot choose a scoring "
        "loss; define per_sample_loss(batch) -> Tensor[B] (one loss per sample, reduced over tokens only) "
        "on the LightningModule, or pass LayerInfluenceCallback(loss_fn=lambda model, batch: ...)"
    )
