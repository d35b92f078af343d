"""Checkpoint integrity (issue 24): checksums, non-finite weights and losses, base-model fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from layermoe.checkpointing import AtomicCheckpointIO
from layermoe.checkpointing.base_identity import base_fingerprint
from layermoe.checkpointing.integrity import (
    CHECKSUM_KEY,
    CheckpointIntegrityError,
    content_digest,
    verify_checksum,
    with_checksum,
)
from layermoe.lightning_modules import MoELoRAFineTuner
from layermoe.lightning_modules.finetuner import NonFiniteLossError
from tests.fixtures import atomic_checkpoint_trainer
from tests.scripts.resume_run import ADAPTER, TINY_LLAMA, data_module
from tests.test_resume_e2e import _write_data


def _checkpoint(value: float = 1.0) -> dict:
    return {
        "state_dict": {"w": torch.full((8,), value)},
        "loops": {"step": 3},
        "hyper_parameters": {"lr": 0.1},
    }


def test_checksum_names_the_changed_section_and_ignores_key_order() -> None:
    saved = with_checksum(_checkpoint())
    assert verify_checksum(saved) is True
    reordered = {k: saved[k] for k in reversed(list(saved))}
    assert verify_checksum(reordered) is True
    assert verify_checksum(_checkpoint()) is False  # no checksum: written by other code, accepted
    changed = dict(saved, state_dict={"w": torch.full((8,), 1.0).index_fill(0, torch.tensor([3]), 1.5)})
    with pytest.raises(CheckpointIntegrityError, match="'state_dict' does not match"):
        verify_checksum(changed, "x.ckpt")
    assert verify_checksum(dict(saved, hyper_parameters={"lr": 9}), skip=["hyper_parameters"]) is True
    # the digest sees dtype and shape, not only bytes
    assert content_digest(torch.zeros(4)) != content_digest(torch.zeros(2, 2))
    assert content_digest(torch.zeros(4)) != content_digest(torch.zeros(4, dtype=torch.float64)[:2].float())


def test_atomic_io_writes_a_checksum_and_refuses_non_finite_weights(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_checkpoint(), path)
    assert CHECKSUM_KEY in torch.load(path, weights_only=True)
    with pytest.raises(
        CheckpointIntegrityError, match=r"Refusing to write .*1 weight tensors hold NaN .*\(w\)"
    ):
        io.save_checkpoint(_checkpoint(float("nan")), path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(8))  # the previous file
    torch.save(_checkpoint(float("inf")), tmp_path / "inf.ckpt")  # written by other code, no checksum
    with pytest.raises(CheckpointIntegrityError, match="Refusing to load"):
        io.load_checkpoint(tmp_path / "inf.ckpt")


def test_base_fingerprint_tells_bases_apart_and_ignores_adapters() -> None:
    a = MoELoRAFineTuner(model=TINY_LLAMA, adapter=ADAPTER, num_classes=2, print_layout=False)
    same = MoELoRAFineTuner(model=TINY_LLAMA, adapter={"experts": 1, "rank": 2}, num_classes=2)
    other_seed = MoELoRAFineTuner(model=TINY_LLAMA, adapter=ADAPTER, num_classes=2, model_seed=1)
    from layermoe.lightning_modules import build_model

    plain = build_model(TINY_LLAMA)
    assert base_fingerprint(a.model) == base_fingerprint(same.model) == base_fingerprint(plain)
    assert base_fingerprint(a.model) != base_fingerprint(other_seed.model)


class _PoisonAt(Callback):
    """Sets one adapter weight to NaN before the given step: the next loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in pl_module.named_parameters() if n.endswith("lora_A")).fill_(float("nan"))


def test_non_finite_loss_stops_the_fit_and_is_never_written(tmp_path: Path) -> None:
    _write_data(tmp_path / "data")
    module = MoELoRAFineTuner(model=TINY_LLAMA, adapter=ADAPTER, num_classes=2, print_layout=False)
    folder = tmp_path / "checkpoints"
    trainer = atomic_checkpoint_trainer(
        6, [_PoisonAt(3), ModelCheckpoint(folder, filename="{step}", every_n_train_steps=1, save_last=True)]
    )
    with pytest.raises(NonFiniteLossError, match="global step 3"):
        trainer.fit(module, datamodule=data_module(str(tmp_path / "data")))
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    assert not (folder / "step=4.ckpt").exists()
