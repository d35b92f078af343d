"""Learning-rate schedules as a multiplier of the base LR per optimizer step (warmup, then decay)."""

from __future__ import annotations

import math
from collections.abc import Callable

SCHEDULES = ("cosine", "linear", "constant")


def lr_multiplier(
    kind: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> Callable[[int], float]:
    """f(step) for ``LambdaLR``: linear warmup to 1 over ``warmup_steps`` (never 0 at step 0), then
    cosine or linear decay to ``min_lr_ratio`` at ``total_steps``, or constant."""
    if kind not in SCHEDULES:
        raise ValueError(f"scheduler must be one of {SCHEDULES}, got {kind!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    decay_steps = max(1, total_steps - warmup_steps)

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
        return min_lr_ratio + (1.0 - min_lr_ratio) * shape

    return multiplier
