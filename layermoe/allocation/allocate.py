"""``allocate``: the one entry point the callback calls, from scores to a plain-data layout."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from layermoe.layout import is_int_at_least

from .aliases import BlockDims, Bounds, Layout, Scores
from .budget import Budget
from .errors import AllocationError
from .fill import target_layout
from .programs import method_options
from .shrink import check_shrinkage, shrink_toward_mean
from .space import Space
from .stability import project, stabilize
from .validation import bounds_arrays, normalize_block_dims, normalize_layout, per_block_ints, score_array

RANK_POLICIES = ("fixed", "scores")
#: ``allocate``'s own keyword options; every other keyword is an option of the method.
ALLOCATE_OPTIONS = (
    "rank",
    "rank_policy",
    "experts_bounds",
    "rank_bounds",
    "rank_step",
    "allowed_ranks",
    "experts_total",
    "hysteresis",
    "max_moves",
    "score_errors",
    "error_shrinkage",
)


def check_method_options(method: str, options: Mapping[str, Any]) -> None:
    """Raise ``AllocationError`` now (e.g. at configuration time) for an unknown method or an unknown
    method option among ``allocate``'s keyword ``options``, naming what both take, and for a bad
    ``error_shrinkage``; the other values are checked by ``allocate``."""
    takes = sorted(method_options(method, {}))
    unknown = sorted(set(options) - set(ALLOCATE_OPTIONS) - set(takes))
    if unknown:
        raise AllocationError(
            f"unknown option(s) {unknown}: {method} takes {takes}, allocate takes {list(ALLOCATE_OPTIONS)}"
        )
    check_shrinkage(options.get("error_shrinkage", 0.0))


def _rank_ladders(
    blocks: list[int],
    lo: np.ndarray,
    hi: np.ndarray,
    rank_step: int,
    allowed_ranks: Sequence[int] | None,
    cap: list[int],
) -> list[list[int]]:
    """Allowed ranks per block within [lo, hi]: the given list, or multiples of ``rank_step``. Unbounded
    ladders stop at ``cap`` (the largest rank the budget could pay for)."""
    if not is_int_at_least(rank_step):
        raise AllocationError(f"rank_step = {rank_step!r} must be a positive int (e.g. 2 for even ranks)")
    if allowed_ranks is not None:
        if rank_step != 1:
            raise AllocationError("give either rank_step or allowed_ranks, not both")
        vals = sorted({int(r) for r in allowed_ranks})
        if not vals or vals[0] < 1 or any(int(r) != r for r in allowed_ranks):
            raise AllocationError(
                f"allowed_ranks = {allowed_ranks!r} must be a non-empty list of positive ints"
            )
    ladders = []
    for i, b in enumerate(blocks):
        top = hi[i] if math.isfinite(hi[i]) else max(cap[i], lo[i])
        if allowed_ranks is not None:
            lad = [r for r in vals if lo[i] <= r <= top]
        else:
            first = int(math.ceil(lo[i] / rank_step) * rank_step)
            lad = list(range(first, int(top) + 1, rank_step))
        if not lad:
            raise AllocationError(
                f"rank_bounds[{b}] = [{int(lo[i])}, {hi[i]}] contains no allowed rank "
                f"({'allowed_ranks ' + str(allowed_ranks) if allowed_ranks is not None else f'multiples of {rank_step}'}); "
                "widen the bounds or change the rank steps"
            )
        ladders.append(lad)
    return ladders


def allocate(
    scores: Scores,
    method: str = "power_law",
    budget: Budget | str | Mapping | None = "current",
    current_layout: Mapping | None = None,
    block_dims: BlockDims | None = None,
    *,
    rank: int | Mapping[int, int] | None = None,
    rank_policy: str = "fixed",
    experts_bounds: Bounds | None = None,
    rank_bounds: Bounds | None = None,
    rank_step: int = 1,
    allowed_ranks: Sequence[int] | None = None,
    experts_total: int | None = None,
    hysteresis: float = 0.0,
    max_moves: int | None = None,
    score_errors: Mapping[int, float] | None = None,
    error_shrinkage: float = 0.0,
    **method_options_: Any,
) -> Layout:
    """Turn per-block scores (higher = more capacity) into ``{block: {"experts": int, "rank": int}}``.

    - ``method``: ``"power_law"`` (options ``beta=1.0``, ``shift=True``) or ``"mdl"`` (``gamma=0.9``,
      ``beta=2.0``, ``prior=0.5``, ``tau_fraction=0.05``, ``normalize="mean"``); extra keyword arguments
      are these options.
    - ``budget``: a :class:`Budget` or what :meth:`Budget.parse` takes. ``total_experts:T``: exactly T experts,
      ranks fixed. ``params:P``: at most P trainable parameters (costs from ``block_dims``), filled until no
      block can take one more unit (rule in ``layermoe.allocation.fill``). ``"current"`` (default):
      ``params`` with P = the parameter count of ``current_layout``.
    - ``rank_policy``: ``"fixed"`` (ranks = ``rank``, default the current layout's) or ``"scores"``
      (``params`` only: experts from the scores summing to ``experts_total``, default the current total,
      then ranks from the same scores under the parameter budget left).
    - ``experts_bounds`` / ``rank_bounds``: ``(low, high)`` for all blocks or ``{block: (low, high)}``;
      ``high=None`` is unbounded; defaults ``(1, None)``. A low of 0 (either bound) lets the block go
      without adapter (``experts`` 0; a layout's rank stays >= 1). ``rank_step`` / ``allowed_ranks``: rank grid.
    - ``hysteresis`` / ``max_moves``: stability relative to ``current_layout`` (see
      ``layermoe.allocation.stability``).
    - ``error_shrinkage`` (k >= 0, default 0 = off) with ``score_errors`` (per-block standard errors):
      each score is first shrunk toward the mean by k standard errors (``layermoe.allocation.shrink``),
      so capacity moves only as far as the score differences are outside their noise.

    Ties never go by block index: tied blocks are ordered by their raw (unshrunk) score, then by a
    permutation seeded from the budget and the scores' order (``layermoe.allocation.rounding``), so
    all-equal scores give the uniform layout with its remainders spread over the blocks. Raises
    :class:`AllocationError` for empty/NaN/inf scores, contradictory bounds, a budget below the minimum
    layout, or missing inputs.
    """
    blocks, raw = score_array(scores)
    values = shrink_toward_mean(blocks, raw, score_errors, error_shrinkage)
    opts = method_options(method, method_options_)
    if method == "power_law" and opts["shift"] and error_shrinkage > 0:
        # shift's zero stays at the raw minimum: shifted from the shrunk minimum, the blocks shrunk to the
        # mean (all of them when none stays below it) would become the lowest and get no capacity at all,
        # the opposite of "treat them like an average block" (sweep, sst2/tight/shrink-layerif seed 1:
        # 27 of 30 blocks emptied). Shrunk scores never fall below the raw minimum.
        values = np.maximum(values - raw.min(), 0.0)
        opts = {**opts, "shift": False}
    if rank_policy not in RANK_POLICIES:
        raise AllocationError(f"rank_policy = {rank_policy!r}; use one of {RANK_POLICIES}")
    if not (isinstance(hysteresis, (int, float)) and math.isfinite(hysteresis) and hysteresis >= 0):
        raise AllocationError(f"hysteresis = {hysteresis!r} must be a number >= 0 (0 disables it)")
    if max_moves is not None and not is_int_at_least(max_moves, 0):
        raise AllocationError(f"max_moves = {max_moves!r} must be an int >= 0 or None (no cap)")
    current = normalize_layout(current_layout, blocks) if current_layout is not None else None
    if current is None and (hysteresis > 0 or max_moves is not None):
        raise AllocationError("hysteresis/max_moves are relative to a layout: pass current_layout")
    spec = Budget.parse(budget)
    kind = "total_experts" if spec.kind == "total_experts" else "params"
    dims = normalize_block_dims(block_dims, blocks) if block_dims is not None else None
    if kind == "params" and dims is None:
        raise AllocationError(
            f"budget {spec}: parameter budgets need block_dims={{block: [(d_in, d_out), ...]}}"
        )
    if kind == "total_experts" and rank_policy != "fixed":
        raise AllocationError("rank_policy='scores' needs a params budget; total_experts keeps ranks fixed")
    value = spec.resolve(current, block_dims).value

    e_lo, e_hi = bounds_arrays(experts_bounds, blocks, "experts_bounds")
    r_lo, r_hi = bounds_arrays(rank_bounds, blocks, "rank_bounds")
    # A rank of 0 is a block without adapter, which a layout says with 0 experts (its rank is kept
    # for when experts come back): rank low 0 = experts low 0, on a ladder of ranks >= 1.
    e_lo[r_lo == 0] = 0
    r_lo = np.maximum(r_lo, 1)
    if rank_policy == "fixed":
        if rank is None and current is None:
            raise AllocationError("rank_policy='fixed' needs the ranks: pass rank= or current_layout")
        fixed = per_block_ints(
            rank if rank is not None else {b: current[b]["rank"] for b in blocks}, blocks, "rank"
        )  # type: ignore[index]
        grid = _rank_ladders(blocks, r_lo, r_hi, rank_step, allowed_ranks, [int(x) for x in fixed])
        for i, b in enumerate(blocks):
            if fixed[i] not in grid[i]:
                raise AllocationError(
                    f"rank[{b}] = {fixed[i]} is outside rank_bounds/rank steps ({grid[i][:8]}...); "
                    "change rank or the bounds"
                )
        ladders = [[int(x)] for x in fixed]
    else:
        s, _ = dims  # type: ignore[misc]
        cap = [int(value // (max(e_lo[i], 1) * s[i])) for i in range(len(blocks))]
        ladders = _rank_ladders(blocks, r_lo, r_hi, rank_step, allowed_ranks, cap)
        if experts_total is None:
            experts_total = (
                sum(v["experts"] for v in current.values()) if current is not None else int(e_lo.sum())
            )
    space = Space(
        blocks=blocks,
        scores=values,
        raw_scores=raw,
        e_lo=e_lo,
        e_hi=e_hi,
        ladders=ladders,
        kind=kind,
        budget=int(value),
        s=None if dims is None else dims[0],
        r=None if dims is None else dims[1],
        rank_first=rank_policy == "scores",
    )
    e, k = target_layout(space, method, opts, rank_policy, experts_total)
    if current is not None and (hysteresis > 0 or max_moves is not None):
        e, k = stabilize(space, (e, k), project(space, current), hysteresis, max_moves)
    return space.layout(e, k)
