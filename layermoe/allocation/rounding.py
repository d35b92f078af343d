"""Integer rounding that keeps an exact unit budget (floor, then largest remainder)."""

from __future__ import annotations

import numpy as np

_SNAP = 1e-9  # shares within this of an integer are that integer (float noise, not a fraction)


def snap(units: np.ndarray) -> np.ndarray:
    """Remove float noise so exact integer shares (e.g. the LayerIF vector) floor to themselves."""
    near = np.round(units)
    return np.where(np.abs(units - near) <= _SNAP * np.maximum(1.0, np.abs(near)), near, units)


def tie_key(frac: np.ndarray) -> np.ndarray:
    """Fractional parts rounded to 1e-9, so exact ties (e.g. 25/60 from two different blocks) stay ties
    under float noise and fall to the score/index tie-break instead of the last bit."""
    return np.round(frac, 9)


def priority_order(keys_desc: list[np.ndarray]) -> np.ndarray:
    """Block positions sorted by several keys, each descending, then by ascending position."""
    n = len(keys_desc[0])
    return np.array(sorted(range(n), key=lambda i: tuple(-float(k[i]) for k in keys_desc) + (i,)), dtype=int)


def largest_remainder(
    units: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray, scores: np.ndarray
) -> np.ndarray:
    """Integers summing to ``total``: floor every share, then give the missing units one each to the
    largest fractional parts (ties: higher score first, then lower block index), within [lo, hi]."""
    u = snap(np.clip(units, lo, hi))
    out = np.floor(u).astype(np.int64)
    frac = tie_key(u - out)
    missing = int(total - out.sum())
    order = priority_order([frac, scores])
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
