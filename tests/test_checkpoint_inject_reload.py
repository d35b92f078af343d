"""(d) for modules adapted by ``LayerInfluenceCallback(inject=...)``: the documented loader gives the
same validation loss as the model that wrote the checkpoint, after a rewire, through weights-only files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from layermoe.adapters import layout, moe_layers
from layermoe.callbacks import CallbackConfigError, load_adapted_checkpoint
from layermoe.callbacks.loading import injected_config
from layermoe.callbacks.state import INJECT_KEY
from layermoe.checkpointing import exact_resume_callbacks
from layermoe.checkpointing.integrity import CheckpointIntegrityError
from layermoe.scoring import causal_lm_per_sample_loss
from tests.fixtures import atomic_checkpoint_trainer, quiet_influence
from tests.scripts.callback_fixtures import TinyLlamaModule, loaders


@torch.no_grad()
def _val_loss(module: TinyLlamaModule, val_loader: torch.utils.data.DataLoader) -> float:
    module.eval()
    return float(torch.cat([causal_lm_per_sample_loss(module.model, b).double() for b in val_loader]).mean())


def test_load_adapted_checkpoint_reproduces_validation_loss(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = TinyLlamaModule(adapt=False)
    train, val = loaders()
    influence = quiet_influence(
        "grad_norm",
        schedule={"warmup": 2},
        inject={"experts": 2, "rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.1},
    )
    trainer = atomic_checkpoint_trainer(
        4, [influence, *exact_resume_callbacks(), ModelCheckpoint(tmp_path, save_last=True)]
    )
    trainer.fit(module, train, val)
    assert influence.state.rewires_done == 1
    expected = _val_loss(module, val)
    path = tmp_path / "last.ckpt"
    torch.load(path, weights_only=True)  # plain data only
    loaded = load_adapted_checkpoint(TinyLlamaModule, path)
    assert moe_layers(loaded) and layout(loaded) == layout(module)
    assert abs(_val_loss(loaded, val) - expected) <= 1e-6


INJECT = {"experts": 2, "rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.1}


def test_a_changed_inject_on_resume_is_refused_naming_it(tmp_path: Path) -> None:
    """The adapters were added with the first run's inject=: a different one on resume (here a scale that
    fits the same weights) would be written to every later checkpoint without ever being used."""
    L.seed_everything(0)
    train, val = loaders()
    first = quiet_influence("grad_norm", schedule={"warmup": 2}, inject=INJECT)
    trainer = atomic_checkpoint_trainer(4, [first, ModelCheckpoint(tmp_path, save_last=True)])
    trainer.fit(TinyLlamaModule(adapt=False), train, val)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)[INJECT_KEY] == first.inject
    changed = quiet_influence("grad_norm", schedule={"warmup": 2}, inject={**INJECT, "lora_alpha": 16.0})
    resumed = atomic_checkpoint_trainer(6, [changed, ModelCheckpoint(tmp_path / "resumed", save_last=True)])
    with pytest.raises(CallbackConfigError, match=r"inject=\{.*'lora_alpha': 16\.0.*--ckpt_path"):
        resumed.fit(TinyLlamaModule(adapt=False), train, val, ckpt_path=tmp_path / "last.ckpt")
    assert not (tmp_path / "resumed").exists()  # refused before any step


@pytest.mark.parametrize("stored", ["experts=2", {"experts": 2, "rank": "four"}, {"experts": 2, "size": 3}])
def test_a_damaged_stored_inject_names_the_key_and_the_file(stored: Any) -> None:
    with pytest.raises(
        CheckpointIntegrityError, match=r"run/last\.ckpt: layermoe_inject is not a MoELoRAConfig"
    ):
        injected_config({INJECT_KEY: stored}, "run/last.ckpt")
