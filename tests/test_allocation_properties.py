"""Hypothesis property tests for the unit-budget programs (power_law, mdl) and total_experts layouts."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from layermoe.allocation import allocate, mdl, power_law, proportional_units
from layermoe.allocation.rounding import tie_positions

FAST = settings(max_examples=80, deadline=None)
int_scores = st.lists(st.integers(0, 30), min_size=1, max_size=12)
real_scores = st.lists(st.floats(-5, 50, allow_nan=False, allow_infinity=False), min_size=1, max_size=12)


def reference_power_law(scores: list[int], total: int, beta: int, shift: bool) -> list[int]:
    """Exact rational arithmetic: shares 1 + (T - L) v / sum(v), floor, largest remainder (ties: higher
    score, then the documented tie positions, never the index); all-zero weights spread evenly."""
    s = [x - min(scores) for x in scores] if shift else scores
    v = [Fraction(x) ** beta for x in s]
    if sum(v) == 0:
        v = [Fraction(1)] * len(v)
    extra = total - len(s)
    shares = [1 + extra * x / sum(v) for x in v]
    out = [int(x) for x in shares]  # floor (shares >= 1)
    place = tie_positions(np.array(scores, dtype=np.float64), total)
    order = sorted(range(len(s)), key=lambda i: (-(shares[i] - out[i]), -scores[i], place[i]))
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


@FAST
@given(int_scores, st.integers(0, 60), st.sampled_from([1, 2, 3]), st.booleans())
def test_power_law_matches_exact_rational_reference(scores, extra, beta, shift):
    total = len(scores) + extra
    assert power_law([float(x) for x in scores], total, beta=float(beta), shift=shift) == reference_power_law(
        scores, total, beta, shift
    )


@FAST
@given(real_scores, st.integers(0, 80), st.sampled_from(["power_law", "mdl"]), st.integers(1, 3), st.data())
def test_exact_total_bounds_and_monotone(scores, extra, method, lo, data):
    hi = data.draw(st.one_of(st.none(), st.integers(lo, lo + 12)))
    n = len(scores)
    total = n * lo + (extra if hi is None else extra % (n * (hi - lo) + 1))
    fn = power_law if method == "power_law" else mdl
    out = fn(scores, total, bounds=(lo, hi))
    assert sum(out) == total
    assert all(lo <= x and (hi is None or x <= hi) for x in out)
    for a in range(n):
        for b in range(n):
            if scores[a] > scores[b]:
                assert out[a] >= out[b], (scores, out)


@pytest.mark.parametrize("scale", [2.0**-1074, 2.0**1022])
@pytest.mark.parametrize("method", ["power_law", "mdl"])
def test_denormal_and_huge_scores_match_their_power_of_two_rescaling(scale, method):
    """Regression (hypothesis found mdl([0.0, 5e-324], 2) raising "q must be finite"): a power-of-two
    rescaling is exact in floating point, so scores at the bottom (denormal) or top (sum overflows) of the
    float range must give exactly the layout of the same scores near 1."""
    fn = power_law if method == "power_law" else mdl
    assert fn([0.0, 5e-324], 2) == [1, 1]
    for base in ([0.0, 1.0], [1.0, 2.0, 3.0], [0.0, 1.0, 1.0, 3.0]):
        for total in (len(base), len(base) + 7):
            assert fn([x * scale for x in base], total) == fn(base, total), (base, total)


@FAST
@given(
    st.integers(1, 16),
    st.floats(-3, 100, allow_nan=False),
    st.integers(0, 60),
    st.sampled_from(["power_law", "mdl"]),
)
def test_uniform_on_ties(n, value, extra, method):
    total = n + extra
    fn = power_law if method == "power_law" else mdl
    out = fn([value] * n, total)
    base, rem = divmod(total, n)
    # the remainder goes to the first `rem` blocks of the seeded tie order (not the lowest indices)
    place = tie_positions(np.full(n, value), total)
    assert out == [base + (1 if place[i] < rem else 0) for i in range(n)]
    lay = allocate([value] * n, method, f"total_experts:{total}", rank=4)
    assert [lay[b]["experts"] for b in range(n)] == out


@FAST
@given(int_scores, st.integers(0, 60), st.integers(-6, 6), st.booleans())
def test_power_law_invariant_to_power_of_two_rescaling(scores, extra, j, shift):
    """Scaling by 2^j is exact in floating point, so the integer layout must not change at all."""
    total = len(scores) + extra
    scaled = [float(x) * 2.0**j for x in scores]
    assert power_law(scaled, total, shift=shift) == power_law([float(x) for x in scores], total, shift=shift)


def _near_tie(units: np.ndarray) -> bool:
    """Rounding could go either way under float noise: two fractional parts within 1e-6 of each other,
    or a share within 1e-6 of (but not exactly at) an integer. Shares clamped at a bound are exact."""
    frac = units - np.floor(units)
    dist = np.minimum(frac, 1 - frac)
    if np.any((dist > 1e-12) & (dist < 1e-6)):
        return True
    live = np.sort(frac[dist > 1e-12])
    return bool(np.any(np.diff(live) < 1e-6))


@FAST
@given(
    st.lists(st.floats(0.01, 50, allow_nan=False), min_size=2, max_size=10, unique=True),
    st.integers(0, 60),
    st.floats(0.01, 100),
    st.sampled_from(["power_law", "mdl"]),
)
def test_invariant_to_positive_rescaling(scores, extra, k, method):
    """Both programs promise rescaling invariance (power_law always, mdl with normalize='mean'): the
    continuous shares agree to float precision and, away from rounding ties, so do the integers."""
    from layermoe.allocation.programs import continuous_share

    n = len(scores)
    total = n + extra
    ones, lo, hi = np.ones(n), np.ones(n), np.full(n, np.inf)
    a = continuous_share(method, np.array(scores), ones, lo, hi, float(total), {})
    b = continuous_share(method, np.array(scores) * k, ones, lo, hi, float(total), {})
    np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)
    assume(not _near_tie(a))
    fn = power_law if method == "power_law" else mdl
    assert fn(scores, total) == fn([x * k for x in scores], total)


@FAST
@given(
    st.lists(st.one_of(st.just(0.0), st.floats(1e-3, 10)), min_size=1, max_size=10),
    st.lists(st.floats(0.1, 5), min_size=10, max_size=10),
    st.floats(0, 200),
    st.integers(1, 3),
)
def test_proportional_units_spends_budget_with_caps(weights, costs, slack, cap_extra):
    n = len(weights)
    c = np.array(costs[:n])
    lo = np.ones(n)
    hi = lo + cap_extra
    budget = float(c @ lo + min(slack, c @ (hi - lo)))
    u = proportional_units(np.array(weights), c, lo, hi, budget)
    assert c @ u == np.float64(budget) or abs(c @ u - budget) <= 1e-9 * max(1.0, budget)
    assert np.all(u >= lo - 1e-12) and np.all(u <= hi + 1e-12)
    # Uncapped blocks share in proportion to their weights: u - lo = x w for one common x.
    free = u < hi - 1e-9
    w = np.array(weights)
    if np.any(free & (w > 0)) and np.any(w > 0):
        sel = free & (w > 0)
        x = float(np.max((u - lo)[sel] / w[sel]))
        np.testing.assert_allclose(u[free], lo[free] + x * w[free], rtol=1e-12, atol=1e-12)
