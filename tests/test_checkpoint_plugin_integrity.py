"""Integrity on the plug-in path (issue 37): a user's Trainer with ``LayerInfluenceCallback`` and
``exact_resume_callbacks()`` but Lightning's stock checkpoint IO writes checksums and verifies every
checkpoint it reads, and refuses NaN/inf in weights and optimizer state, naming the tensor."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from layermoe.checkpointing import exact_resume_callbacks
from layermoe.checkpointing.integrity import CHECKSUM_KEY, CheckpointIntegrityError
from tests.fixtures import quiet_influence, quiet_trainer
from tests.scripts.callback_fixtures import TinyLlamaModule, loaders
from tests.test_checkpoint_load_errors import _flip


def _plugin_trainer(folder: Path, max_steps: int, extra: list[Callback] = ()) -> L.Trainer:
    """The README's plug-in Trainer: no plugins=, so Lightning's own TorchCheckpointIO."""
    influence = quiet_influence("grad_norm", schedule={"warmup": 2}, num_train_samples=4, num_val_samples=4)
    callbacks = [influence, *exact_resume_callbacks(), *extra, ModelCheckpoint(folder, save_last=True)]
    return quiet_trainer(callbacks, max_steps=max_steps, limit_val_batches=0)


def _fit(folder: Path, max_steps: int, ckpt_path: Path | None = None, extra: list[Callback] = ()):
    L.seed_everything(0)
    module = TinyLlamaModule()
    train, val = loaders()
    trainer = _plugin_trainer(folder, max_steps, extra)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val, ckpt_path=ckpt_path)
    return module, trainer


@pytest.fixture(scope="module")
def plugin_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("plugin") / "checkpoints"
    _fit(folder, 3)
    return folder / "last.ckpt"


def test_plugin_checkpoints_carry_a_checksum_and_resume(plugin_ckpt: Path, tmp_path: Path) -> None:
    assert CHECKSUM_KEY in torch.load(plugin_ckpt, weights_only=True)
    _, trainer = _fit(tmp_path / "resumed", 5, ckpt_path=plugin_ckpt)
    assert trainer.global_step == 5


def test_flipped_tensor_bytes_stop_the_plugin_fit_before_training(plugin_ckpt: Path, tmp_path: Path) -> None:
    state = torch.load(plugin_ckpt, weights_only=True)["state_dict"]
    name = max(
        (k for k in state if "lora_" in k and state[k].is_floating_point()), key=lambda k: state[k].numel()
    )
    raw = plugin_ckpt.read_bytes()
    data = state[name].contiguous().numpy().tobytes()
    start = raw.find(data)
    assert start >= 0
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(_flip(raw, start + len(data) // 2))

    steps: list[int] = []

    class _CountSteps(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            steps.append(trainer.global_step)

    with pytest.raises(CheckpointIntegrityError, match="'state_dict' does not match its checksum") as info:
        _fit(tmp_path / "out", 6, ckpt_path=damaged, extra=[_CountSteps()])
    assert str(damaged) in str(info.value)
    assert steps == []  # refused before the first training step


def test_non_finite_optimizer_state_is_refused_on_load_naming_the_tensor(
    plugin_ckpt: Path, tmp_path: Path
) -> None:
    checkpoint = torch.load(plugin_ckpt, weights_only=True)
    del checkpoint[CHECKSUM_KEY]  # as written by code that adds none
    moments = checkpoint["optimizer_states"][0]["state"]
    index = sorted(moments)[0]
    moments[index]["exp_avg_sq"].view(-1)[0] = float("inf")
    poisoned = tmp_path / "poisoned.ckpt"
    torch.save(checkpoint, poisoned)
    with pytest.raises(CheckpointIntegrityError, match="Refusing to load") as info:
        _fit(tmp_path / "out", 6, ckpt_path=poisoned)
    message = str(info.value)
    # named by the parameter the moment belongs to (OptimizerStateGuard's manifest), with the fix
    assert "1 optimizer state tensors hold NaN or infinity (optimizer 0 exp_avg_sq of model." in message
    assert "earlier checkpoint" in message


class _PoisonMoment(Callback):
    """Turns one Adam moment into NaN after step 2 (the weights stay finite)."""

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == 2:
            optimizer = trainer.optimizers[0]
            first = optimizer.param_groups[0]["params"][0]
            optimizer.state[first]["exp_avg"].view(-1)[0] = float("nan")


def test_non_finite_optimizer_state_is_never_written(tmp_path: Path) -> None:
    with pytest.raises(CheckpointIntegrityError, match="Refusing to write .*optimizer 0 exp_avg of model\\."):
        _fit(tmp_path / "out", 4, extra=[_PoisonMoment()])
    assert not (tmp_path / "out" / "last.ckpt").exists()
