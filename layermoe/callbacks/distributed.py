"""Strategy support: which strategies can rewire, identical plans on every rank, the DDP re-wrap.

Why these rules: a DDP wrapper's reducer knows only the parameters it was built with (a resize must
rebuild it on every rank at the same step), and sharded strategies (FSDP, DeepSpeed, model-parallel)
restore checkpoints after sharding, so a layout cannot be rebuilt before the weights load.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from layermoe.callbacks.errors import CallbackConfigError


def check_strategy(strategy: Any) -> None:
    """Accept single-device and DDP strategies; reject the rest with the reason and the fix."""
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        return
    name = type(strategy).__name__
    raise CallbackConfigError(
        f"LayerInfluenceCallback does not support the {name} strategy: sharded and model-parallel strategies "
        "(FSDP, DeepSpeed, ModelParallel) restore checkpoints after sharding, so a rewired layout cannot be "
        'rebuilt before the weights load. Use Trainer(strategy="auto"/"ddp"/"ddp_spawn") or remove the callback.'
    )


def is_ddp(strategy: Any) -> bool:
    return isinstance(strategy, DDPStrategy)


def mean_scores(strategy: Any, scores: dict[int, float], device: torch.device) -> dict[int, float]:
    """Average per-block scores across ranks (every rank scores its own samples)."""
    if strategy.world_size <= 1:
        return scores
    blocks = sorted(scores)
    values = torch.tensor([scores[b] for b in blocks], dtype=torch.float64, device=device)
    reduced = strategy.reduce(values, reduce_op="mean")
    return {b: float(v) for b, v in zip(blocks, reduced.tolist(), strict=True)}


def broadcast(strategy: Any, obj: Any) -> Any:
    """Rank 0's object on every rank (plans and decisions must be identical everywhere)."""
    if strategy.world_size <= 1:
        return obj
    return strategy.broadcast(obj, src=0)


def any_rank(strategy: Any, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (so failures are handled in lock-step)."""
    if strategy.world_size <= 1:
        return flag
    return bool(strategy.reduce_boolean_decision(flag, all=False))


def rewrap(strategy: Any, lightning_module: Any) -> None:
    """Rebuild the DDP wrapper around the resized module (the constructor syncs from rank 0)."""
    if is_ddp(strategy):
        strategy.model = lightning_module
        strategy.configure_ddp()
