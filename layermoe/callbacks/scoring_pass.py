"""Run a scorer on the live model without disturbing training.

Why each guard: validation hooks run under ``torch.inference_mode`` (no autograd), so scoring re-enables
gradients explicitly; scoring may run in the middle of gradient accumulation, so every ``.grad`` is put
aside and restored; dropout would make scores noisy, so modules are put in eval mode and each module's
own ``training`` flag is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

PerSampleLoss = Callable[[Any], torch.Tensor]


@contextmanager
def scoring_context(module: nn.Module, train: bool = False) -> Iterator[None]:
    """Autograd on (even inside inference mode), modules in eval mode, ``.grad`` and modes restored."""
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.grad) for p in module.parameters()]
    for p, _ in grads:
        p.grad = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            module.train(train)
            yield
    finally:
        for m, flag in modes:
            m.training = flag
        for p, g in grads:
            p.grad = g


def scored_model(pl_module: nn.Module) -> nn.Module:
    """The model a ``loss_fn(model, batch)`` or built-in loss receives: ``pl_module.model`` when it is a
    module, else the outermost Hugging Face model inside ``pl_module``, else ``pl_module`` itself."""
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module):
        return model
    from transformers import PreTrainedModel

    for module in pl_module.modules():
        if isinstance(module, PreTrainedModel):
            return module
    return pl_module


def resolve_per_sample_loss(
    pl_module: nn.Module, loss_fn: Callable[..., torch.Tensor] | None
) -> PerSampleLoss:
    """``pl_module.per_sample_loss`` if defined, else ``loss_fn(model, batch)``, else the built-in loss of
    the model's head (:func:`layermoe.scoring.default_per_sample_loss`; ``model`` from :func:`scored_model`).

    Raises:
        TypeError: no loss was given and the model's head has no built-in loss.
    """
    own = getattr(pl_module, "per_sample_loss", None)
    if callable(own):
        return own
    model = scored_model(pl_module)
    if loss_fn is not None:
        return lambda batch: loss_fn(model, batch)
    from layermoe.scoring import default_per_sample_loss

    builtin = default_per_sample_loss(model)
    return lambda batch: builtin(model, batch)


@torch.no_grad()
def mean_loss(module: nn.Module, per_sample: PerSampleLoss, batches: Sequence[Any]) -> float:
    """Mean per-sample loss over ``batches`` in eval mode (the "rewire disturbance" probe)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        total, count = 0.0, 0
        for batch in batches:
            losses = per_sample(batch).detach().double()
            total += float(losses.sum())
            count += losses.numel()
    finally:
        for m, flag in modes:
            m.training = flag
    return total / max(count, 1)
