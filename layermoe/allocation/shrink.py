"""Uncertainty-aware scores: shrink each block's score toward the mean by its standard error.

Soft thresholding: s'_l = mean + sign(d_l) * max(|d_l| - k * se_l, 0) with d_l = s_l - mean(s). A block
whose score is within k standard errors of the mean gets exactly the mean (the allocator treats it
like an average block); one further out keeps only the part of its difference that is outside its
noise. k = 0 leaves the scores as they are; a large k gives the uniform layout.
With power_law's ``shift``, ``allocate`` keeps the zero at the raw scores' minimum, so blocks shrunk to the
mean keep an average block's share (shifting from the shrunk minimum would empty them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from .errors import AllocationError
from .validation import _block_key


def check_shrinkage(strength: object) -> None:
    """Raise ``AllocationError`` unless `strength` is a finite number >= 0 (standard errors; 0 = off)."""
    if (
        isinstance(strength, bool)
        or not isinstance(strength, (int, float))
        or not math.isfinite(strength)
        or strength < 0
    ):
        raise AllocationError(
            f"error_shrinkage = {strength!r} must be a number >= 0 (standard errors; 0 = off)"
        )


def shrink_toward_mean(
    blocks: list[int], values: np.ndarray, errors: Mapping | None, strength: float
) -> np.ndarray:
    """Scores (aligned with `blocks`) shrunk toward their mean by `strength` standard errors."""
    check_shrinkage(strength)
    if strength == 0:
        return values
    if errors is None:
        raise AllocationError(
            "error_shrinkage > 0 needs score_errors: use a scorer that reads statistics (its standard "
            "errors come with the scores), or set error_shrinkage to 0"
        )
    given = {_block_key(k, "score_errors"): v for k, v in errors.items()}
    missing = [b for b in blocks if b not in given]
    if missing:
        raise AllocationError(f"score_errors: no standard error for block(s) {missing}")
    se = np.array([float(given[b]) for b in blocks], dtype=np.float64)
    if not np.all(np.isfinite(se)) or np.any(se < 0):
        raise AllocationError("score_errors must be finite and >= 0")
    mean = float(values.mean())
    diff = values - mean
    return mean + np.sign(diff) * np.maximum(np.abs(diff) - strength * se, 0.0)
