"""Batched resize planning (apply_layout's default) gives exactly the per-layer plan."""

from __future__ import annotations

import copy

import pytest
import torch

from layermoe.adapters import MoELoRAConfig, apply_layout, inject, layout, named_moe_layers

from .test_adapter_helpers import randomize
from .test_adapter_inject import smollm2_shaped


def _model(blocks: int, experts: int, rank: int, seed: int) -> torch.nn.Module:
    model = smollm2_shaped(blocks)
    inject(model, MoELoRAConfig(experts=experts, rank=rank))
    for i, layer in enumerate(named_moe_layers(model).values()):
        randomize(layer, seed=seed + i)
        with torch.no_grad():
            layer.lora_routing_mass.copy_(
                torch.rand(layer.experts, generator=torch.Generator().manual_seed(i))
            )
    return model


def _resize_both(model, new_layout, seed, routing_mass=None):
    batched, single = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(seed)
    reports_b = apply_layout(batched, new_layout, routing_mass=routing_mass)
    rng_b = torch.get_rng_state()
    torch.manual_seed(seed)
    reports_s = apply_layout(single, new_layout, routing_mass=routing_mass, batched=False)
    assert torch.equal(rng_b, torch.get_rng_state())  # the same draws from the global RNG
    return batched, single, reports_b, reports_s


def _assert_same(batched, single, reports_b, reports_s):
    """Tensors bit for bit; the reports' floats to float64 rounding (they are sums in another order)."""
    assert layout(batched) == layout(single)
    state_b, state_s = batched.state_dict(), single.state_dict()
    assert state_b.keys() == state_s.keys()
    for name in (n for n in state_b if "lora_" in n):  # base weights are uninitialized (skip_init)
        assert torch.equal(state_b[name], state_s[name]), name
    assert [r.module for r in reports_b] == [r.module for r in reports_s]
    for rb, rs in zip(reports_b, reports_s, strict=True):
        assert (rb.operations, rb.exact) == (rs.operations, rs.exact), rb.module
        assert rb.discarded_energy == pytest.approx(rs.discarded_energy, rel=1e-5, abs=1e-12)
        assert rb.discarded_norm == pytest.approx(rs.discarded_norm, rel=1e-5, abs=1e-12)
        assert rb.state_map.keys() == rs.state_map.keys()
        for key, map_b in rb.state_map.items():
            map_s = rs.state_map[key]
            assert (map_b is None) == (map_s is None), key
            if map_b is not None:
                assert map_b.dim == map_s.dim and torch.equal(map_b.index, map_s.index), key
                assert torch.equal(map_b.scale, map_s.scale), key


def test_batched_plan_equals_per_layer_plan_for_every_kind_of_resize():
    """8 SmolLM2-shaped blocks (4 shapes of modules): grow, shrink, add, remove and their combinations,
    several blocks per transition so groups hold many layers."""
    model = _model(blocks=8, experts=4, rank=4, seed=0)
    new_layout = {
        0: {"experts": 6, "rank": 4},  # add
        1: {"experts": 6, "rank": 4},
        2: {"experts": 2, "rank": 4},  # remove (merges)
        3: {"experts": 1, "rank": 4},  # remove down to one expert: router dropped
        4: {"experts": 4, "rank": 8},  # grow rank
        5: {"experts": 4, "rank": 2},  # shrink rank (truncated SVD)
        6: {"experts": 3, "rank": 8},  # grow + remove
        7: {"experts": 7, "rank": 2},  # shrink + add
    }
    _assert_same(*_resize_both(model, new_layout, seed=1))


def test_batched_plan_equals_per_layer_plan_after_splits_and_with_given_routing_mass():
    """Removing just-split copies takes the exact-merge branch (identical router rows); a second rewire
    from the first's result, with explicit routing masses, stays identical too."""
    model = _model(blocks=6, experts=2, rank=4, seed=3)
    first = {b: {"experts": 5, "rank": 4} for b in range(6)}
    batched, single, rb, rs = _resize_both(model, first, seed=5)
    _assert_same(batched, single, rb, rs)
    second = {b: {"experts": [1, 2, 3][b % 3], "rank": [2, 4, 8][b // 2]} for b in range(6)}
    mass = {b: torch.rand(5, generator=torch.Generator().manual_seed(b)) for b in range(6)}
    _assert_same(*_resize_both(single, second, seed=6, routing_mass=mass))


def test_batched_plan_equals_per_layer_plan_with_resizes_to_and_from_zero_experts():
    """Blocks emptied (experts -> 0) and refilled (0 -> experts, at another rank) in the same layouts as
    ordinary resizes: the batched apply_layout equals the per-layer one bit for bit, with the same
    global RNG draws (one seed per resized layer, in layer order, whatever path plans it)."""
    model = _model(blocks=6, experts=3, rank=4, seed=7)
    first = {
        0: {"experts": 0, "rank": 4},  # to 0
        1: {"experts": 0, "rank": 2},  # to 0 with a new remembered rank
        2: {"experts": 5, "rank": 4},
        3: {"experts": 2, "rank": 8},
        4: {"experts": 5, "rank": 4},  # same transition as block 2: a group of many layers
    }
    batched, single, rb, rs = _resize_both(model, first, seed=11)
    _assert_same(batched, single, rb, rs)
    assert {b: e["experts"] for b, e in layout(single).items() if e["experts"] == 0} == {0: 0, 1: 0}
    second = {
        0: {"experts": 2, "rank": 4},  # from 0
        1: {"experts": 1, "rank": 6},  # from 0 at another rank
        2: {"experts": 0, "rank": 4},  # to 0 again
        3: {"experts": 3, "rank": 8},
        5: {"experts": 1, "rank": 2},
    }
    _assert_same(*_resize_both(single, second, seed=12))


def test_fresh_experts_of_a_resize_from_zero_come_from_the_layers_own_generator():
    """The 0 -> E resize draws its A from surgery.layer_generator (one draw of the global RNG seeds the
    layer's generator), the same mechanism as every other resize: reproduced here by hand."""
    from layermoe.adapters.layer import lora_init_A

    model = _model(blocks=2, experts=2, rank=4, seed=0)
    apply_layout(model, {1: {"experts": 0, "rank": 4}})
    layers = {n: layer for n, layer in named_moe_layers(model).items() if ".layers.1." in f".{n}"}
    torch.manual_seed(3)
    expected = {}
    for name, layer in layers.items():  # apply_layout's order: the block's layers in name order
        seed = int(torch.randint(0, 2**62, (1,)))
        generator = torch.Generator().manual_seed(seed)
        expected[name] = lora_init_A(
            3 * 2, layer.in_features, device=torch.device("cpu"), dtype=torch.float32, generator=generator
        )
    after_draws = torch.get_rng_state()
    torch.manual_seed(3)
    apply_layout(model, {1: {"experts": 3, "rank": 2}})
    assert torch.equal(torch.get_rng_state(), after_draws)  # nothing drawn from the global RNG besides
    for name, layer in layers.items():
        assert torch.equal(layer.lora_A.detach(), expected[name]), name
        assert torch.count_nonzero(layer.lora_B) == 0
