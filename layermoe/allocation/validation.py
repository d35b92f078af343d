"""Input checks shared by every allocation program.

All checks raise :class:`AllocationError` naming the field and the fix, before any arithmetic, so a bad
score vector never turns into a silently wrong layout in the middle of training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from layermoe.layout import block_key, block_sizes, is_int_at_least
from layermoe.layout import normalize_layout as normalize_plain_layout

from .aliases import BlockDims, Bounds, Layout, Scores
from .errors import AllocationError


def _block_key(key: object, field: str) -> int:
    return block_key(key, field, AllocationError)


def score_array(scores: Scores, field: str = "scores") -> tuple[list[int], np.ndarray]:
    """Return (sorted block indices, float64 scores); reject empty, NaN and inf scores by block."""
    if isinstance(scores, Mapping):
        items = sorted((_block_key(k, field), v) for k, v in scores.items())
        blocks = [k for k, _ in items]
        if len(set(blocks)) != len(blocks):
            raise AllocationError(f"{field}: duplicate block indices {blocks}; give each block once")
        raw = [v for _, v in items]
    else:
        raw = list(scores)
        blocks = list(range(len(raw)))
    if not raw:
        raise AllocationError(f"{field} is empty: pass at least one block score")
    try:
        values = np.array([float(v) for v in raw], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise AllocationError(f"{field}: every score must be a real number ({err})") from err
    bad = [b for b, v in zip(blocks, values, strict=True) if not math.isfinite(v)]
    if bad:
        raise AllocationError(
            f"{field}: non-finite (NaN/inf) score for block(s) {bad}; fix the scorer or drop those blocks"
        )
    return blocks, values


def bounds_arrays(
    bounds: Bounds | None, blocks: list[int], field: str, default: tuple[int, int | None] = (1, None)
) -> tuple[np.ndarray, np.ndarray]:
    """Per-block integer ``[low, high]`` as arrays; ``high = inf`` when unbounded.

    ``bounds`` is one ``(low, high)`` pair for all blocks or a mapping block -> pair (missing blocks take
    ``default``). Lows must be >= 0 (0: the block may be left without adapter) and highs >= lows.
    """
    if bounds is None:
        per = dict.fromkeys(blocks, default)
    elif isinstance(bounds, Mapping):
        given = {_block_key(k, field): v for k, v in bounds.items()}
        unknown = sorted(set(given) - set(blocks))
        if unknown:
            raise AllocationError(f"{field}: bounds for unknown block(s) {unknown}; scores have {blocks}")
        per = {b: given.get(b, default) for b in blocks}
    else:
        per = dict.fromkeys(blocks, bounds)
    lo = np.empty(len(blocks), dtype=np.float64)
    hi = np.empty(len(blocks), dtype=np.float64)
    for i, b in enumerate(blocks):
        pair = per[b]
        if not isinstance(pair, Sequence) or isinstance(pair, str) or len(pair) != 2:
            raise AllocationError(f"{field}[{b}] = {pair!r}: give a (low, high) pair, high may be None")
        low, high = pair
        if not is_int_at_least(low, 0):
            raise AllocationError(
                f"{field}[{b}]: low = {low!r} must be an int >= 0 (0 lets the block go without adapter)"
            )
        if high is not None and not is_int_at_least(high, -math.inf):
            raise AllocationError(f"{field}[{b}]: high = {high!r} must be an int or None (unbounded)")
        if high is not None and high < low:
            raise AllocationError(
                f"{field}[{b}]: contradictory bounds low={low} > high={high}; make low <= high"
            )
        lo[i] = low
        hi[i] = math.inf if high is None else high
    return lo, hi


def per_block_ints(value: int | Mapping[int, int], blocks: list[int], field: str) -> np.ndarray:
    """An int for every block, or a mapping block -> int covering every block."""
    if isinstance(value, Mapping):
        given = {_block_key(k, field): v for k, v in value.items()}
        missing = [b for b in blocks if b not in given]
        if missing:
            raise AllocationError(f"{field}: no value for block(s) {missing}; give every scored block")
        vals = [given[b] for b in blocks]
    else:
        vals = [value] * len(blocks)
    for b, v in zip(blocks, vals, strict=True):
        if not is_int_at_least(v):
            raise AllocationError(f"{field}[{b}] = {v!r} must be a positive int")
    return np.array(vals, dtype=np.int64)


def normalize_layout(layout: Mapping, blocks: list[int] | None, field: str = "current_layout") -> Layout:
    """Plain-data layout with int keys, checked to cover exactly ``blocks`` (the scored blocks) if given."""
    out = normalize_plain_layout(layout, field, AllocationError)
    if blocks is not None and sorted(out) != blocks:
        raise AllocationError(
            f"{field}: blocks {sorted(out)} do not match the scored blocks {blocks}; score every block"
        )
    return out


def normalize_block_dims(block_dims: BlockDims, blocks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-block ``S = sum(d_in + d_out)`` and ``R = sum(d_in + 1)`` (see ``layermoe.layout.block_sizes``)
    as int64 arrays."""
    sizes = block_sizes(block_dims, blocks, AllocationError)
    s = np.array([size[0] for size in sizes], dtype=np.int64)
    r = np.array([size[1] for size in sizes], dtype=np.int64)
    return s, r
