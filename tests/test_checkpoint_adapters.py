"""save_adapters / load_adapters: exact round trip onto a base model, all-or-nothing on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from layermoe.adapters import MoELoRAConfig, apply_layout, inject, layout, named_moe_layers
from layermoe.checkpointing import AdapterArtifactError, load_adapters, save_adapters
from layermoe.checkpointing.adapter_io import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME
from layermoe.checkpointing.integrity import content_digest
from tests.tiny_models import random_tokens, tiny_llama

RESIZED = {0: {"experts": 3, "rank": 2}, 1: {"experts": 1, "rank": 6}, 2: {"experts": 2, "rank": 4}}


def _trained_adapted_model() -> torch.nn.Module:
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=2, rank=4, top_k=None, lora_alpha=8.0, lora_dropout=0.1))
    apply_layout(model, RESIZED)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # stand-in for training: every adapter tensor non-trivial
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_roundtrip_onto_fresh_base_model_reproduces_outputs(tmp_path: Path) -> None:
    source = _trained_adapted_model()
    tokens = random_tokens()
    with torch.no_grad():
        expected = source(tokens).logits
    save_adapters(source, tmp_path)
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert all(".lora_" in key for key in saved)  # adapters only, no base weights
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["layout"] == {
        str(k): v for k, v in RESIZED.items()
    }

    target = tiny_llama()  # same base weights (same seed), no adapters
    assert load_adapters(target, tmp_path) == RESIZED
    target.eval()
    with torch.no_grad():
        assert torch.equal(target(tokens).logits, expected)
    assert {n for n, p in target.named_parameters() if p.requires_grad} == {
        n for n, p in source.named_parameters() if p.requires_grad
    }
    layer = named_moe_layers(target)["model.layers.0.self_attn.q_proj"]
    assert (layer.lora_alpha, layer.lora_dropout_p, layer.top_k) == (8.0, 0.1, None)


def test_load_onto_model_adapted_with_another_layout_resizes_it(tmp_path: Path) -> None:
    source = _trained_adapted_model()
    save_adapters(source, tmp_path)
    target = tiny_llama()
    inject(target, MoELoRAConfig(experts=2, rank=4, lora_alpha=8.0, lora_dropout=0.1))
    load_adapters(target, tmp_path)
    assert layout(target) == RESIZED
    tokens = random_tokens(seed=3)
    with torch.no_grad():
        assert torch.equal(target.eval()(tokens).logits, source(tokens).logits)


def _assert_untouched(model: torch.nn.Module, before: dict[str, torch.Tensor], adapted: bool) -> None:
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert bool(named_moe_layers(model)) == adapted


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        ("shape", r"lora_A has shape \(5, 32\)"),
        ("missing_tensor", r"lacks model\.layers\.1\.mlp\.up_proj\.lora_B"),
        ("lora_shape", r"lora_shape is \[9, 9\] but the saved layout says \[3, 2\]"),
        ("truncated", "cannot be read"),
        ("layout", r"layout\[0\]"),
        ("no_json", "not a layermoe adapter folder"),
    ],
)
def test_corrupt_artifact_fails_clearly_and_leaves_the_model_alone(
    tmp_path: Path, corrupt: str, message: str
) -> None:
    save_adapters(_trained_adapted_model(), tmp_path)
    weights, config = tmp_path / WEIGHTS_NAME, tmp_path / CONFIG_NAME
    tensors = load_file(weights)
    if corrupt == "shape":
        tensors["model.layers.0.self_attn.q_proj.lora_A"] = torch.zeros(5, 32)
        save_file(tensors, weights)
    elif corrupt == "missing_tensor":
        del tensors["model.layers.1.mlp.up_proj.lora_B"]
        save_file(tensors, weights)
    elif corrupt == "lora_shape":
        tensors["model.layers.0.mlp.up_proj.lora_shape"] = torch.tensor([9, 9])
        save_file(tensors, weights)
    elif corrupt == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif corrupt == "layout":
        data = json.loads(config.read_text())
        data["layout"]["0"] = {"experts": 3}
        config.write_text(json.dumps(data))
    elif corrupt == "no_json":
        config.unlink()
    for adapted in (False, True):
        model = tiny_llama()
        if adapted:
            inject(model, MoELoRAConfig(experts=2, rank=4, lora_alpha=8.0, lora_dropout=0.1))
        before = _snapshot(model)
        with pytest.raises(AdapterArtifactError, match=message):
            load_adapters(model, tmp_path)
        _assert_untouched(model, before, adapted)


def test_wrong_base_model_and_mismatched_hyperparameters_are_refused(tmp_path: Path) -> None:
    save_adapters(_trained_adapted_model(), tmp_path)
    wider = tiny_llama(hidden=48)
    before = _snapshot(wider)
    with pytest.raises(AdapterArtifactError, match="does not fit this model"):
        load_adapters(wider, tmp_path)
    _assert_untouched(wider, before, adapted=False)
    other_alpha = tiny_llama()
    inject(other_alpha, MoELoRAConfig(experts=2, rank=4, lora_alpha=16.0, lora_dropout=0.1))
    before = _snapshot(other_alpha)
    with pytest.raises(
        AdapterArtifactError, match="lora_alpha=16.0 but the adapters were trained with lora_alpha=8.0"
    ):
        load_adapters(other_alpha, tmp_path)
    _assert_untouched(other_alpha, before, adapted=True)
    with pytest.raises(AdapterArtifactError, match="no MoE-LoRA layers"):
        save_adapters(tiny_llama(), tmp_path / "x")


def test_one_expert_layout_also_exports_to_peft_matching_outputs(tmp_path: Path) -> None:
    from peft import PeftModel

    source = tiny_llama()
    inject(source, MoELoRAConfig(experts=1, rank=4, lora_alpha=8.0))
    apply_layout(source, {0: {"experts": 1, "rank": 2}, 2: {"experts": 1, "rank": 6}})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in source.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    save_adapters(source, tmp_path, peft=True)
    tokens = random_tokens(seed=2)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft").eval()
    with torch.no_grad():
        ours = source.eval()(tokens).logits
        torch.testing.assert_close(peft_model(tokens).logits, ours, rtol=1e-5, atol=1e-5)
    restored = tiny_llama()
    load_adapters(restored, tmp_path)
    with torch.no_grad():
        assert torch.equal(restored.eval()(tokens).logits, ours)


def test_peft_export_of_a_multi_expert_layout_is_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(AdapterArtifactError, match=r"blocks \[0, 2\] have \[2, 3\]"):
        save_adapters(_trained_adapted_model(), tmp_path / "out", peft=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "other", [lambda: tiny_llama(seed=1), lambda: tiny_llama(num_blocks=4), lambda: tiny_llama(num_blocks=2)]
)
def test_adapters_are_not_loaded_onto_another_base_silently(tmp_path: Path, other) -> None:
    """Issue 24: another base (other weights, more or fewer blocks) is refused naming the fingerprints;
    ``allow_other_base=True`` loads anyway where the shapes fit."""
    save_adapters(_trained_adapted_model(), tmp_path)
    assert "fingerprint" in json.loads((tmp_path / CONFIG_NAME).read_text())["base"]
    model = other()
    before = _snapshot(model)
    with pytest.raises(AdapterArtifactError, match="trained on another base model|does not have"):
        load_adapters(model, tmp_path)
    _assert_untouched(model, before, adapted=False)
    if model.config.num_hidden_layers >= 3:
        assert load_adapters(model, tmp_path, allow_other_base=True) == RESIZED


def _flip_inside(path: Path, data: bytes, count: int = 64) -> None:
    raw = path.read_bytes()
    start = raw.find(data) + len(data) // 2
    assert start >= len(data) // 2
    path.write_bytes(raw[:start] + bytes(b ^ 0xFF for b in raw[start : start + count]) + raw[start + count :])


def test_flipped_bytes_in_either_file_are_refused_and_leave_the_model_alone(tmp_path: Path) -> None:
    trained = _trained_adapted_model()
    save_adapters(trained, tmp_path / "a")
    save_adapters(trained, tmp_path / "b")
    name = "model.layers.0.self_attn.q_proj.lora_A"
    _flip_inside(
        tmp_path / "a" / WEIGHTS_NAME,
        trained.get_submodule(name.rpartition(".")[0]).lora_A.detach().numpy().tobytes(),
    )
    config = tmp_path / "b" / CONFIG_NAME
    data = json.loads(config.read_text())
    data["config"]["lora_alpha"] = 9.0  # parses and validates, but is not what was trained
    config.write_text(json.dumps(data))
    for folder, message in (
        ("a", rf"1 tensors do not match their checksums \({name}\)"),
        ("b", "does not match its checksum"),
    ):
        model = tiny_llama()
        before = _snapshot(model)
        with pytest.raises(AdapterArtifactError, match=message):
            load_adapters(model, tmp_path / folder)
        _assert_untouched(model, before, adapted=False)


def test_non_finite_adapters_are_never_written(tmp_path: Path) -> None:
    model = _trained_adapted_model()
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.up_proj").lora_B.view(-1)[3] = float("inf")
    with pytest.raises(
        AdapterArtifactError, match=r"Refusing to save .*\(model\.layers\.1\.mlp\.up_proj\.lora_B\)"
    ):
        save_adapters(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_artifacts_written_before_checksums_still_load(tmp_path: Path) -> None:
    trained = _trained_adapted_model()
    save_adapters(trained, tmp_path)
    config = tmp_path / CONFIG_NAME
    data = json.loads(config.read_text())
    assert data["version"] == FORMAT_VERSION == 3 and "checksums" in data
    del data["checksums"]
    data["version"] = 1  # what the previous release wrote
    config.write_text(json.dumps(data))
    model = tiny_llama().eval()
    load_adapters(model, tmp_path)
    tokens = random_tokens(2, 8)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, trained(tokens).logits)


KEPT = {0: {"experts": 3, "rank": 5}, 1: {"experts": 1, "rank": 3}}  # rank changes that keep the scaling


def _layer_alphas(model: torch.nn.Module) -> dict[str, float]:
    return {name: layer.lora_alpha for name, layer in named_moe_layers(model).items()}


def test_layers_own_alphas_round_trip_through_an_artifact(tmp_path: Path) -> None:
    source = _trained_adapted_model()
    apply_layout(source, KEPT, keep_scaling=True)
    alphas = _layer_alphas(source)
    assert {alphas[f"model.layers.{b}.self_attn.q_proj"] for b in range(3)} == {8.0 * 5 / 2, 8.0 * 3 / 6, 8.0}
    tokens = random_tokens()
    with torch.no_grad():
        expected = source(tokens).logits
    save_adapters(source, tmp_path)
    manifest = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert manifest["version"] == 3 and manifest["config"]["lora_alpha"] == 8.0  # the config's alpha
    assert float(load_file(tmp_path / WEIGHTS_NAME)["model.layers.0.mlp.up_proj.lora_layer_alpha"]) == 20.0
    for adapted in (False, True):  # onto the bare base, and onto a model built from the config
        target = tiny_llama()
        if adapted:
            inject(target, MoELoRAConfig(experts=2, rank=4, lora_alpha=8.0, lora_dropout=0.1))
        load_adapters(target, tmp_path)
        assert _layer_alphas(target) == alphas
        with torch.no_grad():
            assert torch.equal(target.eval()(tokens).logits, expected)


def test_a_version_2_artifact_loads_its_layers_with_the_config_alpha(tmp_path: Path) -> None:
    """What the previous release wrote: checksummed, without lora_layer_alpha tensors."""
    trained = _trained_adapted_model()
    save_adapters(trained, tmp_path)
    weights, config = tmp_path / WEIGHTS_NAME, tmp_path / CONFIG_NAME
    tensors = {k: v for k, v in load_file(weights).items() if not k.endswith(".lora_layer_alpha")}
    save_file(tensors, weights, metadata={"format": "pt"})
    data = json.loads(config.read_text())
    data["version"] = 2
    data["checksums"]["tensors"] = {k: v for k, v in data["checksums"]["tensors"].items() if k in tensors}
    data["checksums"]["manifest"] = content_digest({k: v for k, v in data.items() if k != "checksums"})
    config.write_text(json.dumps(data))
    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=2, rank=4, lora_alpha=8.0, lora_dropout=0.1))
    apply_layout(model, KEPT, keep_scaling=True)  # alphas moved: the artifact's layers trained with 8
    load_adapters(model, tmp_path)
    assert set(_layer_alphas(model).values()) == {8.0}
    tokens = random_tokens(2, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(tokens).logits, trained(tokens).logits)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), 0.0])
def test_a_corrupt_layer_alpha_is_refused_naming_it(tmp_path: Path, bad: float) -> None:
    save_adapters(_trained_adapted_model(), tmp_path)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["model.layers.2.self_attn.v_proj.lora_layer_alpha"] = torch.tensor(bad, dtype=torch.float64)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = tiny_llama()
    before = _snapshot(model)
    with pytest.raises(AdapterArtifactError, match=r"v_proj\.lora_layer_alpha is .* not a finite number > 0"):
        load_adapters(model, tmp_path)
    _assert_untouched(model, before, adapted=False)
