"""From scores to an integer target layout in a :class:`Space` (no stability constraints yet).

``total_experts``: the program's shares of T with unit costs, floor + largest remainder: exactly T.

``params`` (the rule): the program spreads the parameter budget P as real-valued units; each block is
floored to whole units; then, in order of largest fractional part (ties: higher score, higher raw
score, then a seeded order of the blocks, never their index: rounding.py), a
block takes its rounded-up unit if that still fits under P; then blocks take further units greedily by
score (highest first) while any fits. The result never exceeds P, and no block can take one more unit (one
expert, or one rank step when ranks follow the scores) without exceeding P or its upper bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import AllocationError
from .programs import continuous_share
from .rounding import largest_remainder, snap, tie_key
from .space import EXPERT, RANK, Space


def _total_experts(space: Space, method: str, options: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    units = continuous_share(
        method,
        space.scores,
        np.ones(space.n),
        space.e_lo,
        space.e_hi,
        float(space.budget),
        options,
        "experts",
    )
    e = largest_remainder(
        units, space.budget, space.e_lo, space.e_hi, space.scores, space.raw_scores, space.tie_position
    )
    return e, np.zeros(space.n, dtype=np.int64)


def _round_up_by_fraction(space: Space, kind: str, e: np.ndarray, k: np.ndarray, frac: np.ndarray) -> None:
    """One pass: each block with a fractional share takes its rounded-up unit if it still fits."""
    slack = space.budget - space.cost(e, k)
    for i in space.priority([tie_key(frac)]):
        if frac[i] <= 0 or not space.can_step(i, kind, +1, e, k):
            continue
        delta = space.step_delta(i, kind, +1, e, k)
        if delta <= slack:
            space.apply(i, kind, +1, e, k)
            slack -= delta


def _spread(
    space: Space,
    method: str,
    options: Mapping[str, Any],
    costs: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    budget: float,
) -> np.ndarray:
    """Continuous shares with the budget clipped into what the bounds allow (the integer steps after
    this restore the exact rule)."""
    low, high = float(np.dot(costs, lo)), float(np.dot(costs, hi)) if np.all(np.isfinite(hi)) else np.inf
    return snap(continuous_share(method, space.scores, costs, lo, hi, min(max(budget, low), high), options))


def _params_fixed_rank(
    space: Space, method: str, options: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray]:
    assert space.s is not None and space.r is not None
    k = np.zeros(space.n, dtype=np.int64)
    rank = np.array([lad[0] for lad in space.ladders], dtype=np.float64)
    per_expert = rank * space.s + space.r  # router included: exact for every expert count above one
    units = _spread(space, method, options, per_expert, space.e_lo, space.e_hi, float(space.budget))
    e = np.floor(units).astype(np.int64)
    space.repair_down(e, k)
    _round_up_by_fraction(space, EXPERT, e, k, units - np.floor(units))
    space.greedy_fill(e, k)
    return e, k


def _params_scored_rank(
    space: Space, method: str, options: Mapping[str, Any], experts_total: int
) -> tuple[np.ndarray, np.ndarray]:
    assert space.s is not None and space.r is not None
    lo_total, hi_total = int(space.e_lo.sum()), float(space.e_hi.sum())
    t = int(min(max(experts_total, lo_total), hi_total))
    units = continuous_share(
        method, space.scores, np.ones(space.n), space.e_lo, space.e_hi, float(t), options
    )
    e = largest_remainder(
        units, t, space.e_lo, space.e_hi, space.scores, space.raw_scores, space.tie_position
    )
    k = np.zeros(space.n, dtype=np.int64)
    if space.cost(e, k) > space.budget:  # too many experts for P even at the lowest ranks
        while space.cost(e, k) > space.budget:
            i = next(i for i in space.by_score(descending=False) if e[i] > space.e_lo[i])
            e[i] -= 1
    routers = np.array([space.r[i] * e[i] if e[i] > 1 else 0 for i in range(space.n)], dtype=np.float64)
    ladder_lo = np.array([lad[0] for lad in space.ladders], dtype=np.float64)
    ladder_hi = np.array([lad[-1] for lad in space.ladders], dtype=np.float64)
    per_rank = e * space.s.astype(np.float64)
    ranks = ladder_lo.copy()  # blocks left without experts keep their lowest rank
    active = e > 0
    if np.any(active):
        sub = _subspace(space, active)
        ranks[active] = _spread(
            sub,
            method,
            options,
            per_rank[active],
            ladder_lo[active],
            ladder_hi[active],
            space.budget - routers.sum(),
        )
    frac = np.zeros(space.n)
    for i, lad in enumerate(space.ladders):
        k[i] = int(np.searchsorted(lad, ranks[i], side="right")) - 1
        if k[i] + 1 < len(lad):
            frac[i] = (ranks[i] - lad[k[i]]) / (lad[k[i] + 1] - lad[k[i]])
    space.repair_down(e, k)
    _round_up_by_fraction(space, RANK, e, k, frac)
    space.greedy_fill(e, k)
    return e, k


def _subspace(space: Space, mask: np.ndarray) -> Space:
    """The blocks in `mask` only (their scores and bounds), for a program that must not see the rest."""
    idx = np.flatnonzero(mask)
    return Space(
        blocks=[space.blocks[i] for i in idx],
        scores=space.scores[idx],
        raw_scores=space.raw_scores[idx],
        tie_position=space.tie_position[idx],
        e_lo=space.e_lo[idx],
        e_hi=space.e_hi[idx],
        ladders=[space.ladders[i] for i in idx],
        kind=space.kind,
        budget=space.budget,
    )


def target_layout(
    space: Space, method: str, options: Mapping[str, Any], rank_policy: str, experts_total: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Integer (experts, ladder index) per block meeting the budget rule of the module docstring."""
    if space.kind == "total_experts":
        lo, hi = int(space.e_lo.sum()), float(space.e_hi.sum())
        if space.budget < lo:
            raise AllocationError(
                f"budget total_experts:{space.budget} is below the minimum layout ({lo} experts with every "
                "block at its lower bound); raise the budget or lower experts_bounds"
            )
        if space.budget > hi:
            raise AllocationError(
                f"budget total_experts:{space.budget} is above the maximum layout ({int(hi)} experts with "
                "every block at its upper bound); lower the budget or raise experts_bounds"
            )
        return _total_experts(space, method, options)
    minimum = space.min_cost()
    if space.budget < minimum:
        raise AllocationError(
            f"budget params:{space.budget} is below the minimum layout ({minimum} parameters with every "
            "block at its lowest experts and rank); raise the budget or lower experts_bounds/rank_bounds/rank"
        )
    if rank_policy == "fixed":
        return _params_fixed_rank(space, method, options)
    assert experts_total is not None
    return _params_scored_rank(space, method, options, experts_total)
