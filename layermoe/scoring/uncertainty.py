"""Standard errors of per-block scores by a delete-a-group jackknife over the scored samples.

The scores are functions of the training samples and of the validation samples, two independent
samples, so the variance is the sum of a jackknife over each (Arvesen's two-sample jackknife): the
training samples are split into G groups (sample i in group i mod G), each group left out in turn and
the block re-scored from the statistics of the rest (`BlockStatistics.subset`: the Grams restricted to
the kept rows, exactly what capturing only those samples gives); the same for the validation samples.
SE^2 = sum over the two sides of (G - 1) / G * sum_g (score_(g) - mean_g score_(g))^2. No forward or
backward pass is repeated: each replicate is Gram algebra on at most n x n matrices.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .statistics import BlockStatistics

ScoreFn = Callable[[dict[int, BlockStatistics]], dict[int, float]]
DEFAULT_GROUPS = 10


def _groups(count: int, groups: int) -> list[torch.Tensor]:
    """Indices kept by each replicate: sample i is left out by replicate i mod G."""
    g = min(groups, count)
    everything = torch.arange(count)
    return [everything[everything % g != k] for k in range(g)] if g >= 2 else []


def jackknife_errors(
    score_fn: ScoreFn, stats: dict[int, BlockStatistics], groups: int = DEFAULT_GROUPS
) -> dict[int, float]:
    """Per-block standard error of `score_fn(stats)` (a delete-a-group jackknife with `groups` groups
    per side; `groups` >= n gives the classic leave-one-out jackknife). A side with one sample adds 0."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 2:
        raise ValueError(f"groups must be an int >= 2, got {groups!r}")
    variance = dict.fromkeys(stats, 0.0)
    for side in ("train", "val"):
        # every block scored the same samples, so the replicates are shared by all blocks
        first = next(iter(stats.values()))
        count = first.n if side == "train" else first.m
        kept_sets = _groups(count, groups)
        if not kept_sets:
            continue
        replicates: dict[int, list[float]] = {b: [] for b in stats}
        for kept in kept_sets:
            subsets = {}
            for block, block_stats in stats.items():
                train = kept if side == "train" else torch.arange(block_stats.n)
                val = kept if side == "val" else torch.arange(block_stats.m)
                subsets[block] = block_stats.subset(train, val)
            for block, value in score_fn(subsets).items():
                replicates[block].append(float(value))
        g = len(kept_sets)
        for block, values in replicates.items():
            mean = sum(values) / g
            variance[block] += (g - 1) / g * sum((v - mean) ** 2 for v in values)
    return {b: math.sqrt(v) for b, v in variance.items()}
