"""The plain-data formats in ``layermoe.layout`` and the budget resolution built on them.

References are independent: layer tensors counted entry by entry, experts summed by hand, the routed
hidden activations recomputed per expert with an explicit loop, ``allocate``'s signature read directly.
"""

from __future__ import annotations

import inspect
import io
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from layermoe.adapters import MoELoRAConfig, MoELoRALinear, inject, layout, moe_layers
from layermoe.allocation import ALLOCATE_OPTIONS, AllocationError, Budget, allocate, check_method_options
from layermoe.callbacks.state import CallbackState, RewirePlan
from layermoe.layout import (
    LAYOUT_KEY,
    effective_top_k,
    is_adapter_key,
    is_int_at_least,
    layout_params,
    normalize_layout,
)
from tests.tiny_models import tiny_llama


def test_the_module_is_a_leaf_without_torch() -> None:
    code = "import sys, layermoe.layout; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_layout_params_counts_the_layers_trainable_entries() -> None:
    model = tiny_llama(num_blocks=3)
    inject(model, MoELoRAConfig(experts={0: 1, 1: 3, 2: 2}, rank={0: 4, 1: 2, 2: 1}))
    dims = {
        b: [(layer.in_features, layer.out_features) for _, layer in sorted(mods.items())]
        for b, mods in moe_layers(model).items()
    }
    counted = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert layout_params(layout(model), dims) == counted
    # the same layout as it comes back from JSON (string keys)
    assert layout_params({str(b): v for b, v in layout(model).items()}, dims) == counted


def test_one_normalizer_for_every_room() -> None:
    raw = {"2": {"experts": 3, "rank": 2.0}, 0: {"experts": np.int64(1), "rank": "4"}}
    assert normalize_layout(raw) == {0: {"experts": 1, "rank": 4}, 2: {"experts": 3, "rank": 2}}
    with pytest.raises(AllocationError, match=r"current_layout\[0\]\['rank'\]"):
        allocate([1.0], budget="total_experts:1", current_layout={0: {"experts": 1, "rank": 0}})
    with pytest.raises(ValueError, match="negative"):
        normalize_layout({-1: {"experts": 1, "rank": 1}})


@pytest.mark.parametrize(("top_k", "experts"), [(None, 4), (1, 4), (3, 4), (4, 4), (9, 4), (2, 1)])
def test_effective_top_k_is_what_the_layer_routes_with(top_k, experts) -> None:
    layer = MoELoRALinear(nn.Linear(6, 5), experts=experts, rank=2, top_k=top_k)
    assert effective_top_k(top_k, experts) == layer.effective_top_k
    selected = None if top_k is None or top_k >= experts else top_k
    assert effective_top_k(top_k, experts) == selected


def test_small_predicates() -> None:
    assert [is_int_at_least(v) for v in (1, np.int32(3), 0, True, 1.0, "2", None)] == [
        True,
        True,
        False,
        False,
        False,
        False,
        False,
    ]
    assert is_int_at_least(0, 0) and not is_int_at_least(1, 2)
    assert is_adapter_key("model.layers.0.q_proj.lora_A") and is_adapter_key("lora_router_bias")
    assert not is_adapter_key("model.layers.0.q_proj.base_layer.weight")
    assert LAYOUT_KEY == "layermoe_layout"


def test_budget_resolve_fixes_the_number_in_its_unit() -> None:
    dims = {b: [(8, 8), (8, 16)] for b in range(2)}
    current = {0: {"experts": 2, "rank": 4}, "1": {"experts": 3, "rank": 2}}
    # by hand: S = (8+8)+(8+16) = 40, R = (8+1)*2 = 18 per block
    params = (2 * 4 * 40 + 2 * 18) + (3 * 2 * 40 + 3 * 18)
    assert Budget.parse("current").resolve(current, dims) == Budget("params", params)
    assert Budget.parse("params").resolve(current, dims) == Budget("params", params)
    assert Budget.parse("params:123").resolve(None) == Budget("params", 123)
    assert Budget.parse("total_experts").resolve(current) == Budget("total_experts", 5)
    assert Budget.parse("total_experts:9").resolve(current) == Budget("total_experts", 9)
    with pytest.raises(AllocationError, match="pass current_layout"):
        Budget.parse("current").resolve(None, dims)
    with pytest.raises(AllocationError, match="block_dims"):
        Budget.parse("current").resolve(current, None)


def test_allocate_options_are_allocates_keyword_arguments() -> None:
    params = inspect.signature(allocate).parameters.values()
    assert set(ALLOCATE_OPTIONS) == {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    check_method_options("mdl", {"gamma": 0.5, "max_moves": 2})
    with pytest.raises(AllocationError, match="betta"):
        check_method_options("power_law", {"betta": 2.0, "rank_step": 2})


def test_state_keeps_the_budget_unit_and_reads_old_checkpoints() -> None:
    state = CallbackState(budget=7, budget_unit="total_experts")
    state.pending = RewirePlan({1: {"experts": 2, "rank": 3}}, {1: 0.25}, step=4, epoch=1).to_dict()
    buffer = io.BytesIO()
    torch.save(state.to_dict(), buffer)
    buffer.seek(0)
    loaded = CallbackState.from_dict(torch.load(buffer, weights_only=True))
    assert loaded.resolved_budget == Budget("total_experts", 7)
    assert loaded.plan == RewirePlan({1: {"experts": 2, "rank": 3}}, {1: 0.25}, step=4, epoch=1)
    # before budget_unit existed the stored number was always a parameter count
    legacy = CallbackState.from_dict({"rewires_done": 0, "budget": 1234})
    assert legacy.resolved_budget == Budget("params", 1234)


@pytest.mark.parametrize("top_k", [None, 2])
def test_gated_hidden_matches_a_per_expert_loop(top_k) -> None:
    torch.manual_seed(0)
    experts, rank = 3, 2
    layer = MoELoRALinear(nn.Linear(5, 4), experts=experts, rank=rank, top_k=top_k, router_init_std=0.5)
    hidden = torch.randn(2, 7, experts * rank, dtype=torch.float64).float()
    logits = torch.randn(2, 7, experts)
    out, probs = layer.gated_hidden(hidden, logits)
    scaling = layer.lora_alpha / rank
    expected = torch.zeros_like(hidden, dtype=torch.float64)
    for b in range(2):
        for t in range(7):
            p = torch.softmax(logits[b, t].double(), dim=-1)
            keep = p.topk(top_k).indices.tolist() if top_k else list(range(experts))
            total = sum(float(p[e]) for e in keep)
            for e in keep:
                cols = slice(e * rank, (e + 1) * rank)
                expected[b, t, cols] = hidden[b, t, cols].double() * float(p[e]) / total * scaling
    assert torch.allclose(out.double(), expected, atol=1e-6)
    assert math.isclose(float(probs.sum()), 14.0, rel_tol=1e-5)
    single = MoELoRALinear(nn.Linear(5, 4), experts=1, rank=rank)
    plain, none = single.gated_hidden(hidden[..., :rank], None)
    assert none is None and torch.equal(plain, hidden[..., :rank] * single.scaling)
