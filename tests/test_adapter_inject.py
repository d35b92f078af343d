"""inject / moe_layers / layout / apply_layout on tiny HF models, and state_dict round trips of resized
models into freshly built ones."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from layermoe.adapters import (
    MoELoRAConfig,
    MoELoRALinear,
    apply_layout,
    block_index,
    inject,
    layout,
    moe_layers,
    named_moe_layers,
    normalize_layout,
)

from .test_adapter_helpers import randomize  # noqa: F401
from .tiny_models import random_tokens, tiny_bert, tiny_gpt2, tiny_llama, tiny_qwen2

# The surgery-speed benchmark's SmolLM2-shaped model: the timing tests here and the batched-resize tests
# resize the same shapes the benchmark times (tests import benchmark modules the same way elsewhere).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from surgery_speed import smollm2_shaped  # noqa: E402

LLAMA_MODULES = {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
FAMILIES = {
    "llama": (tiny_llama, LLAMA_MODULES, "model.layers"),
    "qwen2": (tiny_qwen2, LLAMA_MODULES, "model.layers"),
    "gpt2": (tiny_gpt2, {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}, "transformer.h"),
    "bert": (
        tiny_bert,
        {
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        },
        "encoder.layer",
    ),
}


def run(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_inject_wraps_all_projections_and_starts_as_identity(family):
    build, modules, prefix = FAMILIES[family]
    model = build()
    ids = random_tokens()
    reference = run(model, ids)
    n_blocks = model.config.num_hidden_layers
    groups = inject(model, MoELoRAConfig(experts=3, rank=2, top_k=2))
    assert sorted(groups) == list(range(n_blocks))
    for block, layers in groups.items():
        assert set(layers) == modules
        for rest, layer in layers.items():
            assert model.get_submodule(f"{prefix}.{block}.{rest}") is layer
    torch.testing.assert_close(run(model, ids), reference)  # B = 0: the adapted model starts as the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in trainable)
    assert moe_layers(model) == groups
    assert layout(model) == {b: {"experts": 3, "rank": 2} for b in range(n_blocks)}


def test_adapted_model_matches_manual_delta():
    """A llama with random adapters equals the base model with each wrapped weight's forward patched."""
    model = tiny_llama(num_blocks=2)
    inject(model, MoELoRAConfig(experts=1, rank=2, target_modules=["q_proj", "down_proj"]))
    for i, layer in enumerate(named_moe_layers(model).values()):
        randomize(layer, seed=i)
    reference = tiny_llama(num_blocks=2)
    with torch.no_grad():
        for name, layer in named_moe_layers(model).items():
            base = reference.get_submodule(name)
            base.weight += layer.scaling * layer.lora_B @ layer.lora_A  # one expert: a plain LoRA merge
    ids = random_tokens()
    torch.testing.assert_close(run(model, ids), run(reference, ids), atol=1e-5, rtol=1e-5)


def test_inject_regex_and_per_block_capacity():
    model = tiny_llama(num_blocks=3)
    config = MoELoRAConfig(
        target_modules=r".*\.self_attn\.(q|v)_proj", experts={0: 1, 1: 2, 2: 4}, rank={"0": 2, "1": 4, "2": 8}
    )
    groups = inject(model, config)
    assert {b: set(g) for b, g in groups.items()} == {
        b: {"self_attn.q_proj", "self_attn.v_proj"} for b in range(3)
    }
    assert layout(model) == {
        0: {"experts": 1, "rank": 2},
        1: {"experts": 2, "rank": 4},
        2: {"experts": 4, "rank": 8},
    }


def test_inject_errors_are_clear():
    model = tiny_llama()
    with pytest.raises(ValueError, match="not inside a numbered transformer block"):
        inject(model, MoELoRAConfig(target_modules=["lm_head"]))
    with pytest.raises(TypeError, match="not a linear layer"):
        inject(model, MoELoRAConfig(target_modules=["mlp"]))
    with pytest.raises(ValueError, match="no module"):
        inject(model, MoELoRAConfig(target_modules=["nothing_here"]))
    with pytest.raises(KeyError, match="no entry for block 2"):
        inject(model, MoELoRAConfig(experts={0: 1, 1: 2}))
    assert not named_moe_layers(model)  # every failure left the model untouched
    inject(model, MoELoRAConfig())
    with pytest.raises(ValueError, match="already has MoE-LoRA layers"):
        inject(model, MoELoRAConfig())
    assert block_index("transformer.h.7.attn.c_attn") == 7


def test_normalize_layout():
    assert normalize_layout({"1": {"experts": 2, "rank": 4}, 0: {"experts": 1.0, "rank": "8"}}) == {
        0: {"experts": 1, "rank": 8},
        1: {"experts": 2, "rank": 4},
    }
    for bad, match in [
        ({"x": {"experts": 1, "rank": 1}}, "not a block index"),
        ({0: {"experts": -1, "rank": 1}}, "experts"),
        ({0: {"experts": 1}}, "layout\\[0\\]"),
        ({0: {"experts": 1, "rank": 2.5}}, "rank"),
        ({0: {"experts": 1, "rank": 1}, "0": {"experts": 1, "rank": 1}}, "twice"),
    ]:
        with pytest.raises(ValueError, match=match):
            normalize_layout(bad)


def test_apply_layout_then_state_dict_round_trip_into_fresh_model():
    model = tiny_llama(num_blocks=3)
    config = MoELoRAConfig(experts=2, rank=4, top_k=None)
    inject(model, config)
    for i, layer in enumerate(named_moe_layers(model).values()):
        randomize(layer, seed=i)
    ids = random_tokens()
    before = run(model, ids)
    reports = apply_layout(model, {"0": {"experts": 4, "rank": 6}, 1: {"experts": 1, "rank": 4}})
    assert len(reports) == 2 * 7
    assert all(r.exact for r in reports if r.module.startswith("model.layers.0."))
    assert all(r.state_map and all(k.startswith(r.module + ".") for k in r.state_map) for r in reports)
    assert layout(model) == {
        0: {"experts": 4, "rank": 6},
        1: {"experts": 1, "rank": 4},
        2: {"experts": 2, "rank": 4},
    }
    after = run(model, ids)
    assert not torch.allclose(after, before)  # block 1 merged two experts into one: an approximation
    fresh = tiny_llama(num_blocks=3, seed=5)
    inject(fresh, config)
    result = fresh.load_state_dict(model.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    assert layout(fresh) == layout(model)
    torch.testing.assert_close(run(fresh, ids), after)
    # and through weights_only serialization
    path = "/tmp/layermoe_adapter_roundtrip.pt"
    torch.save(model.state_dict(), path)
    fresh2 = tiny_llama(num_blocks=3, seed=7)
    inject(fresh2, config)
    fresh2.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(run(fresh2, ids), after)


def test_apply_layout_is_all_or_nothing():
    model = tiny_llama(num_blocks=2)
    inject(model, MoELoRAConfig(experts=2, rank=4))
    for layer in named_moe_layers(model).values():
        randomize(layer)
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="no MoE-LoRA layers"):
        apply_layout(model, {0: {"experts": 3, "rank": 4}, 5: {"experts": 1, "rank": 1}})
    # a non-finite value in the last block makes planning fail after block 0 was planned
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.lora_B[0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="non-finite"):
        apply_layout(model, {0: {"experts": 3, "rank": 2}, 1: {"experts": 2, "rank": 2}})
    assert layout(model) == {0: {"experts": 2, "rank": 4}, 1: {"experts": 2, "rank": 4}}
    assert all(p is params[n] for n, p in model.named_parameters())


def test_resize_30_block_model_timing():
    """SmolLM2-135M-sized adapters (30 blocks x 7 modules, d=576): a drastic random re-layout and a
    typical one-step reallocation; times printed, loosely bounded."""
    model = smollm2_shaped()
    inject(model, MoELoRAConfig(experts=4, rank=8))
    for layer in named_moe_layers(model).values():
        randomize(layer)
    generator = torch.Generator().manual_seed(0)
    choices_e, choices_r = [1, 2, 3, 4, 6, 8], [2, 4, 8, 12, 16]
    new = {
        b: {
            "experts": choices_e[int(torch.randint(6, (1,), generator=generator))],
            "rank": choices_r[int(torch.randint(5, (1,), generator=generator))],
        }
        for b in range(30)
    }
    start, start_cpu = time.perf_counter(), time.process_time()
    reports = apply_layout(model, new)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"\n30-block resize ({len(reports)} layers): {elapsed:.3f} s wall, {cpu:.3f} s CPU")
    assert layout(model) == new
    assert all(isinstance(m, MoELoRALinear) for m in named_moe_layers(model).values())
    assert cpu < 10.0  # very loose, on CPU time: wall time on a shared CPU is unreliable; both are printed
    # a typical reallocation step: every block moves by one expert and doubles or halves its rank
    step = {
        b: {
            "experts": max(1, spec["experts"] + (1 if b % 2 else -1)),
            "rank": spec["rank"] * 2 if b % 3 else max(1, spec["rank"] // 2),
        }
        for b, spec in new.items()
    }
    start, start_cpu = time.perf_counter(), time.process_time()
    reports = apply_layout(model, step)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    print(f"30-block one-step reallocation ({len(reports)} layers): {elapsed:.3f} s wall, {cpu:.3f} s CPU")
    assert layout(model) == step


@pytest.mark.parametrize("bits", [4, 8])
def test_inject_into_bitsandbytes_quantized_model(bits, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_llama(num_blocks=2, hidden=64).save_pretrained(tmp_path)
    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    ids = random_tokens()
    reference = run(model, ids)
    # On AVX512-BF16 CPUs that eval pass made bitsandbytes repack the 4-bit weights for its bf16 kernel;
    # inject undoes it, so outputs then match up to that kernel's bf16 arithmetic.
    tolerance = {"atol": 1e-2, "rtol": 1e-2} if _packed_four_bit_layers(model) else {}
    inject(model, MoELoRAConfig(experts=2, rank=4))
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer).__name__ == ("Linear4bit" if bits == 4 else "Linear8bitLt")
    assert layer.lora_A.dtype == torch.float32
    torch.testing.assert_close(run(model, ids), reference, **tolerance)
    assert _packed_four_bit_layers(model) == []  # a later eval pass does not repack either
    model.train()
    model(ids, labels=ids).loss.backward()
    assert layer.lora_B.grad.abs().sum() > 0
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def _packed_four_bit_layers(model: nn.Module) -> list[str]:
    return [
        name
        for name, m in model.named_modules()
        if type(m).__name__ == "Linear4bit"
        and getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
    ]


def test_untargeted_four_bit_layers_pass_gradients_after_an_eval_pass(tmp_path):
    """bitsandbytes repacks 4-bit weights at an eval pass on AVX512-BF16 CPUs into a layout whose matmul
    has no backward; an untargeted layer left that way would cut the gradient of every adapter below it."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not bnb.nn.Linear4bit(8, 32).support_avx512bf16_for_cpu:
        pytest.skip("bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")
    tiny_llama(num_blocks=2, hidden=64).save_pretrained(tmp_path)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant, device_map="cpu")
    ids = random_tokens()
    packed_reference = run(model, ids)
    assert "model.layers.0.self_attn.o_proj" in _packed_four_bit_layers(model)
    inject(model, MoELoRAConfig(experts=2, rank=4, target_modules=["q_proj"]))
    assert _packed_four_bit_layers(model) == []
    torch.testing.assert_close(run(model, ids), packed_reference, atol=1e-2, rtol=1e-2)
    model.train()
    model(ids, labels=ids).loss.backward()
    # block 0's q_proj reaches the loss only through the untargeted 4-bit o_proj and the MLPs above it
    assert model.model.layers[0].self_attn.q_proj.lora_B.grad.abs().sum() > 0


def test_a_task_head_left_frozen_is_warned_about_naming_modules_to_save() -> None:
    import warnings

    from tests.scripts.plugin_projects import tiny_bert_classifier

    with pytest.warns(
        UserWarning, match=r"froze the task head 'classifier' .*modules_to_save=\['classifier'\]"
    ):
        inject(tiny_bert_classifier(), MoELoRAConfig(experts=2, rank=2, target_modules=["query", "value"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kept trainable: nothing to warn about; a causal LM has no task head
        inject(
            tiny_bert_classifier(),
            MoELoRAConfig(
                experts=2, rank=2, target_modules=["query", "value"], modules_to_save=["classifier"]
            ),
        )
        inject(tiny_llama(), MoELoRAConfig(experts=2, rank=2))
