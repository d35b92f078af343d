"""Blocks with 0 experts (issue 22, part 1): no adapter there, forward = the frozen base, and every path
(inject, resize both ways, state_dict, checkpoint checks, adapter artifacts, peft export, allocation,
scoring) handles them.

References are independent of the code under test: a model whose block keeps its experts but with
B = 0 (the same function, built another way), the parameter count from module shapes, peft's own
outputs, and per-sample gradients of an explicitly built one-expert model.
"""

from __future__ import annotations

import pytest
import torch

from layermoe.adapters import (
    MoELoRAConfig,
    apply_layout,
    export_peft,
    inject,
    layout,
    moe_layers,
    named_moe_layers,
)
from layermoe.adapters.layer import lora_init_A
from layermoe.allocation import allocate, layout_params
from layermoe.checkpointing import (
    CheckpointLayoutError,
    load_adapters,
    save_adapters,
    validate_checkpoint_layout,
)
from layermoe.scoring import (
    adapter_block_dim,
    capture_per_sample_gradients,
    capture_plan,
    capture_statistics,
    causal_lm_per_sample_loss,
)
from tests.tiny_models import random_tokens, tiny_llama

ZERO_FIRST = {0: 0, 1: 2, 2: 1}


def _randomize_adapters(model: torch.nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


def _zero_B_reference(model: torch.nn.Module, experts: dict[int, int], empty_block: int) -> torch.nn.Module:
    """Same function as `model` with `empty_block` at 0 experts, built differently: that block keeps
    its experts (2) with B = 0, the other blocks copy `model`'s tensors."""
    reference = tiny_llama()
    inject(reference, MoELoRAConfig(experts={**experts, empty_block: 2}, rank=4, lora_alpha=8.0))
    _randomize_adapters(reference, seed=1)
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if f"layers.{empty_block}." in name and name.endswith("lora_B"):
                param.zero_()
            elif name in own:
                param.copy_(own[name])
    return reference


def _adapter_parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


def _block_dims(model: torch.nn.Module) -> dict[int, list[tuple[int, int]]]:
    return {
        b: [(layer.in_features, layer.out_features) for _, layer in sorted(mods.items())]
        for b, mods in moe_layers(model).items()
    }


def test_inject_with_an_empty_block_has_no_parameters_there_and_is_the_base_there() -> None:
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=ZERO_FIRST, rank=4, lora_alpha=8.0))
    assert layout(model) == {
        0: {"experts": 0, "rank": 4},
        1: {"experts": 2, "rank": 4},
        2: {"experts": 1, "rank": 4},
    }
    assert not [n for n, p in model.named_parameters() if "layers.0." in n and p.requires_grad]
    assert all(not layer.has_adapter for layer in moe_layers(model)[0].values())
    assert _adapter_parameter_count(model) == layout_params(layout(model), _block_dims(model))
    _randomize_adapters(model)
    ids = random_tokens()
    torch.testing.assert_close(_logits(model, ids), _logits(_zero_B_reference(model, ZERO_FIRST, 0), ids))


def test_rewire_removes_a_block_and_adds_it_back_function_preservingly() -> None:
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=2, rank=4, lora_alpha=8.0))
    _randomize_adapters(model)
    ids = random_tokens()
    reports = apply_layout(model, {1: {"experts": 0, "rank": 4}})
    assert {r.new_experts for r in reports} == {0} and all(not r.exact for r in reports)
    assert all(r.discarded_energy == 1.0 for r in reports)
    assert all(not layer.has_adapter for layer in moe_layers(model)[1].values())
    emptied = _logits(model, ids)
    torch.testing.assert_close(emptied, _logits(_zero_B_reference(model, {0: 2, 1: 2, 2: 2}, 1), ids))
    # back: fresh experts (B = 0, A LoRA-initialized), exact, optimizer state of those params reset
    reports = apply_layout(model, {1: {"experts": 3, "rank": 2}})
    assert all(r.exact and r.new_experts == 3 and r.new_rank == 2 for r in reports)
    assert all(value is None for r in reports for value in r.state_map.values())
    assert {k.rsplit(".", 1)[1] for r in reports for k in r.state_map} == {
        "lora_A",
        "lora_B",
        "lora_router_weight",
        "lora_router_bias",
    }
    for layer in moe_layers(model)[1].values():
        assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
        assert layer.lora_A.requires_grad
    torch.testing.assert_close(_logits(model, ids), emptied, atol=0, rtol=0)


def test_state_dict_round_trips_both_ways_between_empty_and_full_layers() -> None:
    source = tiny_llama()
    inject(source, MoELoRAConfig(experts=ZERO_FIRST, rank=4, lora_alpha=8.0))
    _randomize_adapters(source)
    ids = random_tokens()
    target = tiny_llama()
    inject(target, MoELoRAConfig(experts=2, rank=4, lora_alpha=8.0))  # built from a default config
    target.load_state_dict(source.state_dict())
    assert layout(target) == layout(source)
    torch.testing.assert_close(_logits(target, ids), _logits(source, ids), atol=0, rtol=0)
    # and the other way: an empty block receives experts from a checkpoint
    back = tiny_llama()
    inject(back, MoELoRAConfig(experts=0, rank=1, lora_alpha=8.0))
    full = tiny_llama()
    inject(full, MoELoRAConfig(experts=2, rank=4, lora_alpha=8.0))
    _randomize_adapters(full)
    back.load_state_dict(full.state_dict())
    torch.testing.assert_close(_logits(back, ids), _logits(full, ids), atol=0, rtol=0)


def test_checkpoint_layout_check_accepts_empty_layers_and_names_corrupt_ones() -> None:
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=ZERO_FIRST, rank=4))
    state = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    validate_checkpoint_layout({"state_dict": state, "layermoe_layout": layout(model)})
    bad = dict(state)
    bad["model.layers.0.self_attn.q_proj.lora_A"] = torch.zeros(4, 32)
    with pytest.raises(
        CheckpointLayoutError, match=r"layers\.0\.self_attn\.q_proj\.lora_shape says 0 experts"
    ):
        validate_checkpoint_layout({"state_dict": bad})
    wrong = {"state_dict": state, "layermoe_layout": {**layout(model), 0: {"experts": 2, "rank": 4}}}
    with pytest.raises(CheckpointLayoutError, match="block 0"):
        validate_checkpoint_layout(wrong)


def test_adapter_artifacts_round_trip_an_empty_block(tmp_path) -> None:
    source = tiny_llama()
    inject(source, MoELoRAConfig(experts=ZERO_FIRST, rank=4, lora_alpha=8.0))
    _randomize_adapters(source)
    ids = random_tokens()
    save_adapters(source, tmp_path)
    target = tiny_llama()
    assert load_adapters(target, tmp_path) == layout(source)
    torch.testing.assert_close(_logits(target, ids), _logits(source, ids), atol=0, rtol=0)
    # onto a model adapted everywhere: the block is emptied by the load
    adapted = tiny_llama()
    inject(adapted, MoELoRAConfig(experts=1, rank=2, lora_alpha=8.0))
    load_adapters(adapted, tmp_path)
    torch.testing.assert_close(_logits(adapted, ids), _logits(source, ids), atol=0, rtol=0)


def test_peft_export_leaves_empty_blocks_out(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts={0: 1, 1: 0, 2: 1}, rank={0: 4, 1: 4, 2: 2}, lora_alpha=8.0))
    _randomize_adapters(model)
    ids = random_tokens()
    export_peft(model, tmp_path)
    config = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert config.target_modules and not [m for m in config.target_modules if ".layers.1." in m]
    assert not [k for k in (config.rank_pattern or {}) if "layers\\.1\\." in k or ".layers.1." in k]
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    save_adapters(model, tmp_path / "both", peft=True)  # the artifact's peft side agrees
    assert (tmp_path / "both" / "peft" / "adapter_config.json").is_file()


def test_allocation_can_empty_blocks_and_respects_the_budget() -> None:
    scores = {0: 1.0, 1: 2.0, 2: 3.0, 3: 10.0}
    current = {b: {"experts": 2, "rank": 4} for b in scores}
    dims = {b: [(32, 32)] * 3 for b in scores}
    budget = layout_params(current, dims)
    default = allocate(scores, "power_law", "current", current, dims)
    assert min(v["experts"] for v in default.values()) == 1  # the default keeps one expert everywhere
    for method in ("power_law", "mdl"):
        for bounds in ({"experts_bounds": (0, None)}, {"rank_bounds": (0, None)}):
            out = allocate(scores, method, "current", current, dims, **bounds)
            assert out[0]["experts"] == 0 and out[0]["rank"] == 4, (method, bounds, out)
            assert out[3]["experts"] == max(v["experts"] for v in out.values())
            assert layout_params(out, dims) <= budget
        ranked = allocate(
            scores, method, "current", current, dims, rank_policy="scores", experts_bounds=(0, None)
        )
        assert layout_params(ranked, dims) <= budget and all(v["rank"] >= 1 for v in ranked.values())
    # growing back from an empty block
    empty_now = {**current, 0: {"experts": 0, "rank": 4}}
    regrown = allocate(
        {0: 10.0, 1: 1.0, 2: 1.0, 3: 1.0}, "power_law", "current", empty_now, dims, experts_bounds=(0, None)
    )
    assert regrown[0]["experts"] > 0


def test_adapter_scope_scores_an_empty_block_as_a_fresh_expert() -> None:
    """Block 0 has no adapter: its statistics are those of one fresh expert (B = 0, seeded A), computed
    here from an explicitly built one-expert model; the model and the global RNG are left untouched."""
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=ZERO_FIRST, rank=4, lora_alpha=8.0))
    _randomize_adapters(model)
    batches = [
        {"input_ids": random_tokens(batch=4, seed=s), "labels": random_tokens(batch=4, seed=s)}
        for s in (1, 2)
    ]
    rng = torch.get_rng_state()
    stats = capture_statistics(model, batches[:1], batches[1:], causal_lm_per_sample_loss)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(not layer.has_adapter for layer in moe_layers(model)[0].values())
    assert not [n for n in dict(model.named_parameters()) if "layers.0." in n and "lora_" in n]

    explicit = tiny_llama()
    inject(explicit, MoELoRAConfig(experts={**ZERO_FIRST, 0: 1}, rank=4, lora_alpha=8.0))
    own = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)  # the probe's generator, layers in name order
    with torch.no_grad():
        for name, layer in sorted(named_moe_layers(explicit).items()):
            if ".layers.0." in f".{name}":
                layer.lora_A.copy_(
                    lora_init_A(
                        4,
                        layer.in_features,
                        device=torch.device("cpu"),
                        dtype=torch.float32,
                        generator=generator,
                    )
                )
                layer.lora_B.zero_()
            else:
                for attr in ("lora_A", "lora_B", "lora_router_weight", "lora_router_bias"):
                    if getattr(layer, attr) is not None:
                        getattr(layer, attr).copy_(own[f"{name}.{attr}"])
    reference = capture_statistics(explicit, batches[:1], batches[1:], causal_lm_per_sample_loss)
    for block in (0, 1, 2):
        torch.testing.assert_close(stats[block].K_tt, reference[block].K_tt)
        torch.testing.assert_close(stats[block].K_vt, reference[block].K_vt)
    assert float(stats[0].train_sq_norms.sum()) > 0  # the probe's B gradient is not zero
    explicit_grads = capture_per_sample_gradients(model, batches[:1], causal_lm_per_sample_loss)
    assert sorted(explicit_grads) == [1, 2]  # no adapter parameters in block 0 to differentiate


def test_capture_plan_counts_an_empty_block_as_the_probe_expert_scoring_gives_it() -> None:
    """capture_plan makes capture_statistics' plan: an empty block is planned at one expert of its rank
    (what the scoring probe installs), computed here from module shapes; the model is left empty."""
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=ZERO_FIRST, rank=4, lora_alpha=8.0))
    plan = capture_plan(model, samples=8, max_store_bytes=10**9)
    dims = _block_dims(model)
    expected = {b: adapter_block_dim(dims[b], max(e, 1), 4) for b, e in ZERO_FIRST.items()}
    assert {b.block: b.dim for b in plan.blocks} == expected
    assert all(not layer.has_adapter for layer in moe_layers(model)[0].values())
    batches = [{"input_ids": random_tokens(batch=4, seed=1), "labels": random_tokens(batch=4, seed=1)}]
    stats = capture_statistics(model, batches, batches, causal_lm_per_sample_loss, max_store_bytes=10**9)
    assert {b: s.dim for b, s in stats.items()} == expected


def test_four_bit_base_with_an_empty_block() -> None:
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from layermoe.adapters import MoELoRALinear, resize_layer

    torch.manual_seed(0)
    base = bnb.nn.Linear4bit(32, 16, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    base.load_state_dict(torch.nn.Linear(32, 16, bias=False).state_dict())
    base = base.to("cpu")
    layer = MoELoRALinear(base, experts=0, rank=4)
    x = torch.randn(5, 32)
    with torch.no_grad():
        expected = base(x)
        torch.testing.assert_close(layer(x), expected)
    report = resize_layer(layer, experts=2, rank=4, probe=x)
    assert report.exact and layer.lora_A.dtype == torch.float32
    out = layer(x)
    out.pow(2).sum().backward()
    assert layer.lora_B.grad is not None and float(layer.lora_B.grad.abs().sum()) > 0
    torch.testing.assert_close(out.detach(), expected)
