"""Integer rounding that keeps an exact unit budget (floor, then largest remainder), and the tie rule.

Ties are never broken by block index: index order hands every freed unit to the lowest-numbered tied
blocks (issue 34: with ``error_shrinkage`` many blocks shrink to exactly the mean, and blocks 0-2 gained
experts while a higher-scored block 13 did not). After the keys of each step (fractional part, the
allocated score) come the raw scores (higher first), then a fixed permutation of the blocks seeded from
the budget and the order pattern of the raw scores (:func:`tie_positions`): the same inputs give the same
layout, and over budgets every tied block is equally likely to take the spare units.
"""

from __future__ import annotations

import hashlib

import numpy as np

_SNAP = 1e-9  # shares within this of an integer are that integer (float noise, not a fraction)


def snap(units: np.ndarray) -> np.ndarray:
    """Remove float noise so exact integer shares (e.g. the LayerIF vector) floor to themselves."""
    near = np.round(units)
    return np.where(np.abs(units - near) <= _SNAP * np.maximum(1.0, np.abs(near)), near, units)


def tie_key(frac: np.ndarray) -> np.ndarray:
    """Fractional parts rounded to 1e-9, so exact ties (e.g. 25/60 from two different blocks) stay ties
    under float noise and fall to the score/tie-position rule instead of the last bit."""
    return np.round(frac, 9)


def tie_positions(raw_scores: np.ndarray, budget: float, seed: int = 0) -> np.ndarray:
    """Each block's place (0 = first) in a permutation seeded from ``budget`` and the dense ranks of
    ``raw_scores`` (and ``seed``, when not 0: growth passes its round's seed so that ties rotate over
    rounds). Dense ranks, not the values, so a layout stays invariant to whatever the programs are
    invariant to (positive rescaling; adding a constant under shift) and to float noise in the scores."""
    raw = np.asarray(raw_scores, dtype=np.float64)
    dense = np.unique(raw, return_inverse=True)[1].astype(np.int64)
    salt = repr(float(budget)) + (f"/seed={int(seed)}" if seed else "")
    digest = hashlib.sha256(dense.tobytes() + salt.encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(len(raw))
    positions = np.empty(len(raw), dtype=np.int64)
    positions[order] = np.arange(len(raw))
    return positions


def priority_order(keys_desc: list[np.ndarray], tie_position: np.ndarray) -> np.ndarray:
    """Block positions sorted by several keys, each descending, then by ascending ``tie_position`` (from
    :func:`tie_positions`; never the block index)."""
    n = len(tie_position)
    return np.array(
        sorted(range(n), key=lambda i: (*(-float(k[i]) for k in keys_desc), int(tie_position[i]))), dtype=int
    )


def largest_remainder(
    units: np.ndarray,
    total: int,
    lo: np.ndarray,
    hi: np.ndarray,
    scores: np.ndarray,
    raw_scores: np.ndarray | None = None,
    tie_position: np.ndarray | None = None,
) -> np.ndarray:
    """Integers summing to ``total``: floor every share, then give the missing units one each to the
    largest fractional parts (ties: higher ``scores``, higher ``raw_scores`` (default ``scores``), then
    ``tie_position``, default :func:`tie_positions` of the raw scores and ``total``), within [lo, hi]."""
    raw = scores if raw_scores is None else raw_scores
    place = tie_positions(raw, total) if tie_position is None else tie_position
    u = snap(np.clip(units, lo, hi))
    out = np.floor(u).astype(np.int64)
    frac = tie_key(u - out)
    missing = int(total - out.sum())
    order = priority_order([frac, scores, raw], place)
    # Normally `missing` <= the number of positive fractions; the loop also covers float edge cases.
    while missing > 0:
        progressed = False
        for i in order:
            if missing == 0:
                break
            if out[i] < hi[i]:
                out[i] += 1
                missing -= 1
                progressed = True
        if not progressed:
            raise AssertionError("largest_remainder: total exceeds the upper bounds (checked before)")
    while missing < 0:  # only reachable through float noise; take from the smallest fractions
        for i in order[::-1]:
            if missing == 0:
                break
            if out[i] > lo[i]:
                out[i] -= 1
                missing += 1
    return out
