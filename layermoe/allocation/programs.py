"""The allocation programs as score -> continuous share rules, plus their integer versions.

``power_law`` (AlphaLoRA / LayerIF) and ``mdl`` (curvature-weighted MDL capacity allocation) each turn
scores into real-valued units that spend a linear budget exactly; ``allocate`` then rounds them and, under a
parameter budget, fills what rounding left. Scores are used as given: higher means more capacity, no
sign flips.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .aliases import Bounds, Scores
from .continuous import mdl_units, proportional_units
from .errors import AllocationError
from .rounding import largest_remainder
from .validation import bounds_arrays, score_array

METHODS = ("power_law", "mdl")
_OPTIONS = {
    "power_law": {"beta": 1.0, "shift": True},
    "mdl": {"gamma": 0.9, "beta": 2.0, "prior": 0.5, "tau_fraction": 0.05, "normalize": "mean"},
}


def method_options(method: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults merged with ``options``; unknown names raise, naming the valid ones."""
    if method not in _OPTIONS:
        raise AllocationError(f"method {method!r} is unknown; use one of {METHODS}")
    unknown = sorted(set(options) - set(_OPTIONS[method]))
    if unknown:
        raise AllocationError(
            f"{method}: unknown option(s) {unknown}; valid options are {sorted(_OPTIONS[method])}"
        )
    return {**_OPTIONS[method], **options}


def _scaled_by_power_of_two(values: np.ndarray) -> np.ndarray:
    """``values * 2^-k`` with the largest magnitude in [0.5, 1).

    Both programs are invariant to positive rescaling and a power-of-two scale is exact in floating point,
    so shares come out as without it (bit for bit, except power_law with a fractional beta: within an
    ulp), while denormal scores (whose mean rounds to 0) and huge ones (whose sum or power overflows) no
    longer turn into 0/0, inf or a stalled rounding.
    """
    top = float(np.max(np.abs(values)))
    return np.ldexp(values, -math.frexp(top)[1]) if top > 0 else values


def power_law_weights(values: np.ndarray, beta: float = 1.0, shift: bool = True) -> np.ndarray:
    """``v_l = s_l^beta``, after ``s - min(s)`` when ``shift`` (so the lowest block gets its minimum).

    Positive rescaling of the scores scales every v_l by the same factor, so shares are invariant to it;
    with ``shift`` they are also invariant to adding a constant. Without shift, negative scores have no
    power and raise.
    """
    if not math.isfinite(beta) or beta <= 0:
        raise AllocationError(f"power_law: beta = {beta!r} must be a positive finite number")
    values = _scaled_by_power_of_two(values)
    s = values - values.min() if shift else values
    if np.any(s < 0):
        raise AllocationError(
            "power_law: negative scores with shift=False; pass shift=True (uses s - min(s)) or shift the "
            "scores yourself"
        )
    return _scaled_by_power_of_two(s) ** beta


def mdl_quality(values: np.ndarray, tau_fraction: float = 0.05, normalize: str | None = "mean") -> np.ndarray:
    """Layer quality ``q = max(s, 0) + tau`` with ``tau = tau_fraction * median(max(s, 0))``.

    ``normalize="mean"`` divides q by its mean, making the program invariant to positive rescaling of
    the scores (the paper normalizes its gains into quality scores; the exact normalization is not
    published, so we pick the one that gives that invariance). ``normalize=None`` uses q as is: scores
    [1, 2, 3, 4] with ``tau_fraction=0`` then give the issue's worked example. If the median is 0, tau
    falls back to ``tau_fraction * max``; if every score is <= 0, all blocks are tied (q = 1).
    """
    if not math.isfinite(tau_fraction) or tau_fraction < 0:
        raise AllocationError(f"mdl: tau_fraction = {tau_fraction!r} must be >= 0")
    if normalize not in (None, "mean"):
        raise AllocationError(f"mdl: normalize = {normalize!r}; use 'mean' or None")
    pos = np.maximum(values, 0.0)
    if not np.any(pos > 0):
        return np.ones_like(values)
    if normalize == "mean":
        pos = _scaled_by_power_of_two(pos)
    med = float(np.median(pos))
    tau = tau_fraction * (med if med > 0 else float(pos.max()))
    q = pos + tau
    return q / q.mean() if normalize == "mean" else q


def continuous_share(
    method: str,
    values: np.ndarray,
    costs: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    budget: float,
    options: Mapping[str, Any],
    what: str = "units",
) -> np.ndarray:
    """Real-valued units per block with ``sum c_l u_l = budget`` and ``lo <= u <= hi``."""
    opts = method_options(method, options)
    if method == "power_law":
        w = power_law_weights(values, opts["beta"], opts["shift"])
        return proportional_units(w, costs, lo, hi, budget, what)
    q = mdl_quality(values, opts["tau_fraction"], opts["normalize"])
    units, _ = mdl_units(
        q, costs, budget, gamma=opts["gamma"], beta=opts["beta"], prior=opts["prior"], lo=lo, hi=hi
    )
    return units


def _integer_units(method: str, scores: Scores, total: int, bounds: Bounds | None, options: dict) -> Any:
    blocks, values = score_array(scores)
    lo, hi = bounds_arrays(bounds, blocks, "bounds")
    if isinstance(total, bool) or not isinstance(total, (int, np.integer)):
        raise AllocationError(f"{method}: total = {total!r} must be an int")
    costs = np.ones(len(blocks))
    units = continuous_share(method, values, costs, lo, hi, float(total), options)
    ints = [int(x) for x in largest_remainder(units, int(total), lo, hi, values)]
    return dict(zip(blocks, ints, strict=True)) if isinstance(scores, Mapping) else ints


def power_law(
    scores: Scores, total: int, *, beta: float = 1.0, shift: bool = True, bounds: Bounds | None = None
) -> list[int] | dict[int, int]:
    """Exactly ``total`` units, at least the lower bound (default 1) per block, in proportion to
    ``s^beta`` (after ``s - min(s)`` when ``shift``): floor, then largest fractional part (ties: higher
    score, then a seeded order of the blocks, never their index: ``rounding.tie_positions``). Returns a
    list for a sequence of scores, a dict for a mapping.

    ``power_law([0, 1, 2, 4], 12, shift=False) == [1, 2, 3, 6]``.
    """
    return _integer_units("power_law", scores, total, bounds, {"beta": beta, "shift": shift})


def mdl(
    scores: Scores,
    total: int,
    *,
    gamma: float = 0.9,
    beta: float = 2.0,
    prior: float = 0.5,
    tau_fraction: float = 0.05,
    normalize: str | None = "mean",
    bounds: Bounds | None = None,
) -> list[int] | dict[int, int]:
    """Exactly ``total`` units from the MDL program (unit costs) with floor + largest remainder.

    ``mdl([1, 2, 3, 4], 16, tau_fraction=0, normalize=None) == [1, 2, 5, 8]`` (nu = 1.24).
    """
    opts = {
        "gamma": gamma,
        "beta": beta,
        "prior": prior,
        "tau_fraction": tau_fraction,
        "normalize": normalize,
    }
    return _integer_units("mdl", scores, total, bounds, opts)
