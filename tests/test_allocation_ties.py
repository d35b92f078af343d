"""Ties are never broken by block index (issue 34): raw scores first, then a seeded order that spreads the
spare units evenly over the tied blocks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layermoe.allocation import allocate, mdl, power_law
from layermoe.allocation.rounding import tie_positions

FAST = settings(max_examples=80, deadline=None)


def _experts(layout: dict) -> list[int]:
    return [layout[b]["experts"] for b in sorted(layout)]


def test_issue_case_spare_units_do_not_go_to_the_lowest_indices() -> None:
    """The issue's case: ten equal scores, two of them low, 40 experts. Index order gave
    [5, 5, 5, 5, 5, 5, 4, 1, 1, 4]: the six spare units to the six lowest-numbered tied blocks."""
    scores = [1.0] * 10
    scores[7] = scores[8] = 0.0
    experts = _experts(allocate(scores, "power_law", "total_experts:40", rank=4))
    assert experts != [5, 5, 5, 5, 5, 5, 4, 1, 1, 4]
    tied = [b for b in range(10) if scores[b] == 1.0]
    assert experts[7] == experts[8] == 1 and sorted(experts[b] for b in tied) == [4, 4] + [5] * 6
    # the spare units follow the documented seeded order of the tied blocks, whatever their numbers
    place = tie_positions(np.array(scores), 40)
    first_six = sorted(tied, key=lambda b: place[b])[:6]
    assert [b for b in tied if experts[b] == 5] == sorted(first_six)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 10, 16, 30])
@pytest.mark.parametrize("method", ["power_law", "mdl"])
def test_equal_scores_spread_spare_units_evenly_over_budgets(n: int, method: str) -> None:
    """All-equal scores at 400 consecutive totals: each layout is uniform up to one unit, and over the
    budgets every block takes about 1/n of the spare units (index order gave block 0 one at every total
    not divisible by n: up to twice its share)."""
    fn = power_law if method == "power_law" else mdl
    spare = np.zeros(n)
    for total in range(n + 1, n + 401):
        out = np.array(fn([2.5] * n, total))
        assert out.sum() == total and out.max() - out.min() <= 1
        spare += out - total // n
    share = spare / (spare.sum() / n)
    assert share.min() > 0.8 and share.max() < 1.2, share.round(2)
    assert abs(spare[: n // 2].sum() / spare.sum() - (n // 2) / n) < 0.06


def test_equal_scores_spread_spare_units_evenly_under_params_budgets() -> None:
    """The same under parameter budgets (rounding up by fraction, then the greedy fill): over 400
    budgets each block is above the smallest one about equally often."""
    n = 10
    dims = {b: [(24, 24), (24, 40)] for b in range(n)}
    above = np.zeros(n)
    for budget in range(3000, 3000 + 400 * 40, 40):
        experts = np.array(
            _experts(allocate([1.0] * n, "power_law", f"params:{budget}", block_dims=dims, rank=2))
        )
        above += experts - experts.min()
    share = above / above.mean()
    assert share.min() > 0.8 and share.max() < 1.2, share.round(2)


@FAST
@given(st.integers(1, 40), st.integers(0, 200), st.floats(-3, 100, allow_nan=False), st.booleans())
def test_equal_scores_differ_by_at_most_one_unit(n: int, extra: int, value: float, mdl_method: bool) -> None:
    total = n + extra
    lay = allocate([value] * n, "mdl" if mdl_method else "power_law", f"total_experts:{total}", rank=2)
    experts = _experts(lay)
    assert sum(experts) == total and max(experts) - min(experts) <= 1


def _shrunk_tie(n: int = 14) -> tuple[dict[int, float], dict[int, float]]:
    """Raw scores rising with the block number, all within one standard error of their mean: shrunk
    (k = 1), every block gets exactly the mean (the quickstart's situation, where blocks 0-2 gained
    experts and a higher-scored block 13 did not)."""
    scores = {b: 1.0 + 0.01 * b for b in range(n)}
    return scores, dict.fromkeys(scores, 1.0)


def test_raw_scores_break_a_shrunk_tie_under_total_experts() -> None:
    scores, errors = _shrunk_tie()
    lay = allocate(
        scores,
        "power_law",
        "total_experts:31",
        rank=4,
        score_errors=errors,
        error_shrinkage=1,
        experts_bounds=(1, None),
    )
    # independent reference: 14 x 2 experts, the 3 spare ones to the three highest raw scores
    highest = sorted(scores, key=scores.get, reverse=True)[:3]
    assert _experts(lay) == [3 if b in highest else 2 for b in sorted(scores)]
    assert highest == [13, 12, 11]


@pytest.mark.parametrize("method", ["power_law", "mdl"])
def test_raw_scores_break_a_shrunk_tie_under_a_params_budget(method: str) -> None:
    scores, errors = _shrunk_tie()
    dims = {b: [(16, 16)] for b in scores}
    per_expert = 2 * (16 + 16)  # rank 2: A and B
    router = 16 + 1
    # every block at 2 experts (with router) plus room for exactly 4 more experts (each a router row more)
    budget = 14 * (2 * per_expert + 2 * router) + 4 * (per_expert + router)
    lay = allocate(
        scores, method, f"params:{budget}", block_dims=dims, rank=2, score_errors=errors, error_shrinkage=1
    )
    by_raw = sorted(scores, key=scores.get, reverse=True)
    assert [lay[b]["experts"] for b in by_raw] == [3] * 4 + [2] * 10


def test_raw_scores_rank_tied_blocks_even_when_shrinkage_keeps_an_outlier() -> None:
    """Block 5 stands out beyond its error and keeps most of the gain; the blocks shrunk to the mean tie,
    and among them the spare units go by raw score (block 4 > block 3 > ...), not by index."""
    scores = {0: 1.00, 1: 1.01, 2: 1.02, 3: 1.03, 4: 1.04, 5: 9.0}
    errors = {0: 2.0, 1: 2.0, 2: 2.0, 3: 2.0, 4: 2.0, 5: 0.1}
    lay = allocate(scores, "power_law", "total_experts:20", rank=2, score_errors=errors, error_shrinkage=1)
    tied = _experts(lay)[:5]
    assert tied == sorted(tied) and max(tied) - min(tied) == 1, tied
    assert _experts(lay)[5] > max(tied)
