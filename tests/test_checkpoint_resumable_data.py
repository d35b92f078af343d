"""ResumableDataLoader: mid-epoch state round-trips, and Lightning saves and restores it."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import TensorDataset

from layermoe.checkpointing import (
    AtomicCheckpointIO,
    ResumableDataLoader,
    exact_resume_callbacks,
    resumable_train_loader,
)

N, BATCH, SEED = 10, 3, 5


def _dataset() -> TensorDataset:
    return TensorDataset(torch.randn(N, 3, generator=torch.Generator().manual_seed(1)), torch.arange(N))


def _epoch_ids(loader: ResumableDataLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [idx.tolist() for _, idx in loader]


def _reference_order(epoch: int) -> list[int]:
    return torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()


def test_order_is_seeded_per_epoch_and_does_not_touch_global_rng() -> None:
    loader = resumable_train_loader(_dataset(), BATCH, seed=SEED)
    assert len(loader) == 4
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    for epoch in range(3):
        flat = [i for batch in _epoch_ids(loader, epoch) for i in batch]
        assert flat == _reference_order(epoch)
    assert torch.equal(torch.rand(1), expected_next)  # iterating drew nothing from the global generator
    sequential = resumable_train_loader(_dataset(), BATCH, shuffle=False, seed=SEED)
    assert [i for b in _epoch_ids(sequential, 2) for i in b] == list(range(N))


@pytest.mark.parametrize("consumed", [0, 1, 3, 4])
def test_state_dict_resumes_mid_epoch_in_a_new_loader(consumed: int) -> None:
    full = resumable_train_loader(_dataset(), BATCH, seed=SEED)
    uninterrupted = _epoch_ids(full, 1)
    first = resumable_train_loader(_dataset(), BATCH, seed=SEED)
    first.sampler.set_epoch(1)
    iterator = iter(first)
    seen = [next(iterator)[1].tolist() for _ in range(consumed)]
    state = first.state_dict()
    assert (state["epoch"], state["batches_yielded"]) == (1, consumed)
    resumed = resumable_train_loader(_dataset(), BATCH, seed=SEED)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full)  # Lightning expects the full epoch length
    assert resumed.state_dict() == state  # pending position is reported before iteration starts
    rest = [idx.tolist() for _, idx in resumed]
    assert seen + rest == uninterrupted
    assert _epoch_ids(resumed, 2) == _epoch_ids(full, 2)  # next epoch starts from its beginning


def test_worker_prefetch_does_not_skew_the_position() -> None:
    loader = resumable_train_loader(_dataset(), 2, seed=SEED, num_workers=1, prefetch_factor=4)
    iterator = iter(loader)
    first_two = [next(iterator)[1].tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state["batches_yielded"] == 2
    del iterator
    resumed = resumable_train_loader(_dataset(), 2, seed=SEED)
    resumed.load_state_dict(state)
    order = _reference_order(0)
    assert first_two + [idx.tolist() for _, idx in resumed] == [order[i : i + 2] for i in range(0, N, 2)]


def test_incompatible_state_is_refused_with_the_field_named() -> None:
    state = resumable_train_loader(_dataset(), BATCH, seed=SEED).state_dict()
    with pytest.raises(ValueError, match="batch_size=3.*batch_size=4"):
        resumable_train_loader(_dataset(), 4, seed=SEED).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        resumable_train_loader(_dataset(), BATCH, seed=SEED + 1).load_state_dict(state)
    with pytest.raises(ValueError, match="batches_yielded"):
        resumable_train_loader(_dataset(), BATCH, seed=SEED).load_state_dict({**state, "batches_yielded": 99})
    with pytest.raises(ValueError, match="not written by ResumableDataLoader"):
        resumable_train_loader(_dataset(), BATCH, seed=SEED).load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="sampler"):
        ResumableDataLoader(_dataset(), BATCH, sampler=list(range(N)))


class _DropoutRegressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Linear(8, 1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        x, idx = batch
        self.seen.append(idx.tolist())
        return self.net(x).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        return resumable_train_loader(_dataset(), BATCH, seed=SEED)


class _ScheduledRegressor(_DropoutRegressor):
    """Sizes its schedule from ``trainer.estimated_stepping_batches`` (as OneCycleLR users do): with
    ``max_epochs`` set, that builds the training loader before Lightning restores the loops."""

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-2)
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / (total + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _fit(
    folder: Path,
    ckpt_path: Path | None,
    callbacks: list,
    max_epochs: int | None = None,
    model_cls: type[_DropoutRegressor] = _DropoutRegressor,
    max_steps: int = 9,
) -> _DropoutRegressor:
    L.seed_everything(0)
    model = model_cls()
    trainer = L.Trainer(
        max_steps=max_steps,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(folder, every_n_train_steps=1, save_top_k=-1, filename="{step}"),
            *callbacks,
        ],
    )
    trainer.fit(model, ckpt_path=ckpt_path)
    return model


def test_lightning_resumes_batches_and_dropout_masks_mid_epoch(tmp_path: Path) -> None:
    full = _fit(tmp_path / "a", None, exact_resume_callbacks())
    ckpt = tmp_path / "a" / "step=5.ckpt"  # epoch 1, one batch in (4 batches per epoch)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not resumable.*")
        resumed = _fit(tmp_path / "b", ckpt, exact_resume_callbacks())
    assert resumed.seen == full.seen[5:]
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name
    # Without the RNG callback the dropout masks after the resume differ: the test above is not vacuous.
    no_rng = _fit(tmp_path / "c", ckpt, [])
    assert no_rng.seen == full.seen[5:]
    assert not all(torch.equal(p, q) for p, q in zip(full.parameters(), no_rng.parameters(), strict=True))


@pytest.mark.parametrize("max_steps", [9, -1])
def test_mid_epoch_resume_is_exact_when_max_epochs_is_set(tmp_path: Path, max_steps: int) -> None:
    """Issue 37: with max_epochs set (3 epochs of 4 batches; with or without max_steps), Lightning 2.6
    dropped the loader's position (its issue #20550) and the resumed run restarted the epoch from its
    first batch; LoaderPositionResume hands the position over."""
    from layermoe.checkpointing import LoaderPositionResume

    def fit(folder: str, ckpt: Path | None, callbacks: list) -> _DropoutRegressor:
        return _fit(tmp_path / folder, ckpt, callbacks, 3, _ScheduledRegressor, max_steps)

    full = fit("a", None, exact_resume_callbacks())
    assert len(full.seen) == (9 if max_steps == 9 else 12)
    ckpt = tmp_path / "a" / "step=5.ckpt"  # epoch 1, one batch in
    resumed = fit("b", ckpt, exact_resume_callbacks())
    assert resumed.seen == full.seen[5:]
    for (name, p), q in zip(full.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name
    # Without LoaderPositionResume Lightning restarts epoch 1 from its first batch: the test is not vacuous.
    others = [cb for cb in exact_resume_callbacks() if not isinstance(cb, LoaderPositionResume)]
    without = fit("c", ckpt, others)
    assert without.seen[:3] == full.seen[4:7] != full.seen[5:8]
