"""Baseline scorers: gradient norm (data-driven) and uniform (data-free)."""

from __future__ import annotations

from torch import nn

from ..modules import scored_layers
from ..statistics import BlockStatistics, finite_float
from .base import Scorer, register_scorer


@register_scorer("grad_norm")
class GradNormScorer(Scorer):
    """||gbar_l||^2, the squared norm of the block's mean validation-loss gradient.

    Raw quantity and score coincide: a block whose parameters the validation loss still pulls on
    hardest gets the most capacity.
    """

    def score(self, stats: dict[int, BlockStatistics]) -> dict[int, float]:
        out: dict[int, float] = {}
        for block in sorted(stats):
            stats[block].check_finite(block)
            out[block] = finite_float(stats[block].val_mean_grad_sq, block, "grad_norm score")
        return out


@register_scorer("uniform")
class UniformScorer(Scorer):
    """1.0 for every adapted block: the allocator then spreads the budget evenly (the control arm)."""

    needs_statistics = False

    def score(self, model: nn.Module) -> dict[int, float]:  # type: ignore[override]
        return {block: 1.0 for block in scored_layers(model)}
