"""Hysteresis and the cap on units moved per rewire, relative to the current layout."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from layermoe.allocation import allocate, layout_params

FAST = settings(max_examples=60, deadline=None)


def experts(layout: dict) -> list[int]:
    return [layout[b]["experts"] for b in sorted(layout)]


def added_units(before: dict, after: dict) -> int:
    return sum(max(after[b]["experts"] - before[b]["experts"], 0) for b in before)


case = st.integers(2, 8).flatmap(
    lambda n: st.tuples(
        st.lists(st.floats(0, 10, allow_nan=False), min_size=n, max_size=n),
        st.lists(st.integers(1, 6), min_size=n, max_size=n),
    )
)


@FAST
@given(case, st.sampled_from(["power_law", "mdl"]), st.integers(0, 6))
def test_cap_limits_moves_and_moves_toward_target(sc, method, cap):
    scores, cur_e = sc
    cur = {b: {"experts": e, "rank": 4} for b, e in enumerate(cur_e)}
    target = allocate(scores, method, "total_experts", cur)
    out = allocate(scores, method, "total_experts", cur, max_moves=cap)
    assert sum(experts(out)) == sum(cur_e)
    assert added_units(cur, out) <= cap
    assert added_units(cur, out) == min(cap, added_units(cur, target))
    for b in cur:
        lo, hi = sorted((cur[b]["experts"], target[b]["experts"]))
        assert lo <= out[b]["experts"] <= hi  # never past the target, never the wrong way
    assert allocate(scores, method, "total_experts", cur, max_moves=0) == cur


@FAST
@given(case, st.sampled_from(["power_law", "mdl"]), st.integers(1, 4))
def test_repeated_capped_rewires_reach_the_target(sc, method, cap):
    scores, cur_e = sc
    layout = {b: {"experts": e, "rank": 4} for b, e in enumerate(cur_e)}
    target = allocate(scores, method, "total_experts", layout)
    needed = added_units(layout, target)
    for _ in range(-(-needed // cap)):
        layout = allocate(scores, method, "total_experts", layout, max_moves=cap)
    assert layout == target


@FAST
@given(case, st.sampled_from(["power_law", "mdl"]))
def test_hysteresis_freezes_small_changes(sc, method):
    scores, cur_e = sc
    cur = {b: {"experts": e, "rank": 4} for b, e in enumerate(cur_e)}
    target = allocate(scores, method, "total_experts", cur)
    dist = {b: abs(target[b]["experts"] - cur[b]["experts"]) for b in cur}
    # Everything frozen: nothing moves.
    assert allocate(scores, method, "total_experts", cur, hysteresis=max(dist.values()) + 1) == cur
    # Threshold 2: blocks that would change by one unit keep their size. The budget equals the current
    # total, so transfers among the unfrozen blocks keep it exact without touching the frozen ones.
    out = allocate(scores, method, "total_experts", cur, hysteresis=2)
    assert sum(experts(out)) == sum(cur_e)
    assert all(out[b] == cur[b] for b in cur if dist[b] < 2)
    for b in cur:  # unfrozen blocks move toward their target, never past it
        lo, hi = sorted((cur[b]["experts"], target[b]["experts"]))
        assert lo <= out[b]["experts"] <= hi


def test_hysteresis_worked_example():
    cur = {b: {"experts": 4, "rank": 8} for b in range(4)}
    # target [1, 3, 4, 8]: blocks 1 (change 1) and 2 (change 0) are frozen; block 3 gets what block 0 gives.
    assert experts(allocate([0, 1, 2, 4], "power_law", "total_experts", cur, shift=False)) == [1, 3, 4, 8]
    out = allocate([0, 1, 2, 4], "power_law", "total_experts", cur, hysteresis=2, shift=False)
    assert experts(out) == [1, 4, 4, 7]


@FAST
@given(case, st.sampled_from(["power_law", "mdl"]), st.integers(0, 5), st.sampled_from(["fixed", "scores"]))
def test_params_budget_with_cap_never_exceeded(sc, method, cap, policy):
    scores, cur_e = sc
    dims = {b: [(16, 16), (16, 24)] for b in range(len(cur_e))}
    cur = {b: {"experts": e, "rank": 4} for b, e in enumerate(cur_e)}
    out = allocate(scores, method, "current", cur, dims, max_moves=cap, rank_policy=policy, rank_step=2)
    assert layout_params(out, dims) <= layout_params(cur, dims)
    ups = sum(
        max(out[b]["experts"] - cur[b]["experts"], 0) + max(out[b]["rank"] - cur[b]["rank"], 0) // 2
        for b in cur
    )
    assert ups <= cap
    assert allocate(scores, method, "current", cur, dims, max_moves=0, rank_policy=policy, rank_step=2) == cur
