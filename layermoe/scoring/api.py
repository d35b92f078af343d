"""One call from a scorer name (or instance) to per-block scores, for callers that do not care whether
the scorer reads gradient statistics or only the model."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .capture import Batch, LossFn, capture_statistics
from .losses import causal_lm_per_sample_loss
from .scorers import Scorer, get_scorer


def score_blocks(
    model: nn.Module,
    scorer: str | Scorer,
    train_batches: Iterable[Batch] | None = None,
    val_batches: Iterable[Batch] | None = None,
    loss_fn: LossFn = causal_lm_per_sample_loss,
    **capture_kwargs: Any,
) -> dict[int, float]:
    """Scores {block: float} (higher = more capacity); captures statistics only if the scorer needs them.

    capture_kwargs go to capture_statistics (scope, modules, chunk_size, projection_dim, reduce_fn, ...).
    """
    instance = get_scorer(scorer) if isinstance(scorer, str) else scorer
    if not instance.needs_statistics:
        return instance.score(model)  # type: ignore[arg-type]
    if train_batches is None or val_batches is None:
        raise ValueError(f"scorer {instance.name!r} needs train_batches and val_batches")
    stats = capture_statistics(model, train_batches, val_batches, loss_fn, **capture_kwargs)
    return instance.score(stats)
