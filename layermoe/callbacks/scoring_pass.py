"""Run a scorer on the live model without disturbing training.

Why each guard: validation hooks run under ``torch.inference_mode`` (no autograd), so scoring re-enables
gradients explicitly; scoring may run in the middle of gradient accumulation, so every ``.grad`` is put
aside and restored; dropout would make scores noisy, so modules are put in eval mode and each module's
own ``training`` flag is restored afterwards (:func:`eval_mode`, the one mode guard).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from layermoe.scoring import default_per_sample_loss

#: ``loss(pl_module, batch) -> (B,)`` per-sample losses: the form ``capture_statistics`` calls.
PerSampleLoss = Callable[[nn.Module, Any], torch.Tensor]


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode; each one's own ``training`` flag restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in modes:
            m.training = flag


@contextmanager
def scoring_context(module: nn.Module) -> Iterator[None]:
    """Autograd on (even inside inference mode), modules in eval mode, ``.grad`` and modes restored."""
    grads = [(p, p.grad) for p in module.parameters()]
    for p, _ in grads:
        p.grad = None
    try:
        with torch.inference_mode(False), torch.enable_grad(), eval_mode(module):
            yield
    finally:
        for p, g in grads:
            p.grad = g


def scored_model(pl_module: nn.Module) -> nn.Module:
    """The model a ``loss_fn(model, batch)`` or built-in loss receives: ``pl_module.model`` when it is a
    module, else the outermost Hugging Face model inside ``pl_module``, else ``pl_module`` itself."""
    model = getattr(pl_module, "model", None)
    if isinstance(model, nn.Module):
        return model
    return next((m for m in pl_module.modules() if isinstance(m, PreTrainedModel)), pl_module)


def resolve_per_sample_loss(
    pl_module: nn.Module, loss_fn: Callable[..., torch.Tensor] | None
) -> PerSampleLoss:
    """``pl_module.per_sample_loss(batch)`` if defined, else ``loss_fn(model, batch)``, else the built-in
    loss of the model's head (:func:`layermoe.scoring.default_per_sample_loss`), as one
    ``loss(pl_module, batch)`` function; ``model`` is :func:`scored_model`'s.

    Raises:
        TypeError: no loss was given and the model's head has no built-in loss.
    """
    if callable(getattr(pl_module, "per_sample_loss", None)):
        return lambda module, batch: module.per_sample_loss(batch)
    model_loss = loss_fn if loss_fn is not None else default_per_sample_loss(scored_model(pl_module))
    return lambda module, batch: model_loss(scored_model(module), batch)


@torch.no_grad()
def mean_loss(module: nn.Module, per_sample: PerSampleLoss, batches: Sequence[Any]) -> float:
    """Mean per-sample loss over ``batches`` in eval mode (the "rewire disturbance" probe)."""
    with eval_mode(module):
        total, count = 0.0, 0
        for batch in batches:
            losses = per_sample(module, batch).detach().double()
            total += float(losses.sum())
            count += losses.numel()
    return total / max(count, 1)
