"""The MDL bisection against a generic convex solver (scipy) on small cases.

The closed form ``u_l = clip(gamma q_l^beta / (prior_l + nu c_l), lo_l, hi_l)`` is the KKT point of the
concave program ``max sum_l gamma q_l^beta log(u_l) - prior_l u_l  s.t.  sum_l c_l u_l = B, lo <= u <= hi``;
SLSQP solves that program directly, and brentq solves the dual equation for nu independently.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import brentq, minimize

from layermoe.allocation import mdl_units

CASES = [
    # q, costs, budget, lo, hi, prior
    ([1.0, 2, 3, 4], [1.0, 1, 1, 1], 16.0, None, None, 0.5),
    ([0.3, 1.7, 0.9], [1.0, 2.0, 0.5], 12.0, None, None, 0.5),
    ([2.0, 0.5, 1.0, 3.0, 1.5], [3.0, 1.0, 2.0, 1.0, 1.5], 40.0, [1, 1, 2, 1, 1], [8, 6, 9, 6, 7], 0.3),
    ([1.0, 1.1, 5.0], [1.0, 1.0, 1.0], 9.0, [1, 1, 1], [4, 4, 4], [0.5, 0.2, 1.0]),
    ([0.05, 0.05, 4.0, 2.0], [1.0, 1.0, 1.0, 1.0], 30.0, None, None, 0.5),
]


def _scipy_primal(q, c, budget, lo, hi, prior, gamma=0.9, beta=2.0):
    g = gamma * q**beta
    x0 = lo + (budget - c @ lo) / c.sum()  # feasible start (inside the box for these cases)
    x0 = np.minimum(x0, hi) if np.all(np.isfinite(hi)) else x0
    res = minimize(
        lambda u: -(g @ np.log(u) - prior @ u),
        x0,
        jac=lambda u: -(g / u - prior),
        bounds=[(lo_i, None if not np.isfinite(h) else h) for lo_i, h in zip(lo, hi, strict=True)],
        constraints=[{"type": "eq", "fun": lambda u: c @ u - budget, "jac": lambda u: c}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize(("q", "c", "budget", "lo", "hi", "prior"), CASES)
def test_bisection_matches_scipy(q, c, budget, lo, hi, prior):
    q, c = np.array(q), np.array(c)
    n = len(q)
    lo = np.ones(n) if lo is None else np.array(lo, dtype=float)
    hi = np.full(n, np.inf) if hi is None else np.array(hi, dtype=float)
    p = np.broadcast_to(np.asarray(prior, dtype=float), (n,)).copy()
    units, nu = mdl_units(q, c, budget, prior=p, lo=lo, hi=hi)
    assert c @ units == pytest.approx(budget, rel=1e-10)
    assert np.all(units >= lo - 1e-12) and np.all(units <= hi + 1e-12)
    np.testing.assert_allclose(units, _scipy_primal(q, c, budget, lo, hi, p), rtol=2e-4, atol=2e-4)
    # The dual equation solved by a different root finder gives the same nu.
    g = 0.9 * q**2.0
    edge = np.max(-p / c)
    spend = lambda v: c @ np.clip(g / (p + v * c), lo, hi) - budget  # noqa: E731
    top = edge + 1.0
    while spend(top) > 0:
        top = edge + 2 * (top - edge)
    bottom = edge + 1e-9
    if spend(bottom) > 0:
        nu_ref = brentq(spend, bottom, top, xtol=1e-14, rtol=1e-14)
        # nu is only unique where some block is strictly between its bounds; compare the spend instead.
        np.testing.assert_allclose(np.clip(g / (p + nu_ref * c), lo, hi), units, rtol=1e-8, atol=1e-8)


def test_dense_grid_two_blocks():
    """Two blocks, unit costs: the objective maximized over a dense grid of the budget line."""
    q, budget = np.array([1.0, 2.5]), 7.0
    g = 0.9 * q**2
    u0 = np.linspace(1.0, budget - 1.0, 600_001)
    obj = g[0] * np.log(u0) - 0.5 * u0 + g[1] * np.log(budget - u0) - 0.5 * (budget - u0)
    best = u0[np.argmax(obj)]
    units, _ = mdl_units(q, np.ones(2), budget)
    assert units[0] == pytest.approx(best, abs=2e-5)
    assert units.sum() == pytest.approx(budget)


def test_budget_an_ulp_below_the_minimum_after_rescaling_gives_the_lower_bounds():
    # Costs rescaled by their mean (1264 / 3) sum to 3 + 2^-51 while the budget rescales to 3.0, so every
    # nu spends more than the budget; the search for an upper nu used to double to inf and never stop.
    q, c = np.array([1.0, 0.5, 3.0]), np.array([392.0, 480.0, 392.0])
    assert float(np.sum(c / c.mean())) > 1264.0 / c.mean()
    units, nu = mdl_units(q, c, 1264.0, lo=np.ones(3), hi=np.full(3, np.inf))
    np.testing.assert_array_equal(units, np.ones(3))
    # The smallest nu with every block at lo = 1: 0.9 q^2 / (0.5 + nu c) <= 1 for all l, i.e.
    # nu = max((0.9 q^2 - 0.5) / c), reached by block 2.
    assert nu == pytest.approx((0.9 * 9.0 - 0.5) / 392.0, rel=1e-9)


@pytest.mark.filterwarnings("error")
def test_budget_at_the_minimum_with_blocks_that_may_go_empty_gives_the_lower_bounds():
    # Blocks with lo = 0 only reach 0 as nu -> inf, so no finite nu spends exactly the minimum layout;
    # the search for an upper nu used to double until p + nu c overflowed.
    q, c, lo = np.ones(3), np.array([7.0, 50.0, 20.0]), np.array([0.0, 0.52, 0.0])
    units, nu = mdl_units(q, c, 26.0, lo=lo, hi=np.full(3, np.inf))
    np.testing.assert_array_equal(units, lo)
    assert nu == np.inf
    # a hair above the minimum the empty blocks take (almost) all of the rest, and the budget is spent
    units, nu = mdl_units(q, c, 26.0 + 1e-6, lo=lo, hi=np.full(3, np.inf))
    assert np.isfinite(nu) and c @ units == pytest.approx(26.0 + 1e-6, rel=1e-12)
    assert np.all(units >= lo)
