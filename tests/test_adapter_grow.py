"""Function-preserving growth (layermoe.adapters.grow): outputs kept to 1e-6, state maps, gradient init
against an independent SVD, weight gradients against autograd on the base weight, and the step size of
one Adam step before and after a rank growth."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from layermoe.adapters import (
    MoELoRAConfig,
    MoELoRALinear,
    grow_model,
    inject,
    layout,
    moe_layers,
    named_moe_layers,
)
from layermoe.adapters.grow import LORA_ROW_NORM, gradient_directions, grow_layer, weight_gradients
from layermoe.allocation import grow_layout, layout_params, plan_growth
from layermoe.layout import block_cost
from layermoe.scoring import causal_lm_per_sample_loss

from .test_adapter_helpers import randomize
from .test_adapter_resize import make_layer as resize_test_layer
from .tiny_models import random_tokens, tiny_llama


def make_layer(experts=3, rank=4, top_k=None, seed=0):
    """The resize tests' layer (16 -> 12, alpha 8, trained-looking B and router)."""
    layer = resize_test_layer(experts, rank, top_k, seed)
    with torch.no_grad():  # routing mass unequal, so the shared gate's source is not a tie
        layer.lora_routing_mass.copy_(
            torch.linspace(1.0, 2.0, experts) / torch.linspace(1.0, 2.0, experts).sum()
        )
    return layer.eval()


def out(layer, x):
    with torch.no_grad():
        return layer(x)


@pytest.mark.parametrize("init", ["lora", "gradient"])
@pytest.mark.parametrize("keep_scaling", [True, False])
@pytest.mark.parametrize(
    ("experts", "rank", "new_experts", "new_rank"), [(1, 4, 3, 4), (3, 4, 5, 6), (2, 2, 2, 5)]
)
def test_growth_preserves_the_output(init, keep_scaling, experts, rank, new_experts, new_rank):
    layer = make_layer(experts, rank)
    x = torch.randn(20, 16)
    before = out(layer, x)
    gradient = torch.randn(12, 16) if init == "gradient" else None
    report = grow_layer(
        layer, new_experts, new_rank, init=init, gradient=gradient, keep_scaling=keep_scaling, probe=x
    )
    assert (layer.experts, layer.rank) == (new_experts, new_rank)
    assert report.exact and report.output_change < 1e-5
    torch.testing.assert_close(out(layer, x), before, atol=1e-6, rtol=0)
    # every new B column is zero: the capacity added carries nothing yet
    B = layer.lora_B.view(12, new_experts, new_rank)
    assert B[:, experts:].abs().sum() == 0 and B[:, :, rank:].abs().sum() == 0
    expected_alpha = 8.0 * new_rank / rank if keep_scaling else 8.0
    assert layer.lora_alpha == pytest.approx(expected_alpha)


def test_a_plain_new_router_row_would_move_the_output():
    """Why experts share a gate: a fresh expert with B = 0 and a zero router row still takes softmax
    probability from every expert (measured here), which the shared gate avoids exactly."""
    layer = make_layer(3, 4)
    x = torch.randn(20, 16)
    before = out(layer, x)
    naive = make_layer(3, 4)
    with torch.no_grad():
        weight = torch.cat([naive.lora_router_weight, torch.zeros(1, 16)])
        bias = torch.cat([naive.lora_router_bias, torch.zeros(1)])
        naive.install(
            4, 4, torch.cat([naive.lora_A, torch.randn(4, 16)]), torch.cat([naive.lora_B, torch.zeros(12, 4)], 1),
            weight, bias, torch.full((4,), 0.25),
        )  # fmt: skip
    naive_change = float((out(naive, x) - before).norm(dim=-1).max())
    grow_layer(layer, 4)
    exact_change = float((out(layer, x) - before).norm(dim=-1).max())
    assert naive_change > 1e-2 and exact_change < 1e-6


def test_top_k_growth_is_reported_inexact():
    layer = make_layer(4, 2, top_k=2)
    assert not grow_layer(layer, 5).exact


def test_state_map_names_where_old_entries_went():
    layer = make_layer(2, 3)
    old_A, old_B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    report = grow_layer(layer, 3, 5, keep_scaling=False, name="m")
    a_map, b_map = report.state_map["m.lora_A"], report.state_map["m.lora_B"]
    for param, old, mapping in ((layer.lora_A, old_A, a_map), (layer.lora_B, old_B, b_map)):
        kept = mapping.index >= 0
        new = param.detach().index_select(mapping.dim, torch.nonzero(kept).flatten())
        source = old.index_select(mapping.dim, mapping.index[kept]) * (
            mapping.scale[kept].view(1, -1) if mapping.dim == 1 else mapping.scale[kept].view(-1, 1)
        )
        torch.testing.assert_close(new, source)
        assert int(kept.sum()) == old.shape[mapping.dim]  # every old slot is kept, the new ones are fresh


def test_gradient_directions_match_an_independent_svd():
    torch.manual_seed(3)
    G = torch.randn(12, 16, dtype=torch.float64)
    exclude = torch.randn(5, 16, dtype=torch.float64)
    rows = gradient_directions(G, 4, exclude).double()
    # reference: eigenvectors of P G^T G P with P the projector off the row space of `exclude`
    P = torch.eye(16, dtype=torch.float64) - exclude.T @ torch.linalg.pinv(exclude.T)
    vals, vecs = torch.linalg.eigh(P @ G.T @ G @ P)
    top = vecs[:, -4:]
    torch.testing.assert_close(
        rows.norm(dim=1), torch.full((4,), LORA_ROW_NORM, dtype=torch.float64), atol=1e-6, rtol=0
    )
    # same subspace: projecting the rows on the reference's top-4 space keeps their whole norm
    torch.testing.assert_close((rows @ top).norm(dim=1), rows.norm(dim=1), atol=1e-5, rtol=0)
    assert (rows @ exclude.T).abs().max() < 1e-5  # nothing already spanned by the existing rows


def test_gradient_directions_fall_back_to_lora_init_beyond_the_gradient_rank():
    G = torch.outer(torch.randn(12), torch.randn(16))  # rank 1
    rows = gradient_directions(G, 3)
    assert torch.allclose(rows[0].abs(), (G[0] / G[0].norm()).abs() * LORA_ROW_NORM, atol=1e-6)
    assert rows[1:].abs().max() <= 1 / math.sqrt(16)  # LoRA's kaiming-uniform bound
    with pytest.raises(ValueError, match="NaN"):
        gradient_directions(torch.full((2, 2), float("nan")), 1)


def test_weight_gradients_equal_autograd_on_the_base_weight():
    torch.manual_seed(0)
    model = nn.Sequential(MoELoRALinear(nn.Linear(8, 6), experts=2, rank=2), nn.Tanh(),
                          MoELoRALinear(nn.Linear(6, 4), experts=1, rank=3))  # fmt: skip
    randomize(model[0], 1)
    randomize(model[2], 2)
    batches = [torch.randn(5, 3, 8), torch.randn(4, 3, 8)]

    def loss_fn(m, batch):
        return (m(batch) ** 2).sum(dim=(1, 2))

    grads = weight_gradients(model, batches, loss_fn, {"0": model[0], "2": model[2]})
    weights = [model[0].base_layer.weight, model[2].base_layer.weight]
    for w in weights:
        w.requires_grad_(True)
    reference = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        for ref, g in zip(reference, torch.autograd.grad(loss_fn(model, batch).sum(), weights), strict=True):
            ref += g
    torch.testing.assert_close(grads["0"], reference[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["2"], reference[1], atol=1e-5, rtol=1e-5)
    assert model[0].capture_hook is None and all(p.grad is None for p in model.parameters())


def test_weight_gradients_of_a_layer_without_experts_equal_autograd_and_leave_it_empty():
    """A block a growth round adapts for the first time has no adapter in the graph; a temporary probe
    expert (B = 0) puts it there without changing the outputs, and is gone afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(MoELoRALinear(nn.Linear(8, 6), experts=0, rank=2), nn.Tanh(),
                          MoELoRALinear(nn.Linear(6, 4), experts=1, rank=3))  # fmt: skip
    randomize(model[2], 2)
    batch = torch.randn(5, 3, 8)

    def loss_fn(m, b):
        return (m(b) ** 2).sum(dim=(1, 2))

    before = model(batch).detach()
    grads = weight_gradients(model, [batch], loss_fn, {"0": model[0], "2": model[2]})
    weight = model[0].base_layer.weight.requires_grad_(True)
    (reference,) = torch.autograd.grad(loss_fn(model, batch).sum(), [weight])
    torch.testing.assert_close(grads["0"], reference, atol=1e-5, rtol=1e-5)
    assert model[0].experts == 0 and not model[0].has_adapter
    assert torch.equal(model(batch).detach(), before)


def test_gradient_init_gives_the_new_b_columns_the_largest_first_gradient():
    """dL/dB_new = scaling * G A_new^T (one expert, B_new = 0): with A_new the top directions of G off
    the existing rows its norm is scaling * row norm * sqrt(sum of the top squared singular values),
    the most any rows of that norm can get; LoRA's random rows get less."""
    torch.manual_seed(1)
    x = torch.randn(64, 16)
    target = torch.randn(64, 12)
    sizes = {}
    for init in ("lora", "gradient"):
        layer = make_layer(1, 2)
        existing = layer.lora_A.detach().clone()
        loss_fn = lambda m, batch: ((m(batch[0]) - batch[1]) ** 2).sum(dim=1)  # noqa: E731
        G = weight_gradients(layer, [(x, target)], loss_fn, {"m": layer})["m"]
        grow_layer(layer, rank=4, init=init, gradient=G if init == "gradient" else None)
        layer.zero_grad()
        loss_fn(layer, (x, target)).sum().backward()
        sizes[init] = float(layer.lora_B.grad[:, 2:].norm())
    q, _ = torch.linalg.qr(existing.T.double())
    sv = torch.linalg.svdvals(G.double() - G.double() @ q @ q.T)
    expected = layer.scaling * LORA_ROW_NORM * float(sv[:2].pow(2).sum().sqrt())
    assert sizes["gradient"] == pytest.approx(expected, rel=1e-4)
    assert sizes["gradient"] > sizes["lora"], sizes


def adam_step_change(A, B, scaling, G, lr=1e-3):
    """||Delta W after one Adam step - before|| for the delta scaling * B A under the loss <G, delta>,
    split into the part moved by the first `old` slots and the total."""
    A = A.clone().requires_grad_(True)
    B = B.clone().requires_grad_(True)
    opt = torch.optim.Adam([A, B], lr=lr)
    before = (scaling * B @ A).detach()
    (G * (scaling * B @ A)).sum().backward()
    opt.step()
    return A.detach(), B.detach(), (scaling * B @ A).detach() - before


def test_rank_growth_step_size_under_adam():
    """One Adam step with the same gradient G of the loss w.r.t. the block's delta, before and after a
    pure rank growth r -> r'. With the scaling kept (keep_scaling=True) the old slots move exactly as
    before; under alpha/r (old B x r'/r) their B-side move shrinks by r/r', under alpha/sqrt(r) by
    sqrt(r/r') (simulated: the layer uses alpha/r)."""
    torch.manual_seed(0)
    r, r2, alpha = 4, 8, 16.0
    A = torch.randn(r, 32, dtype=torch.float64) / math.sqrt(3 * 32)
    B = torch.randn(24, r, dtype=torch.float64) * 0.05
    G = torch.randn(24, 32, dtype=torch.float64)
    new_A = torch.randn(r2 - r, 32, dtype=torch.float64) / math.sqrt(3 * 32)
    results = {}
    for rule, scale_of in (
        ("alpha/r", lambda k: alpha / k),
        ("alpha/sqrt(r)", lambda k: alpha / math.sqrt(k)),
        ("kept", lambda k: alpha / r),
    ):
        s, s2 = scale_of(r), scale_of(r2)
        _, _, step = adam_step_change(A, B, s, G)
        grown_B = torch.cat([B * (s / s2), torch.zeros(24, r2 - r, dtype=torch.float64)], dim=1)
        grown_A = torch.cat([A, new_A])
        torch.testing.assert_close(s2 * grown_B @ grown_A, s * B @ A)  # function preserved
        A2, B2, total = adam_step_change(grown_A, grown_B, s2, G)
        old_slots = s2 * B2[:, :r] @ A2[:r] - s2 * grown_B[:, :r] @ grown_A[:r]
        results[rule] = (float(old_slots.norm() / step.norm()), float(total.norm() / step.norm()))
    print("\nstep-size ratio after/before rank 4 -> 8 (old slots, whole block):", results)
    assert results["kept"][0] == pytest.approx(1.0, abs=1e-9)
    assert results["alpha/r"][0] < 0.75 and results["alpha/sqrt(r)"][0] < 0.9
    # the same through the layer: keep_scaling leaves the old slots' Adam step unchanged
    ratios = {}
    for keep in (True, False):
        layer = MoELoRALinear(nn.Linear(32, 24), experts=1, rank=r, lora_alpha=alpha).double()
        with torch.no_grad():
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
        _, _, step = adam_step_change(layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling, G)
        grow_layer(layer, rank=r2, keep_scaling=keep)
        A0, B0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
        A2, B2, _ = adam_step_change(A0, B0, layer.scaling, G)
        old_slots = layer.scaling * (B2[:, :r] @ A2[:r] - B0[:, :r] @ A0[:r])
        ratios[keep] = float(old_slots.norm() / step.norm())
    print("through grow_layer (keep_scaling: ratio):", ratios)
    assert ratios[True] == pytest.approx(1.0, abs=1e-6)  # growth plans in float32
    assert ratios[False] == pytest.approx(results["alpha/r"][0], rel=1e-6)


def test_keep_scaling_survives_the_state_dict():
    """The layer persists its alpha (lora_layer_alpha): a layer built from the config loads the grown
    weights with the grown alpha and gives the same outputs, without the caller setting anything.
    (Before the buffer it loaded with the config's alpha: half the grown scaling here.)"""
    layer = make_layer(2, 2)
    x = torch.randn(10, 16)
    grow_layer(layer, rank=4, keep_scaling=True)
    expected = out(layer, x)
    fresh = make_layer(2, 2, seed=5)
    fresh.load_state_dict(layer.state_dict())
    assert (fresh.experts, fresh.rank) == (2, 4)
    assert fresh.lora_alpha == layer.lora_alpha == 2 * fresh.config_lora_alpha
    torch.testing.assert_close(out(fresh, x), expected, atol=0, rtol=0)


def test_growth_rounds_on_a_model_keep_its_output_and_match_the_cost_model():
    """plan_growth -> grow_layout -> grow_model for three rounds on a tiny Llama (gradient init from
    weight_gradients): logits unchanged at every round, the model's layout is the allocated one and its
    trainable adapter parameters are what the allocation's cost rule counts."""
    model = tiny_llama(num_blocks=4)
    blocks = range(4)
    dims = {b: [(32, 32), (32, 16)] for b in blocks}  # q_proj, v_proj (2 kv heads of 8)
    plan = plan_growth(dims, 12_000, 3, initial_fraction=0.3)
    spec = plan.initial[0]
    inject(
        model, MoELoRAConfig(target_modules=["q_proj", "v_proj"], experts=spec["experts"], rank=spec["rank"])
    )
    for block in moe_layers(model).values():
        for seed, layer in enumerate(block.values()):
            randomize(layer, seed, b_std=0.3)
    tokens = random_tokens(batch=4, length=8)
    batch = {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}
    scores = {0: 0.2, 1: 1.5, 2: 0.9, 3: 0.4}
    current = layout(model)
    for t in range(plan.rounds):
        before = out(model, tokens).logits
        nxt = grow_layout(
            current, scores, dims, plan.allowance(t, layout_params(current, dims)), plan.budget, seed=t
        )
        gradients = weight_gradients(model, [batch], causal_lm_per_sample_loss, named_moe_layers(model))
        grow_model(model, nxt, init="gradient", gradients=gradients)
        torch.testing.assert_close(out(model, tokens).logits, before, atol=1e-5, rtol=0)
        assert layout(model) == nxt
        trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        assert trainable == layout_params(nxt, dims)
        current = nxt
    # the last round spent the budget up to less than the cheapest unit of any block (S = 112, R = 66)
    units = [
        block_cost(e + de, k + dk, 112, 66) - block_cost(e, k, 112, 66)
        for e, k in ((v["experts"], v["rank"]) for v in current.values())
        for de, dk in ((1, 0), (0, 1))
    ]
    assert 0 <= plan.budget - layout_params(current, dims) < min(units)
    with pytest.raises(ValueError, match="never removes"):
        grow_model(model, {0: {"experts": 1, "rank": 1}})


@pytest.mark.parametrize("init", ["lora", "gradient"])
def test_growth_gives_a_block_without_adapter_fresh_experts(init):
    layer = make_layer(2, 3)
    x = torch.randn(6, 16)
    base = out(layer.base_layer, x)
    layer.install(0, 3, None, None, None, None, torch.zeros(0))
    gradient = torch.randn(12, 16) if init == "gradient" else None
    report = grow_layer(layer, 2, 4, init=init, gradient=gradient, name="m")
    assert (layer.experts, layer.rank) == (2, 4) and report.exact
    torch.testing.assert_close(out(layer, x), base, atol=1e-6, rtol=0)
    assert all(m is None for m in report.state_map.values()) and len(report.state_map) == 4
    if init == "gradient":  # the four slots of each expert: the top directions of the gradient
        top = torch.linalg.svd(gradient.double()).Vh[:8]
        rows = layer.lora_A.detach().double()
        torch.testing.assert_close((rows @ top.T).norm(dim=1), rows.norm(dim=1), atol=1e-5, rtol=0)
