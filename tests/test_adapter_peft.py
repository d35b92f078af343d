"""peft interop: our one-expert export loads in peft with equal outputs; a peft LoRA imported into
experts reproduces peft's outputs."""

from __future__ import annotations

import json
import re

import pytest
import torch

from layermoe.adapters import (
    MoELoRAConfig,
    apply_layout,
    export_peft,
    inject,
    layout,
    load_peft,
    named_moe_layers,
)

from .test_adapter_helpers import randomize  # noqa: F401
from .tiny_models import random_tokens, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def save_trained_peft(peft_model, ids, folder) -> torch.Tensor:
    """Give a fresh peft LoRA non-zero B factors (seeded), save it to ``folder``; its logits on ``ids``."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    peft_model.eval()
    peft_model.save_pretrained(str(folder))
    return logits(peft_model, ids)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_export_loads_in_peft_with_equal_outputs(build, tmp_path):
    model = build()
    inject(model, MoELoRAConfig(experts=1, rank=4, lora_alpha=8.0))
    apply_layout(model, {0: {"experts": 1, "rank": 6}, 1: {"experts": 1, "rank": 2}})
    for i, layer in enumerate(named_moe_layers(model).values()):
        randomize(layer, seed=i)
    ids = random_tokens()
    ours = logits(model, ids)
    export_peft(model, tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    loaded = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, ids), ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(build(), ids), ours)  # the adapter did something


def test_export_refuses_multi_expert_blocks(tmp_path):
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=2, rank=2))
    with pytest.raises(ValueError, match="block 0 has 2 experts"):
        export_peft(model, tmp_path)


def test_import_peft_lora_into_experts_matches_peft(tmp_path):
    base = tiny_llama()
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 2},
        alpha_pattern={"v_proj": 3},
    )
    peft_model = peft.get_peft_model(base, config)
    ids = random_tokens()
    reference = save_trained_peft(peft_model, ids, tmp_path)

    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=3, rank=8))
    load_peft(model, tmp_path)
    assert layout(model) == {b: {"experts": 3, "rank": 4} for b in range(3)}
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=1e-5)
    # the experts start different (symmetry broken) but each carries the LoRA's delta
    q = model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q.lora_A[:4], q.lora_A[4:8])
    torch.testing.assert_close(q.lora_B[:, :4], q.lora_B[:, 4:8])


def test_import_rejects_modules_that_are_not_adapted(tmp_path):
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "k_proj"]))
    peft_model.save_pretrained(str(tmp_path))
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=2, rank=2, target_modules=["q_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="k_proj' is not an MoE-LoRA layer"):
        load_peft(model, tmp_path)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_import_into_a_bare_base_injects_from_the_adapter_config_and_matches_peft(build, tmp_path):
    targets = ["q_proj", "v_proj", "down_proj"] if build is tiny_llama else ["c_attn", "c_fc"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=build is tiny_gpt2)
    peft_model = peft.get_peft_model(build(), config)
    ids = random_tokens()
    reference = save_trained_peft(peft_model, ids, tmp_path)

    model = build().eval()  # bare: no MoE-LoRA layers, as PeftModel.from_pretrained takes its base
    assert not torch.allclose(logits(model, ids), reference)  # the adapter changes the output
    load_peft(model, tmp_path)
    torch.testing.assert_close(logits(model, ids), reference, atol=1e-5, rtol=1e-5)
    adapted = set(named_moe_layers(model))
    expected = {n for n, _ in peft_model.base_model.model.named_modules() if n.split(".")[-1] in targets}
    assert adapted == expected
    assert all(spec == {"experts": 1, "rank": 4} for spec in layout(model).values())


def test_import_into_a_bare_base_refuses_a_module_it_lacks_and_leaves_the_model_unchanged(tmp_path):
    peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path)
    )
    model = tiny_gpt2()  # no q_proj anywhere
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="is not a linear layer of this model"):
        load_peft(model, tmp_path)
    assert not named_moe_layers(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_layers_with_their_own_alpha_export_to_alpha_pattern_match_peft_and_import_back(tmp_path):
    """Blocks resized with keep_scaling carry alphas other than the config's: peft's own forward with the
    exported alpha_pattern equals ours, and load_peft gives every layer its alpha back (B unchanged)."""
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=1, rank=4, lora_alpha=8.0))
    for i, layer in enumerate(named_moe_layers(model).values()):
        randomize(layer, seed=i)
    apply_layout(model, {0: {"experts": 1, "rank": 6}, 1: {"experts": 1, "rank": 2}}, keep_scaling=True)
    layers = named_moe_layers(model)
    expected_alpha = {0: 12.0, 1: 4.0, 2: 8.0}
    assert all(layer.lora_alpha == expected_alpha[int(n.split(".")[2])] for n, layer in layers.items())
    ids = random_tokens()
    ours = logits(model, ids)
    export_peft(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 8.0
    assert {re.sub(r"\\", "", k): v for k, v in config["alpha_pattern"].items()} == {
        n: layer.lora_alpha for n, layer in layers.items() if layer.lora_alpha != 8.0
    }
    loaded = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(loaded, ids), ours, atol=1e-5, rtol=1e-5)
    back = tiny_llama()
    inject(back, MoELoRAConfig(experts=1, rank=4, lora_alpha=8.0))
    load_peft(back, tmp_path)
    for name, layer in named_moe_layers(back).items():
        assert layer.lora_alpha == layers[name].lora_alpha and layer.config_lora_alpha == 8.0
        assert torch.equal(layer.lora_B, layers[name].lora_B)
    torch.testing.assert_close(logits(back, ids), ours, atol=1e-6, rtol=1e-6)


def test_import_refuses_a_non_positive_alpha_before_changing_the_model(tmp_path):
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(str(tmp_path))
    config_path = tmp_path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["alpha_pattern"] = {"v_proj": 0}
    config_path.write_text(json.dumps(config))
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=2, rank=2, target_modules=["q_proj", "v_proj"]))
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"v_proj has lora_alpha 0\.0 .* must be a finite number > 0"):
        load_peft(model, tmp_path)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
