"""RNG state capture/restore: the streams continue identically, and the state is weights_only-safe."""

from __future__ import annotations

import io
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from layermoe.checkpointing import (
    RNGStateCallback,
    capture_rng_state,
    restore_rng_state,
    resumable_train_loader,
)
from tests.fixtures import every_step_checkpoint, quiet_trainer


def _draw() -> tuple[torch.Tensor, np.ndarray, list[float], torch.Tensor]:
    return (
        torch.rand(5),
        np.random.rand(5),
        [random.random() for _ in range(5)] + [random.gauss(0, 1)],
        torch.nn.functional.dropout(torch.ones(64), p=0.5, training=True),
    )


def _assert_same(a, b) -> None:
    assert torch.equal(a[0], b[0])
    assert np.array_equal(a[1], b[1])
    assert a[2] == b[2]
    assert torch.equal(a[3], b[3])


def test_restore_continues_every_stream_after_weights_only_roundtrip() -> None:
    torch.manual_seed(3)
    np.random.seed(3)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    state = capture_rng_state()
    buffer = io.BytesIO()
    torch.save({"rng": state}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["rng"]
    expected = _draw()
    _draw()  # move every generator on
    restore_rng_state(loaded)
    _assert_same(_draw(), expected)


def test_corrupt_state_raises_and_changes_nothing() -> None:
    state = capture_rng_state()
    broken = dict(state)
    broken["numpy"] = {"kind": "MT19937"}  # keys missing
    torch.manual_seed(11)
    snapshot = capture_rng_state()
    with pytest.raises(ValueError, match="numpy|malformed"):
        restore_rng_state(broken)
    with pytest.raises(ValueError, match="version"):
        restore_rng_state({"torch": state["torch"]})
    after = _draw()
    restore_rng_state(snapshot)
    _assert_same(after, _draw())  # the failed restores left the torch stream where it was


def test_callback_restores_at_the_next_batch_start_only_after_loading() -> None:
    callback = RNGStateCallback()
    torch.manual_seed(5)
    saved = callback.state_dict()  # no trainer attached: captures, pins nothing
    expected = torch.rand(3)
    callback.on_train_batch_start(None, None, None, 0)  # nothing loaded: must not touch the generators
    assert not torch.equal(torch.rand(3), expected)
    callback.load_state_dict(saved)
    torch.rand(100)  # what Lightning may draw between loading and training
    callback.on_train_batch_start(None, None, None, 0)
    assert torch.equal(torch.rand(3), expected)
    callback.on_train_batch_start(None, None, None, 1)  # only once
    assert not torch.equal(torch.rand(3), expected)
    with pytest.raises(ValueError, match="'rng'"):
        callback.load_state_dict({})


class _DropoutModule(L.LightningModule):
    """Dropout in training; validation draws from the global RNG (its plain DataLoader and a sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        noise = torch.rand(()) * 1e-3  # e.g. sampled generation or MC dropout in validation
        self.log("val_loss", self.net(batch[0]).pow(2).mean() + noise)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def _data(self, n: int) -> torch.utils.data.DataLoader:
        data = torch.utils.data.TensorDataset(torch.randn(n, 3, generator=torch.Generator().manual_seed(n)))
        return torch.utils.data.DataLoader(data, batch_size=2)

    def train_dataloader(self):
        return resumable_train_loader(self._data(16).dataset, 2, seed=1)

    def val_dataloader(self):
        return self._data(4)


def _fit(folder: Path, ckpt_path: Path | None, callbacks: list) -> _DropoutModule:
    L.seed_everything(0)
    module = _DropoutModule()
    quiet_trainer([every_step_checkpoint(folder), *callbacks], max_steps=7, val_check_interval=3).fit(
        module, ckpt_path=ckpt_path
    )
    return module


def test_resume_from_a_checkpoint_taken_right_before_validation_is_exact(tmp_path: Path) -> None:
    full = _fit(tmp_path / "a", None, [RNGStateCallback()])
    # step=3 was saved at the batch end that precedes the validation at step 3; Lightning resumes after it
    # without re-running it (a fast-forward), while the original run drew random numbers in it.
    resumed = _fit(tmp_path / "b", tmp_path / "a" / "step=3.ckpt", [RNGStateCallback()])
    for p, q in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    mid_interval = _fit(tmp_path / "c", tmp_path / "a" / "step=4.ckpt", [RNGStateCallback()])
    for p, q in zip(full.parameters(), mid_interval.parameters(), strict=True):
        assert torch.equal(p, q)
