"""Worked examples from issue 13, the published LayerIF vector, budgets, costs and error messages."""

from __future__ import annotations

import math

import numpy as np
import pytest

from layermoe.allocation import (
    AllocationError,
    Budget,
    allocate,
    block_cost,
    layout_params,
    mdl,
    mdl_quality,
    mdl_units,
    power_law,
)

LAYERIF_MISTRAL_COLA = [
    1,
    9,
    10,
    8,
    9,
    12,
    10,
    7,
    9,
    9,
    9,
    8,
    6,
    9,
    6,
    4,
    7,
    3,
    2,
    1,
    3,
    4,
    2,
    1,
    4,
    1,
    1,
    1,
    1,
    1,
    1,
    1,
]


@pytest.mark.parametrize(
    ("scores", "total", "beta", "expected"),
    [
        ([0, 1, 2, 4], 12, 1.0, [1, 2, 3, 6]),
        ([0, 1, 2, 4], 12, 2.0, [1, 1, 3, 7]),
        ([0.5, 1, 1.5, 3], 16, 3.0, [1, 2, 2, 11]),
    ],
)
def test_power_law_worked_examples(scores, total, beta, expected):
    assert power_law(scores, total, beta=beta, shift=False) == expected
    layout = allocate(scores, "power_law", f"total_experts:{total}", rank=8, beta=beta, shift=False)
    assert [layout[b]["experts"] for b in range(len(scores))] == expected
    assert all(v["rank"] == 8 for v in layout.values())


def test_power_law_shift_lowest_block_gets_minimum():
    # Shift is translation invariant: adding 10 to every score changes nothing, lowest block gets 1.
    a = power_law([0.5, 1, 1.5, 3], 16, beta=3.0, shift=True)
    b = power_law([10.5, 11, 11.5, 13], 16, beta=3.0, shift=True)
    assert a == b and a[0] == 1 and sum(a) == 16


def test_layerif_mistral_cola_vector():
    v = LAYERIF_MISTRAL_COLA
    assert len(v) == 32 and sum(v) == 160 and min(v) >= 1
    assert power_law([x - 1 for x in v], 160, beta=1.0, shift=False) == v
    assert power_law([x - 1 for x in v], 160, beta=1.0, shift=True) == v  # min is 0: shift is a no-op
    as_dict = power_law({b: x - 1 for b, x in enumerate(v)}, 160, shift=False)
    assert as_dict == dict(enumerate(v))


def test_mdl_worked_example():
    units, nu = mdl_units(np.array([1.0, 2, 3, 4]), np.ones(4), 16.0)
    assert nu == pytest.approx(1.24, abs=1e-9)
    # Closed form at nu = 1.24: 0.9 q^2 / 1.74, floored at 1.
    expected = np.maximum(0.9 * np.array([1.0, 2, 3, 4]) ** 2 / 1.74, 1.0)
    np.testing.assert_allclose(units, expected, rtol=1e-9)
    np.testing.assert_allclose(units, [1, 2.069, 4.655, 8.276], atol=5e-4)
    assert units.sum() == pytest.approx(16.0)
    assert mdl([1, 2, 3, 4], 16, tau_fraction=0.0, normalize=None) == [1, 2, 5, 8]


def test_mdl_quality_reading():
    s = np.array([-1.0, 2.0, 4.0, 6.0])
    pos = np.maximum(s, 0)
    tau = 0.05 * np.median(pos)  # median of [0, 2, 4, 6] = 3
    np.testing.assert_allclose(mdl_quality(s, normalize=None), pos + tau)
    np.testing.assert_allclose(mdl_quality(s), (pos + tau) / (pos + tau).mean())
    np.testing.assert_array_equal(mdl_quality(np.array([-3.0, -1.0])), [1.0, 1.0])


def _naive_block_params(experts: int, rank: int, modules: list[tuple[int, int]]) -> int:
    """Count tensor entries module by module, as MoELoRALinear would allocate them."""
    total = 0
    for d_in, d_out in modules:
        total += math.prod((experts * rank, d_in)) + math.prod((d_out, experts * rank))
        if experts > 1:
            total += math.prod((experts, d_in)) + experts
    return total


@pytest.mark.parametrize(("experts", "rank"), [(1, 1), (1, 8), (2, 4), (5, 3)])
def test_block_cost_matches_naive_count(experts, rank):
    mods = [(16, 16), (16, 40), (40, 16)]
    s = sum(a + b for a, b in mods)
    r = sum(a + 1 for a, _ in mods)
    assert block_cost(experts, rank, s, r) == _naive_block_params(experts, rank, mods)
    lay = {"0": {"experts": experts, "rank": rank}, 1: {"experts": 1, "rank": 2}}
    dims = {0: mods, 1: mods}
    assert layout_params(lay, dims) == _naive_block_params(experts, rank, mods) + _naive_block_params(
        1, 2, mods
    )


@pytest.mark.parametrize(
    ("spec", "kind", "value"),
    [
        ("current", "current", None),
        ("params", "params", None),
        ("params:1_000_000", "params", 1_000_000),
        ("params:2e6", "params", 2_000_000),
        ("total_experts:160", "total_experts", 160),
        ({"total_experts": 160}, "total_experts", 160),
        ({"kind": "params", "value": 500}, "params", 500),
        (None, "current", None),
    ],
)
def test_budget_parse(spec, kind, value):
    b = Budget.parse(spec)
    assert (b.kind, b.value) == (kind, value)
    assert Budget.parse(str(b)) == b


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("flops:3", "unknown"),
        ("params:abc", "not a number"),
        ("params:1.5", "whole number"),
        ("total_experts:0", "whole number"),
        ("current:5", "takes no value"),
        ({"params": 1, "total_experts": 2}, "give one of"),
        (3.5, "give a Budget"),
    ],
)
def test_budget_errors(spec, match):
    with pytest.raises(AllocationError, match=match):
        Budget.parse(spec)


def test_params_current_budget_default_keeps_parameter_count():
    dims = {b: [(32, 32), (32, 64)] for b in range(3)}
    cur = {b: {"experts": 3, "rank": 4} for b in range(3)}
    out = allocate({0: 0.1, 1: 5.0, 2: 1.0}, current_layout=cur, block_dims=dims)
    assert layout_params(out, dims) <= layout_params(cur, dims)
    assert out[1]["experts"] >= out[2]["experts"] >= out[0]["experts"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scores": []}, "empty"),
        ({"scores": {}}, "empty"),
        ({"scores": [1.0, float("nan"), 2.0]}, r"block\(s\) \[1\]"),
        ({"scores": {3: 1.0, 7: float("inf")}}, r"block\(s\) \[7\]"),
        ({"budget": "total_experts:3"}, "below the minimum layout"),
        ({"budget": "total_experts:7", "experts_bounds": (2, None)}, "below the minimum layout"),
        ({"budget": "total_experts:30", "experts_bounds": (1, 5)}, "above the maximum layout"),
        ({"experts_bounds": (3, 2)}, "contradictory bounds"),
        ({"experts_bounds": {1: (-1, 2)}}, "low = -1"),
        ({"experts_bounds": {9: (1, 2)}}, "unknown block"),
        ({"rank_bounds": (4, 6), "rank_step": 8}, "no allowed rank"),
        ({"rank": 3, "rank_step": 2}, "outside rank_bounds"),
        ({"budget": "params:100"}, "below the minimum layout"),
        ({"budget": "params:100000", "block_dims": None}, "block_dims"),
        ({"method": "nope"}, "unknown"),
        ({"beta2": 1.0}, "unknown option"),
        ({"scores": [-1.0, 1.0, 2.0, 3.0], "shift": False}, "shift=True"),
        ({"rank_policy": "scores", "budget": "total_experts:8"}, "params budget"),
        ({"max_moves": 2}, "current_layout"),
        ({"rank": None}, "rank="),
    ],
)
def test_errors_name_the_field(kwargs, match):
    args = {
        "scores": [0.0, 1.0, 2.0, 4.0],
        "method": "power_law",
        "budget": "total_experts:8",
        "rank": 4,
        "block_dims": {b: [(8, 8)] for b in range(4)},
    }
    args.update(kwargs)
    with pytest.raises(AllocationError, match=match):
        allocate(**args)


def test_current_layout_must_match_blocks():
    with pytest.raises(AllocationError, match="do not match the scored blocks"):
        allocate([1.0, 2.0], budget="total_experts", current_layout={0: {"experts": 2, "rank": 4}})
