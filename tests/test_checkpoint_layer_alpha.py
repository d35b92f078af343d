"""A layer's own lora_alpha through Lightning checkpoints: a fit whose block was resized with
``keep_scaling`` (alpha 8 -> 12) and a fit resumed from its step-2 checkpoint on a module built from the
config (alpha 8, rank 4 everywhere) end with the same alphas and the same adapter tensors, and
``load_from_checkpoint`` restores them."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from layermoe.adapters import apply_layout, named_moe_layers
from layermoe.checkpointing import exact_resume_callbacks, resumable_train_loader
from tests.fixtures import atomic_checkpoint_trainer, every_step_checkpoint
from tests.scripts.callback_fixtures import CountingDataset, TinyLlamaModule

GROWN = {1: {"experts": 2, "rank": 6}}


def _alphas(module: TinyLlamaModule) -> dict[str, float]:
    return {name: layer.lora_alpha for name, layer in named_moe_layers(module.model).items()}


def _adapter_tensors(module: TinyLlamaModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items() if ".lora_" in k}


def _fit(folder: Path, module: TinyLlamaModule, ckpt_path: Path | None = None) -> None:
    L.seed_everything(0)
    train = resumable_train_loader(CountingDataset(64, 0), batch_size=4)  # exact mid-epoch resume
    trainer = atomic_checkpoint_trainer(4, [*exact_resume_callbacks(), every_step_checkpoint(folder)])
    trainer.fit(module, train, ckpt_path=ckpt_path)


def test_a_kept_scaling_survives_checkpoint_and_resume(tmp_path: Path) -> None:
    L.seed_everything(0)
    full = TinyLlamaModule()
    apply_layout(full.model, GROWN, keep_scaling=True)
    alphas = _alphas(full)
    assert {a for n, a in alphas.items() if ".layers.1." in n} == {12.0}
    _fit(tmp_path / "a", full)
    ckpt = tmp_path / "a" / "step=2.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert float(saved["model.model.layers.1.self_attn.q_proj.lora_layer_alpha"]) == 12.0

    resumed = TinyLlamaModule()  # built from the config: alpha 8, rank 4 in every block
    _fit(tmp_path / "b", resumed, ckpt_path=ckpt)
    assert _alphas(resumed) == alphas
    expected, got = _adapter_tensors(full), _adapter_tensors(resumed)
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)

    loaded = TinyLlamaModule.load_from_checkpoint(tmp_path / "a" / "step=4.ckpt")
    assert _alphas(loaded) == alphas
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model.eval()(ids).logits, full.model.eval()(ids).logits, atol=0, rtol=0
        )
