"""Each MoELoRALinear's own lora_alpha (the `lora_layer_alpha` buffer) and `keep_scaling` rank changes:
the alpha survives state dicts exactly, old state dicts load with the config's alpha, casts keep it exact,
and a rank change with `keep_scaling` keeps the scaling and, measured with one Adam step against the
block before the change, the kept directions' step size."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from layermoe.adapters import (
    MoELoRAConfig,
    MoELoRALinear,
    apply_layout,
    inject,
    named_moe_layers,
    resize_layer,
    rotate_to_singular_basis,
)
from layermoe.adapters.grow import grow_layer
from layermoe.adapters.probe import probe_empty_layers
from layermoe.adapters.resize import grow_rank, shrink_rank
from layermoe.callbacks.transaction import ModuleSnapshot  # the rewire's undo record (read, not changed)
from layermoe.lightning_modules import format_layout_table

from .test_adapter_helpers import layer_reference, naive_adapter_output
from .test_adapter_resize import make_layer, outputs
from .tiny_models import random_tokens, tiny_llama

#: each changes the rank of the test layer (3 experts, rank 4, alpha 8) with the scaling kept
KEPT_RANK_CHANGES = {
    "grow_layer": lambda layer: grow_layer(layer, rank=6, keep_scaling=True),
    "resize grow": lambda layer: resize_layer(layer, rank=6, keep_scaling=True),
    "resize shrink": lambda layer: resize_layer(layer, rank=3, keep_scaling=True),
    "resize grow + experts": lambda layer: resize_layer(layer, experts=2, rank=5, keep_scaling=True),
}


@pytest.mark.parametrize("change", sorted(KEPT_RANK_CHANGES))
def test_a_kept_scaling_survives_the_state_dict_and_the_outputs_are_restored_exactly(change):
    layer = make_layer()
    scaling = layer.scaling
    KEPT_RANK_CHANGES[change](layer)
    assert layer.scaling == pytest.approx(scaling, rel=1e-15) and layer.lora_alpha != 8.0
    x = torch.randn(10, 16)
    expected = outputs(layer, x)
    state = layer.state_dict()
    assert (
        state["lora_layer_alpha"].dtype == torch.float64
        and float(state["lora_layer_alpha"]) == layer.lora_alpha
    )
    fresh = make_layer(seed=5)  # built from the config: alpha 8, rank 4
    fresh.load_state_dict(state)  # strict
    assert (fresh.experts, fresh.rank, fresh.lora_alpha) == (layer.experts, layer.rank, layer.lora_alpha)
    assert fresh.config_lora_alpha == 8.0
    assert torch.equal(outputs(fresh, x), expected)
    torch.testing.assert_close(expected - fresh.base_layer(x), layer_reference(fresh, x).float())


def test_a_state_dict_written_before_the_alpha_buffer_loads_with_the_config_alpha():
    old = make_layer()
    state = {k: v for k, v in old.state_dict().items() if k != "lora_layer_alpha"}  # what releases wrote
    layer = make_layer(seed=3)
    grow_layer(layer, rank=8, keep_scaling=True)  # this layer's alpha is 16 now
    assert layer.lora_alpha == 16.0
    result = layer.load_state_dict(state)  # strict: the absent alpha is not a missing key
    assert not result.missing_keys and not result.unexpected_keys
    assert (layer.rank, layer.lora_alpha, float(layer.lora_layer_alpha)) == (4, 8.0, 8.0)
    x = torch.randn(6, 16)
    torch.testing.assert_close(outputs(layer, x), outputs(old, x), atol=0, rtol=0)


def test_a_partial_state_dict_leaves_the_alpha_alone():
    """Only a whole layer's state (it carries lora_shape) says which alpha it trained with."""
    layer = make_layer()
    grow_layer(layer, rank=8, keep_scaling=True)
    layer.load_state_dict({"lora_B": torch.zeros_like(layer.lora_B)}, strict=False)
    assert layer.lora_alpha == 16.0


@pytest.mark.parametrize("bad", [0.0, -2.0, math.nan, math.inf, [8.0, 8.0]])
def test_a_bad_saved_alpha_is_refused_naming_the_key(bad):
    layer = make_layer()
    state = layer.state_dict()
    state["lora_layer_alpha"] = torch.tensor(bad, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"lora_layer_alpha must be one finite number > 0"):
        make_layer().load_state_dict(state)
    with pytest.raises(ValueError, match=r"MoELoRALinear.lora_alpha must be a finite number > 0"):
        layer.lora_alpha = 0.0
    assert layer.lora_alpha == 8.0


def test_a_cast_of_the_model_keeps_the_alpha_exact():
    """bf16 would round 8 * 7 / 3 = 18.67 to 18.625: the buffer stays the exact float64 of the alpha."""
    layer = make_layer()
    resize_layer(layer, rank=7, keep_scaling=True)
    resize_layer(layer, rank=3, keep_scaling=True)
    alpha = 8.0 * 7 / 4 * 3 / 7
    assert layer.lora_alpha == pytest.approx(alpha, rel=1e-15)
    layer.lora_alpha = 8.0 * 7 / 3
    layer.to(torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16 and layer.lora_layer_alpha.dtype == torch.float64
    assert float(layer.state_dict()["lora_layer_alpha"]) == 8.0 * 7 / 3 == layer.lora_alpha
    layer.half()
    assert float(layer.lora_layer_alpha) == 8.0 * 7 / 3


def test_apply_layout_keeps_each_changed_blocks_scaling_and_the_function():
    torch.manual_seed(0)
    model = tiny_llama().eval()
    inject(model, MoELoRAConfig(experts=2, rank=4, lora_alpha=8.0))
    for layer in named_moe_layers(model).values():
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.1)
    ids = random_tokens()
    with torch.no_grad():
        before = model(ids).logits
    reports = apply_layout(
        model, {0: {"experts": 2, "rank": 8}, 1: {"experts": 2, "rank": 4}}, keep_scaling=True
    )
    alphas = {name: layer.lora_alpha for name, layer in named_moe_layers(model).items()}
    assert {a for n, a in alphas.items() if ".layers.0." in n} == {16.0}
    assert {a for n, a in alphas.items() if ".layers.0." not in n} == {8.0}
    assert all("lora_alpha 8->16 (scaling kept)" in r.operations for r in reports) and reports
    # kept scaling: growth leaves the old B as it was (no r'/r factor in the optimizer-state map either)
    assert all(float(r.state_map[f"{r.module}.lora_B"].scale.max()) == 1.0 for r in reports)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=0)


def test_a_kept_shrink_discards_what_the_default_shrink_discards():
    """The best rank-r' part of the delta does not depend on how it is split into alpha and B."""
    x = torch.randn(12, 16)
    kept, default = make_layer(), make_layer()
    report_kept = shrink_rank(kept, 2, keep_scaling=True)
    report_default = shrink_rank(default, 2)
    assert kept.scaling == pytest.approx(8.0 / 4) and default.scaling == pytest.approx(8.0 / 2)
    assert report_kept.discarded_energy == pytest.approx(report_default.discarded_energy, rel=1e-5)
    torch.testing.assert_close(outputs(kept, x), outputs(default, x), atol=1e-5, rtol=1e-5)


def adam_delta_step(layer: MoELoRALinear, G: torch.Tensor, slots: int, lr: float = 1e-3) -> torch.Tensor:
    """The change of expert 0's delta scaling * B A in its first ``slots`` rank slots after one Adam step
    on the loss <G, delta> (float64 copies of the layer's factors)."""
    r = layer.rank
    A = layer.lora_A.detach()[:r].double().clone().requires_grad_(True)
    B = layer.lora_B.detach()[:, :r].double().clone().requires_grad_(True)
    s = layer.scaling
    before = s * B[:, :slots].detach() @ A[:slots].detach()
    (G * (s * B @ A)).sum().backward()
    torch.optim.Adam([A, B], lr=lr).step()
    return s * B[:, :slots].detach() @ A[:slots].detach() - before


def one_expert_layer(rank: int) -> MoELoRALinear:
    torch.manual_seed(1)
    layer = MoELoRALinear(nn.Linear(32, 24), experts=1, rank=rank, lora_alpha=16.0)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.05)
    return layer


@pytest.mark.parametrize("keep_scaling", [True, False])
def test_growth_through_the_resize_path_keeps_the_old_directions_adam_step_only_with_kept_scaling(
    keep_scaling,
):
    """One Adam step with the same gradient G of the loss w.r.t. the delta, before and after grow_rank
    4 -> 8. Kept scaling: the old slots move exactly as before. Default (alpha / r, old B x 2): the old
    slots' step is measured at 0.62 of before (the B-side move halves, the A-side one stays)."""
    G = torch.randn(24, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    layer = one_expert_layer(4)
    before = adam_delta_step(layer, G, 4)
    grow_rank(layer, 8, keep_scaling=keep_scaling)
    after = adam_delta_step(layer, G, 4)
    ratio = float(after.norm() / before.norm())
    print(f"\ngrow_rank 4 -> 8, keep_scaling={keep_scaling}: old slots' Adam step after/before = {ratio:.4f}")
    if keep_scaling:
        torch.testing.assert_close(after, before, atol=1e-9, rtol=1e-6)  # the layer plans in float32
    else:
        assert 0.4 < ratio < 0.75


@pytest.mark.parametrize("keep_scaling", [True, False])
def test_a_shrink_that_drops_nothing_keeps_the_adam_step_only_with_kept_scaling(keep_scaling):
    """A rank-8 expert whose delta has rank 4, in its singular basis (balanced factors, slots 4..7 zero):
    shrinking to 4 drops nothing. One Adam step with the same G then moves the delta exactly as the
    rank-8 layer did (its zero slots get zero gradients, so Adam leaves them at zero) when the scaling is
    kept; under alpha / r the step grows (measured ~1.4, sqrt(8/4) for balanced factors)."""
    layer = one_expert_layer(8)
    with torch.no_grad():
        layer.lora_B[:, 4:] = 0
    rotate_to_singular_basis(layer)
    G = torch.randn(24, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    before = adam_delta_step(layer, G, 8)
    report = shrink_rank(layer, 4, keep_scaling=keep_scaling)
    assert report.discarded_energy < 1e-10
    after = adam_delta_step(layer, G, 4)
    ratio = float(after.norm() / before.norm())
    print(
        f"\nshrink_rank 8 -> 4 (nothing dropped), keep_scaling={keep_scaling}: Adam step after/before = {ratio:.4f}"
    )
    if keep_scaling:
        torch.testing.assert_close(after, before, atol=1e-8, rtol=1e-5)
    else:
        assert ratio == pytest.approx(math.sqrt(2), rel=0.05)


def test_forward_uses_the_layers_own_alpha():
    """Forward reads the layer's alpha: the naive loop with that alpha is the reference."""
    layer = make_layer()
    layer.lora_alpha = 5.0
    x = torch.randn(4, 16)
    reference = naive_adapter_output(
        x,
        layer.lora_A.detach(),
        layer.lora_B.detach(),
        layer.lora_router_weight.detach(),
        layer.lora_router_bias.detach(),
        layer.experts,
        layer.rank,
        layer.top_k,
        5.0,
    )
    torch.testing.assert_close(
        outputs(layer, x) - layer.base_layer(x), reference.float(), atol=1e-5, rtol=1e-5
    )


def test_a_rewire_rollback_restores_the_alphas():
    """The rewire transaction's undo record rebinds buffers: the alpha buffer is rebound on change (never
    filled in place), so a rolled-back keep_scaling resize leaves alpha, buffer and scaling as before."""
    torch.manual_seed(0)
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=2, rank=4, lora_alpha=8.0))
    snapshot = ModuleSnapshot(model)
    apply_layout(model, {0: {"experts": 2, "rank": 8}}, keep_scaling=True)
    assert {layer.lora_alpha for layer in named_moe_layers(model).values()} == {8.0, 16.0}
    snapshot.restore()
    for layer in named_moe_layers(model).values():
        assert (layer.rank, layer.lora_alpha, float(layer.lora_layer_alpha)) == (4, 8.0, 8.0)


def test_an_empty_blocks_remembered_rank_moves_its_alpha_and_the_probe_keeps_it():
    """A block with 0 experts keeps a rank for when experts return; keep_scaling moves its alpha with that
    rank too (one rule), and the scoring probe's temporary expert leaves it as it was."""
    torch.manual_seed(0)
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=2, rank=4, lora_alpha=8.0))
    apply_layout(model, {0: {"experts": 0, "rank": 4}})
    apply_layout(model, {0: {"experts": 0, "rank": 2}}, keep_scaling=True)
    empty = [layer for name, layer in named_moe_layers(model).items() if ".layers.0." in name]
    assert {(layer.experts, layer.rank, layer.lora_alpha) for layer in empty} == {(0, 2, 4.0)}
    with probe_empty_layers(model):
        assert {(layer.experts, layer.scaling) for layer in empty} == {(1, 2.0)}
    assert {(layer.experts, layer.lora_alpha) for layer in empty} == {(0, 4.0)}
    reports = apply_layout(model, {0: {"experts": 2, "rank": 6}}, keep_scaling=True)
    assert {(layer.experts, layer.rank, layer.lora_alpha) for layer in empty} == {(2, 6, 12.0)}
    assert all(r.operations[-1] == "lora_alpha 4->12 (scaling kept)" for r in reports)


def test_the_layout_table_shows_each_blocks_alpha_last():
    torch.manual_seed(0)
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=2, rank=4, lora_alpha=8.0))
    apply_layout(model, {0: {"experts": 2, "rank": 6}}, keep_scaling=True)
    named_moe_layers(model)["model.layers.1.self_attn.q_proj"].lora_alpha = 2.5  # one module of block 1
    rows = {line.split()[0]: line.split() for line in format_layout_table(model).splitlines()[2:5]}
    assert [rows[b][2] for b in "012"] == ["6", "4", "4"]
    assert [rows[b][-1] for b in "012"] == ["12", "2.5/8", "8"]
