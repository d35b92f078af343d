"""Input checks shared by every allocation program.

All checks raise :class:`AllocationError` naming the field and the fix, before any arithmetic, so a bad
score vector never turns into a silently wrong layout in the middle of training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .aliases import BlockDims, Bounds, Layout, Scores
from .errors import AllocationError


def _block_key(key: object, field: str) -> int:
    """Block indices may arrive as strings from JSON/hparams; turn them back into ints."""
    if isinstance(key, bool):
        raise AllocationError(f"{field}: block key {key!r} is not a block index; use ints like 0, 1, 2")
    if isinstance(key, int):
        return key
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        return int(key)
    raise AllocationError(f"{field}: block key {key!r} is not a block index; use ints like 0, 1, 2")


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
        if isinstance(low, bool) or not isinstance(low, (int, np.integer)) or low < 0:
            raise AllocationError(
                f"{field}[{b}]: low = {low!r} must be an int >= 0 (0 lets the block go without adapter)"
            )
        if high is not None and (isinstance(high, bool) or not isinstance(high, (int, np.integer))):
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
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise AllocationError(f"{field}[{b}] = {v!r} must be a positive int")
    return np.array(vals, dtype=np.int64)


def normalize_layout(layout: Mapping, blocks: list[int] | None, field: str = "current_layout") -> Layout:
    """Plain-data layout with int keys, checked to cover exactly ``blocks`` (the scored blocks) if given."""
    if not isinstance(layout, Mapping):
        raise AllocationError(f"{field} must be a mapping {{block: {{'experts': int, 'rank': int}}}}")
    out: Layout = {}
    for k, v in layout.items():
        b = _block_key(k, field)
        if not isinstance(v, Mapping) or "experts" not in v or "rank" not in v:
            raise AllocationError(f"{field}[{b}] = {v!r}: expected {{'experts': int, 'rank': int}}")
        e, r = v["experts"], v["rank"]
        for name, x, low in (("experts", e, 0), ("rank", r, 1)):
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < low:
                raise AllocationError(f"{field}[{b}]['{name}'] = {x!r} must be an int >= {low}")
        out[b] = {"experts": int(e), "rank": int(r)}
    if blocks is not None and sorted(out) != blocks:
        raise AllocationError(
            f"{field}: blocks {sorted(out)} do not match the scored blocks {blocks}; score every block"
        )
    return out


def normalize_block_dims(block_dims: BlockDims, blocks: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-block ``S = sum(d_in + d_out)`` (params per unit of rank per expert) and ``R = sum(d_in + 1)``
    (router params per expert when a block has more than one expert), as int64 arrays."""
    if not isinstance(block_dims, Mapping):
        raise AllocationError("block_dims must be a mapping {block: [(d_in, d_out), ...]}")
    given = {_block_key(k, "block_dims"): v for k, v in block_dims.items()}
    missing = [b for b in blocks if b not in given]
    if missing:
        raise AllocationError(f"block_dims: no module shapes for block(s) {missing}; pass every block")
    s = np.zeros(len(blocks), dtype=np.int64)
    r = np.zeros(len(blocks), dtype=np.int64)
    for i, b in enumerate(blocks):
        mods = given[b]
        if not isinstance(mods, Sequence) or len(mods) == 0:
            raise AllocationError(f"block_dims[{b}]: give a non-empty list of (d_in, d_out) pairs")
        for pair in mods:
            if not isinstance(pair, Sequence) or len(pair) != 2:
                raise AllocationError(f"block_dims[{b}]: {pair!r} is not a (d_in, d_out) pair")
            d_in, d_out = pair
            for name, d in (("d_in", d_in), ("d_out", d_out)):
                if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
                    raise AllocationError(f"block_dims[{b}]: {name} = {d!r} must be a positive int")
            s[i] += d_in + d_out
            r[i] += d_in + 1
    return s, r
