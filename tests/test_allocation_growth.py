"""Growth allocation (layermoe.allocation.growth): the schedule, the never-shrinking rounds, the unit
rule, the controls and the tie-break. Unit costs are recomputed here from the layout's cost rule
(``block_cost``), not read from the module."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from layermoe.allocation import (
    AllocationError,
    GrowthPlan,
    grow_layout,
    layout_params,
    placebo_grow,
    plan_growth,
    uniform_grow,
)
from layermoe.allocation.growth import _targets, evenly_spaced, spread_order
from layermoe.layout import block_cost

FAST = settings(max_examples=60, deadline=None)


def sizes(mods: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(a + b for a, b in mods), sum(a + 1 for a, _ in mods)


def unit_costs(spec: dict[str, int], mods: list[tuple[int, int]]) -> dict[str, int]:
    s, r = sizes(mods)
    e, k = spec["experts"], spec["rank"]
    base = block_cost(e, k, s, r)
    costs = {"experts": block_cost(e + 1, k, s, r) - base}
    if e > 0:
        costs["rank"] = block_cost(e, k + 1, s, r) - base
    return costs


def preferred(spec: dict[str, int], mods: list[tuple[int, int]], ratio: float = 1.0) -> str:
    """The documented rule: an expert when its A/B parameters pay at least `ratio` x its router."""
    s, r = sizes(mods)
    e, k = spec["experts"], spec["rank"]
    router = 0 if e == 0 else (2 * r if e == 1 else r)
    return "experts" if e == 0 or k * s >= ratio * router else "rank"


def check_round(before, after, dims, allowance, budget):
    """Never shrinks, within the increment and the budget, and no block's next unit still fits."""
    for b in before:
        assert after[b]["experts"] >= before[b]["experts"] and after[b]["rank"] >= before[b]["rank"]
    spent_before, spent = layout_params(before, dims), layout_params(after, dims)
    assert spent <= budget
    assert spent - spent_before <= allowance
    room = min(allowance, budget - spent_before) - (spent - spent_before)
    last = allowance >= budget - spent_before
    for b, spec in after.items():
        costs = unit_costs(spec, dims[b])
        kinds = list(costs) if last else [preferred(spec, dims[b])]
        for kind in kinds:
            if kind in costs:
                assert costs[kind] > room, (b, kind, costs, room)
    return room


block_modules = st.lists(st.tuples(st.integers(2, 24), st.integers(2, 24)), min_size=1, max_size=3)


@st.composite
def growth_cases(draw):
    n = draw(st.integers(1, 8))
    mods = draw(block_modules)
    same = draw(st.booleans())
    dims = {b: mods if same else draw(block_modules) for b in range(n)}
    smallest = sum(block_cost(1, 1, *sizes(m)) for m in dims.values())
    # from below rank 1 in every block (a start on some blocks only) to twelve times it
    budget = max(block_cost(1, 1, *sizes(m)) for m in dims.values()) + draw(st.integers(0, 12 * smallest))
    scores = draw(st.lists(st.floats(-3, 10, allow_nan=False), min_size=n, max_size=n))
    errors = draw(st.lists(st.floats(0, 3, allow_nan=False), min_size=n, max_size=n))
    return {
        "dims": dims,
        "budget": budget,
        "rounds": draw(st.integers(1, 5)),
        "fraction": draw(st.sampled_from([0.1, 0.25, 0.5, 1.0])),
        "scores": dict(enumerate(scores)),
        "errors": dict(enumerate(errors)),
        "shrinkage": draw(st.sampled_from([0.0, 1.0])),
        "method": draw(st.sampled_from(["power_law", "mdl"])),
    }


def arms(case):
    return {
        "scored": lambda lay, a, t: grow_layout(
            lay,
            case["scores"],
            case["dims"],
            a,
            case["budget"],
            method=case["method"],
            score_errors=case["errors"],
            error_shrinkage=case["shrinkage"],
            seed=t,
        ),
        "uniform": lambda lay, a, t: uniform_grow(lay, case["dims"], a, case["budget"], seed=t),
        "placebo": lambda lay, a, t: placebo_grow(
            lay, case["scores"], case["dims"], a, case["budget"], method=case["method"], seed=t
        ),
    }


@pytest.mark.filterwarnings("error")  # an overflow or NaN in the shares would pass the budget checks
@FAST
@given(growth_cases())
# the initial layout already spends the budget and two blocks start empty: mdl's search for nu doubled
# until p + nu c overflowed (found by hypothesis)
@example(
    {
        "dims": {0: [(2, 2)], 1: [(2, 2), (20, 2)], 2: [(2, 15)]},
        "budget": 26,
        "rounds": 1,
        "fraction": 0.1,
        "scores": {0: 0.0, 1: 0.0, 2: 0.0},
        "errors": {0: 0.0, 1: 0.0, 2: 0.0},
        "shrinkage": 0.0,
        "method": "mdl",
    }
)
def test_growth_rounds_never_shrink_never_exceed_and_spend_the_budget(case):
    dims, budget = case["dims"], case["budget"]
    plan = plan_growth(dims, budget, case["rounds"], case["fraction"])
    assert layout_params(plan.initial, dims) == plan.initial_params <= budget
    assert plan.targets[-1] == budget and sum(plan.increments) == budget - plan.initial_params
    covered = [b for b, v in plan.initial.items() if v["experts"]]
    assert covered and len({(plan.initial[b]["experts"], plan.initial[b]["rank"]) for b in covered}) == 1
    if len(covered) < len(dims):  # a start on some blocks: rank 1 on evenly spaced blocks
        assert plan.initial[covered[0]]["rank"] == 1 and covered == evenly_spaced(len(dims), len(covered))
    for name, grow in arms(case).items():
        layout = plan.initial
        for t in range(plan.rounds):
            allowance = plan.allowance(t, layout_params(layout, dims))
            nxt = grow(layout, allowance, t)
            room = check_round(layout, nxt, dims, allowance, budget)
            # each arm spends its increment up to less than one (preferred) unit of the cheapest block
            cheapest = min(unit_costs(v, dims[b])[preferred(v, dims[b])] for b, v in nxt.items())
            assert room < cheapest or t == plan.rounds - 1, name
            layout = nxt
        # the last round: the budget is spent up to less than one unit of any kind of any block
        leftover = budget - layout_params(layout, dims)
        assert all(c > leftover for b, v in layout.items() for c in unit_costs(v, dims[b]).values()), name


@FAST
@given(
    st.lists(st.tuples(st.floats(0, 1e6), st.floats(1e-300, 1), st.floats(1, 1e4)), min_size=1, max_size=8),
    st.floats(0, 1e7),
)
def test_power_law_targets_are_a_water_level(blocks, extra):
    """max(before_l, x w_l unit_l) with one level x that spends the total exactly (power_law, beta 1)."""
    before = np.array([b for b, _, _ in blocks])
    weights = np.array([w for _, w, _ in blocks])
    unit = np.array([u for _, _, u in blocks])
    total = float(before.sum()) + extra
    out = _targets("power_law", weights, unit, before, total, {"beta": 1.0, "shift": False})
    assert np.all(np.isfinite(out)) and np.all(out >= before)
    assert out.sum() == pytest.approx(total, rel=1e-9, abs=1e-6)
    reach = weights * unit
    grown = out > before * (1 + 1e-9) + 1e-6
    if grown.any():  # every grown block sits on one level c; the others are at or above it already
        level = out[grown] / reach[grown]
        assert np.allclose(level, level[0], rtol=1e-6)
        assert np.all(level[0] * reach[~grown] <= before[~grown] * (1 + 1e-6) + 1e-3)


def test_initial_layout_is_the_largest_even_rank_within_the_share():
    dims = {b: [(16, 16), (16, 32)] for b in range(4)}
    s, r = sizes(dims[0])
    plan = plan_growth(dims, 40_000, 3, initial_fraction=0.25)
    rank = plan.initial[0]["rank"]
    assert 4 * block_cost(1, rank, s, r) <= 10_000 < 4 * block_cost(1, rank + 1, s, r)
    rest = 40_000 - plan.initial_params
    assert plan.increments == (rest // 3, 2 * rest // 3 - rest // 3, rest - 2 * rest // 3)
    with pytest.raises(AllocationError, match="below the smallest layout"):
        plan_growth(dims, 50, 3)  # one block at rank 1 costs 80
    with pytest.raises(AllocationError, match="initial_fraction"):
        plan_growth(dims, 40_000, 3, initial_fraction=0)


def test_a_share_below_rank_1_everywhere_starts_on_evenly_spaced_blocks():
    """SmolLM2's q/v sizes: rank 1 on q and v of all 30 blocks costs 57,600; a quarter of 115,200 pays for
    15 blocks (every other one), a quarter of 57,600 for 7."""
    dims = {b: [(576, 576), (576, 192)] for b in range(30)}
    block = block_cost(1, 1, *sizes(dims[0]))
    assert 30 * block == 57_600
    plan = plan_growth(dims, 115_200, 3, initial_fraction=0.25)
    covered = [b for b, v in plan.initial.items() if v["experts"]]
    assert covered == list(range(1, 30, 2)) and plan.initial_params == 15 * block
    assert all(v == {"experts": 0, "rank": 1} for b, v in plan.initial.items() if b not in covered)
    small = plan_growth(dims, 57_600, 3, initial_fraction=0.25)
    assert [b for b, v in small.initial.items() if v["experts"]] == [2, 6, 10, 15, 19, 23, 27]
    assert small.targets[-1] == 57_600 and small.initial_params == 7 * block
    # a budget of less than one block per block starts on one block, and the rounds still spend it
    tiny = plan_growth(dims, 2 * block, 2, initial_fraction=0.1)
    assert sum(v["experts"] for v in tiny.initial.values()) == 1
    assert [evenly_spaced(30, k) for k in (1, 2, 30)] == [[15], [7, 22], list(range(30))]


def test_growth_plan_round_trips_through_json():
    import json

    plan = plan_growth({b: [(16, 16)] for b in range(3)}, 5_000, 4, 0.3)
    back = GrowthPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert back == plan
    with pytest.raises(AllocationError, match="targets"):
        GrowthPlan.from_dict({**plan.to_dict(), "targets": [1, 2]})


def test_unit_rule_grows_rank_while_the_router_outweighs_the_expert():
    # one module 8 -> 8: S = 16, R = 9; rank 1: a second expert's A/B (16) < its router (18): rank unit
    dims = {0: [(8, 8)]}
    one = grow_layout({0: {"experts": 1, "rank": 1}}, [1.0], dims, 16, 10_000)
    assert one == {0: {"experts": 1, "rank": 2}}
    # rank 2: 32 >= 18, so the next unit is an expert (32 + 18 = 50 parameters)
    two = grow_layout(one, [1.0], dims, 50, 10_000)
    assert two == {0: {"experts": 2, "rank": 2}}
    # router_ratio raises the bar: rank 2 pays only 32 < 2 x 18, rank 3 pays 48 >= 36; the expert (66)
    # does not fit the 34 left, which carry to the next round
    assert grow_layout(one, [1.0], dims, 50, 10_000, router_ratio=2.0)[0] == {"experts": 1, "rank": 3}
    # an experts high of 1 leaves rank units only: three of 16
    assert grow_layout(one, [1.0], dims, 50, 10_000, experts_bounds=(1, 1))[0] == {"experts": 1, "rank": 5}


def test_last_round_falls_back_to_rank_units_where_no_expert_fits():
    dims = {0: [(8, 8)], 1: [(8, 8)]}
    start = {0: {"experts": 2, "rank": 4}, 1: {"experts": 2, "rank": 4}}
    spent = layout_params(start, dims)
    # an expert costs 4 * 16 + 9 = 73 > 70, a rank unit 2 * 16 = 32: two rank units in the last round
    last = grow_layout(start, [1.0, 1.0], dims, 70, spent + 70)
    assert sorted(v["rank"] for v in last.values()) == [5, 5]
    # not the last round: nothing fits the preferred unit, so the increment carries over
    assert grow_layout(start, [1.0, 1.0], dims, 70, spent + 1000) == start


def test_ties_go_by_raw_score_then_a_seeded_spread_never_by_index():
    dims = {b: [(8, 8)] for b in range(10)}
    start = {b: {"experts": 2, "rank": 4} for b in range(10)}
    expert = 4 * 16 + 9
    # every score within one standard error of the mean: all shrink to the mean and tie; the higher
    # raw score (block 6) takes the one expert the increment affords
    raw = {b: 1.0 for b in range(10)}
    raw[6] = 1.05
    errors = dict.fromkeys(range(10), 1.0)
    for seed in range(5):
        out = grow_layout(
            start, raw, dims, expert, 10**6, score_errors=errors, error_shrinkage=1.0, seed=seed
        )
        assert [b for b in out if out[b]["experts"] == 3] == [6]
    # exact ties (the case: ten equal scores, two low, shrunk to the mean): three experts go to
    # blocks that differ with the seed, and over seeds every tied block gets one
    raw = dict.fromkeys(range(10), 1.0)
    raw[7] = raw[8] = 0.9
    winners = set()
    for seed in range(30):
        out = grow_layout(
            start, raw, dims, 3 * expert, 10**6, score_errors=errors, error_shrinkage=1.0, seed=seed
        )
        grown = [b for b in out if out[b]["experts"] == 3]
        assert len(grown) == 3
        winners |= set(grown)
    assert winners == set(range(10)) - {7, 8}  # raw scores still rank the two low blocks last


def test_uniform_grow_keeps_equal_blocks_within_one_expert():
    dims = {b: [(16, 16), (16, 16)] for b in range(7)}
    plan = plan_growth(dims, 60_000, 5, 0.2)
    layout = plan.initial
    for t in range(plan.rounds):
        layout = uniform_grow(
            layout, dims, plan.allowance(t, layout_params(layout, dims)), plan.budget, seed=t
        )
        experts = [v["experts"] for v in layout.values()]
        assert max(experts) - min(experts) <= 1
        assert len({v["rank"] for v in layout.values()}) <= 2


def test_spread_order_fills_the_middles_of_the_largest_gaps_first():
    covered = np.zeros(30, dtype=bool)
    covered[[5, 15, 25]] = True
    for seed in range(4):
        key = spread_order(covered, np.random.default_rng(seed).permutation(30))
        first = [int(i) for i in np.argsort(-key)[:2]]
        assert sorted(first) == [10, 20]  # 5 from every adapted block; an end counts at half a gap
        assert np.all(key[covered] == 0) and sorted(key[~covered]) == list(range(1, 28))


def _largest_gap(adapted: list[int], n: int) -> float:
    """The widest stretch without an adapted block, the network's ends counted at half a gap."""
    return max([2 * (adapted[0] + 0.5), 2 * (n - 0.5 - adapted[-1])] + list(np.diff(adapted)))


@pytest.mark.parametrize("budget", [81_408, 152_640, 230_000])
def test_uniform_grow_from_some_blocks_keeps_the_adapted_blocks_evenly_spread(budget):
    """SmolLM2's block (7 projections): a start on evenly spaced blocks; every round's adapted blocks are
    spread within twice the even spacing, rounded up (at random, e.g. blocks 0-3 taken first, they were not)."""
    mods = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    dims = {b: mods for b in range(30)}
    plan = plan_growth(dims, budget, 3)
    layout = plan.initial
    for t in range(plan.rounds):
        layout = uniform_grow(layout, dims, plan.allowance(t, layout_params(layout, dims)), budget, seed=t)
        adapted = [b for b, v in layout.items() if v["experts"] > 0]
        assert _largest_gap(adapted, 30) <= math.ceil(2 * 30 / len(adapted))
    assert layout_params(layout, dims) <= budget


def test_placebo_places_the_scored_increments_at_random():
    dims = {b: [(8, 8)] for b in range(6)}
    start = {b: {"experts": 1, "rank": 4} for b in range(6)}
    scores = {0: 9.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 0.0}
    scored = grow_layout(start, scores, dims, 600, 10**6)
    seen = set()
    for seed in range(8):
        placebo = placebo_grow(start, scores, dims, 600, 10**6, seed=seed)
        # the same increments (blocks share shapes and start), on permuted blocks
        assert sorted(v["experts"] for v in placebo.values()) == sorted(v["experts"] for v in scored.values())
        seen.add(max(placebo, key=lambda b: placebo[b]["experts"]))
    assert len(seen) > 1


def test_growth_refuses_what_it_cannot_do():
    dims = {0: [(8, 8)], 1: [(8, 8)]}
    start = {0: {"experts": 3, "rank": 4}, 1: {"experts": 1, "rank": 4}}
    with pytest.raises(AllocationError, match="above the budget"):
        grow_layout(start, [1.0, 1.0], dims, 10, 100)
    with pytest.raises(AllocationError, match="raise the highs"):
        grow_layout(start, [1.0, 1.0], dims, 10, 10**6, experts_bounds=(1, 2))
    with pytest.raises(AllocationError, match="score_errors"):
        grow_layout(start, [1.0, 1.0], dims, 10, 10**6, error_shrinkage=1.0)
    with pytest.raises(AllocationError, match="allowance"):
        grow_layout(start, [1.0, 1.0], dims, -1, 10**6)


def test_exact_ties_follow_the_rounding_tie_rule():
    """One tie rule for rewiring and growth: equal blocks with equal scores grow in the order of
    rounding.tie_positions (raw scores, the round's total, the round's seed)."""
    from layermoe.allocation.rounding import tie_positions

    dims = {b: [(8, 8)] for b in range(10)}
    start = {b: {"experts": 2, "rank": 4} for b in range(10)}
    spent = layout_params(start, dims)
    allowance = 4 * 16 + 9  # one expert of one block
    for seed in range(5):
        out = grow_layout(start, dict.fromkeys(range(10), 1.0), dims, allowance, 10**6, seed=seed)
        grown = {b for b in out if out[b] != start[b]}
        in_tie_order = list(np.argsort(tie_positions(np.ones(10), spent + allowance, seed)))
        assert grown and grown == set(in_tie_order[: len(grown)])
