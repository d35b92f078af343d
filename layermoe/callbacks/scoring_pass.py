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
def scoring_context(module: nn.Module) -> Iterator[None]:
    """Autograd on (even inside inference mode), modules in eval mode, ``.grad`` and modes restored."""
    modes = [(m, m.training) for m in module.modules()]
    grads = [(p, p.grad) for p in module.parameters()]
    for p, _ in grads:
        p.grad = None
    try:
        with torch.inference_mode(False), torch.enable_grad():
            module.eval()
            yield
    finally:
        for m, flag in modes:
            m.training = flag
        for p, g in grads:
            p.grad = g


def resolve_per_sample_loss(
    pl_module: nn.Module, loss_fn: Callable[..., torch.Tensor] | None
) -> PerSampleLoss:
    """``pl_module.per_sample_loss`` if defined, else ``loss_fn(model, batch)``, else the causal-LM loss.

    ``model`` is ``pl_module.model`` when the module has one, else the module itself.
    """
    own = getattr(pl_module, "per_sample_loss", None)
    if callable(own):
        return own
    model = getattr(pl_module, "model", None)
    model = model if isinstance(model, nn.Module) else pl_module
    if loss_fn is not None:
        return lambda batch: loss_fn(model, batch)
    from layermoe.scoring import causal_lm_per_sample_loss

    return lambda batch: causal_lm_per_sample_loss(model, batch)


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
