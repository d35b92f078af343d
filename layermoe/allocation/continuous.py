"""The two continuous programs: real-valued units per block that spend a budget exactly.

Both work on generic linear costs (``sum_l c_l u_l = B``) with per-block bounds ``lo_l <= u_l <= hi_l``, so
the same code serves "T experts" (c_l = 1) and "P parameters" (c_l = params per expert or per unit of
rank). Integer rounding lives in rounding.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .errors import AllocationError


def _check_feasible(costs: np.ndarray, lo: np.ndarray, hi: np.ndarray, budget: float, what: str) -> None:
    low = float(np.dot(costs, lo))
    if budget < low * (1 - 1e-12):
        raise AllocationError(
            f"budget {budget:g} is below the minimum layout ({low:g} {what} with every block at its lower "
            "bound); raise the budget or lower the lower bounds"
        )
    high = float(np.dot(costs, hi)) if np.all(np.isfinite(hi)) else math.inf
    if budget > high * (1 + 1e-12):
        raise AllocationError(
            f"budget {budget:g} is above the maximum layout ({high:g} {what} with every block at its upper "
            "bound); lower the budget or raise the upper bounds"
        )


def proportional_units(
    weights: np.ndarray, costs: np.ndarray, lo: np.ndarray, hi: np.ndarray, budget: float, what: str = "units"
) -> np.ndarray:
    """Power-law share: ``u_l = min(lo_l + x w_l, hi_l)`` with x chosen so that ``sum c_l u_l = budget``.

    With unit costs and ``lo = 1`` this is the papers' rule ``1 + (T - L) w_l / sum(w)``. Capped blocks are
    fixed at ``hi`` and the rest re-solved (water filling); x is computed in closed form, not by search,
    so integer shares (like the LayerIF vector) come out exactly. All-zero weights spread evenly.
    """
    _check_feasible(costs, lo, hi, budget, what)
    w = np.asarray(weights, dtype=np.float64)
    if not np.any(w > 0):
        w = np.ones_like(w)
    units = lo.astype(np.float64).copy()
    free = np.ones(len(w), dtype=bool)
    while True:
        extra = budget - float(np.dot(costs, units))
        if extra <= 0 or not np.any(free):
            return units
        if float(np.dot(costs[free], w[free])) <= 0:  # positive-weight blocks all capped: spread evenly
            w = np.where(free, 1.0, w)
        denom = float(np.dot(costs[free], w[free]))
        trial = units.copy()
        trial[free] = lo[free] + (extra * w[free]) / denom
        over = free & (trial > hi)
        if not np.any(over):
            return trial
        units[over] = hi[over]
        free &= ~over
        units[free] = lo[free]


def _edge_limit(
    units: Callable[[float], np.ndarray],
    gain: np.ndarray,
    c: np.ndarray,
    p: np.ndarray,
    edge: float,
    unbounded: np.ndarray,
    budget: float,
) -> np.ndarray:
    """The MDL solution as nu -> edge: unbounded blocks whose price p + nu c reaches 0 at the edge take
    what the others leave of the budget, shared as gain / c (their prices are proportional to c there)."""
    at_edge = unbounded & (-p / c == edge) & (gain > 0)
    if not np.any(at_edge):
        raise AllocationError(
            "mdl: cannot reach the budget (blocks without an upper bound have q = 0); "
            "raise tau_fraction or give upper bounds"
        )
    out = units(edge)
    rest = budget - float(np.dot(c[~at_edge], out[~at_edge]))
    weights = gain[at_edge] / c[at_edge]
    out[at_edge] = rest * weights / float(np.dot(c[at_edge], weights))
    return out


def mdl_units(
    q: np.ndarray,
    costs: np.ndarray,
    budget: float,
    *,
    gamma: float = 0.9,
    beta: float = 2.0,
    prior: float | np.ndarray = 0.5,
    lo: np.ndarray | None = None,
    hi: np.ndarray | None = None,
    tol: float = 1e-12,
    max_iter: int = 200,
) -> tuple[np.ndarray, float]:
    """MDL capacity program: ``u_l(nu) = clip(gamma q_l^beta / (prior_l + nu c_l), lo_l, hi_l)``.

    With ``lo = 1`` this is ``1 + max(gamma q^beta / (prior + nu c) - 1, 0)`` (the paper's ``1 + e_l``).
    ``sum c_l u_l(nu)`` falls monotonically in nu, so nu is found by bisection to relative tolerance
    ``tol`` (O(L log 1/eps)). Returns ``(units, nu)``. Example: q = [1, 2, 3, 4], c = 1, budget 16 gives
    nu = 1.24 and units [1, 2.069, 4.655, 8.276].
    """
    q = np.asarray(q, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    n = len(q)
    lo = np.ones(n) if lo is None else np.asarray(lo, dtype=np.float64)
    hi = np.full(n, math.inf) if hi is None else np.asarray(hi, dtype=np.float64)
    p = np.broadcast_to(np.asarray(prior, dtype=np.float64), (n,))
    if np.any(q < 0) or not np.all(np.isfinite(q)):
        raise AllocationError("mdl: q must be finite and >= 0")
    if gamma <= 0 or not math.isfinite(gamma):
        raise AllocationError(f"mdl: gamma = {gamma!r} must be a positive finite number")
    if not math.isfinite(beta) or beta <= 0:
        raise AllocationError(f"mdl: beta = {beta!r} must be a positive finite number")
    if np.any(p <= 0) or not np.all(np.isfinite(p)):
        raise AllocationError("mdl: prior must be positive and finite (it keeps the program convex)")
    if np.any(c <= 0):
        raise AllocationError("mdl: costs must be positive")
    _check_feasible(c, lo, hi, budget, "units")
    # Costs may be in parameters (~1e5 per unit): rescale them to mean 1 so nu is O(1) and the bisection
    # tolerance is relative; nu is scaled back on return.
    scale = float(c.mean())
    c, budget = c / scale, budget / scale
    # q**beta of a tiny positive q underflows to 0, and a block with q > 0 would then look unable to grow
    # (the bisection can no longer reach the budget). Positive q are floored far below anything that
    # changes an allocation: max(q) * 2^-60, or closer to max(q) where beta is large so the power stays normal.
    floor = float(q.max()) * 2.0 ** -min(60.0, 900.0 / beta) if np.any(q > 0) else 0.0
    gain = gamma * np.where(q > 0, np.maximum(q, floor), 0.0) ** beta
    if np.all(np.isfinite(hi)) and budget >= float(np.dot(c, hi)):
        return hi.astype(np.float64).copy(), -math.inf
    if not np.any(gain > 0):
        raise AllocationError("mdl: every q is 0, so no block can grow; give positive scores or tau > 0")
    if budget <= float(np.dot(c, lo)) * (1 + tol) and np.any((lo == 0) & (gain > 0)):
        # At the minimum layout a block that may go empty only approaches 0 as nu -> inf (a growth round
        # with no room left): the answer is the lower bounds, and no finite nu spends exactly the budget.
        return lo.astype(np.float64).copy(), math.inf

    def units(nu: float) -> np.ndarray:
        # A block whose price p + nu c is <= 0 gains at every size: it sits at its upper bound.
        den = p + nu * c
        with np.errstate(divide="ignore", invalid="ignore"):
            raw = np.where(den > 0, gain / np.where(den > 0, den, 1.0), np.inf)
        return np.clip(raw, lo, hi)

    def spend(nu: float) -> float:
        return float(np.dot(c, units(nu)))

    # Above `upper` every block sits at lo. Going down, blocks grow; once nu <= -p_l/c_l block l is at
    # hi_l. With all highs finite, nu = min(-p/c) puts every block at hi (spend = max >= budget); else
    # the spend grows without bound as nu nears the edge of the unbounded blocks.
    # a lower bound of 0 (a block may go empty) is only approached: start from a tiny floor and
    # double until the spend is below the budget
    floor = np.where(lo > 0, lo, 1e-9 * budget / (float(c.sum()) * n))
    upper = max(float(np.max((gain / floor - p) / c)), float(np.max(-p / c)) + 1.0)
    # The doubling stops once every block sits at lo as well: no nu spends less than that, and a budget
    # at the minimum layout (fill.py clamps to it) can sit an ulp below sum c_l lo_l after the rescaling
    # above (e.g. c = [392, 480, 392] / mean sums to 3 + 2^-51 against 1264 / mean = 3). Without the
    # stop, upper doubled to inf and spend(inf) = sum c_l lo_l > budget looped forever; with it the
    # bisection below converges to the smallest nu at which every block is at lo.
    while spend(upper) > budget and np.any(units(upper) > lo):
        upper = 2.0 * upper if upper > 0 else 1.0
    unbounded = ~np.isfinite(hi)
    if not np.any(unbounded):
        lower = float(np.min(-p / c))
    else:
        edge = float(np.max((-p / c)[unbounded]))
        gap = max(1.0, upper - edge)
        while spend(edge + gap) < budget:
            gap *= 0.5
            if edge + gap == edge or gap < 1e-300:
                # nu can no longer approach the edge in floating point (a tiny gain needs a price closer
                # to 0 than edge + gap resolves): take the limit nu -> edge exactly.
                return _edge_limit(units, gain, c, p, edge, unbounded, budget), edge / scale
        lower = edge + gap
    for _ in range(max_iter):
        mid = 0.5 * (lower + upper)
        if spend(mid) > budget:
            lower = mid
        else:
            upper = mid
        if upper - lower <= tol * max(1.0, abs(upper)):
            break
    nu = 0.5 * (lower + upper)
    return units(nu), nu / scale
