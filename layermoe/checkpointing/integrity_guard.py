"""Checksums and finite checks for any Trainer that lists ``exact_resume_callbacks()``.

Why: ``AtomicCheckpointIO`` writes and verifies the content checksum, but a plug-in Trainer
(``callbacks=[LayerInfluenceCallback(...), *exact_resume_callbacks()]``) keeps Lightning's stock
``TorchCheckpointIO``: its checkpoints carry no checksum, so flipped bytes inside a tensor load without
complaint and the fit trains on them to the end. A callback cannot check the payload in its own
``on_load_checkpoint``: Lightning runs it after the module's weights loaded and after the module's
hook and the checkpoint migration may have changed the dict. ``CheckpointIntegrityGuard`` instead
installs a checking ``CheckpointIO`` in ``setup`` (which runs before any checkpoint is read): the
stock IO becomes ``AtomicCheckpointIO``; any other IO (a user's, async, remote) is wrapped so that
each payload gets its checksum right before it is handed to that IO, and is verified right after it
is read, before Lightning or any hook sees it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from .atomic_io import AtomicCheckpointIO, CheckpointPath
from .integrity import check_finite_state, verify_loaded_checkpoint, with_checksum


class VerifiedCheckpointIO(CheckpointIO):
    """``inner``'s storage, with ``AtomicCheckpointIO``'s checks: non-finite values refused and a checksum
    added on save, layout, checksum and finite values verified on load."""

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: CheckpointPath, storage_options: Any | None = None
    ) -> None:
        check_finite_state(checkpoint, f"checkpoint {path}", "write")
        self.inner.save_checkpoint(with_checksum(checkpoint), path, storage_options=storage_options)

    def load_checkpoint(self, path: CheckpointPath, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = self.inner.load_checkpoint(path, *args, **kwargs)
        verify_loaded_checkpoint(checkpoint, f"checkpoint {path}")
        return checkpoint

    def remove_checkpoint(self, path: CheckpointPath) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def verified_io(io: CheckpointIO) -> CheckpointIO:
    """``io`` itself when it already verifies, ``AtomicCheckpointIO`` for the stock IO, else a wrapper."""
    if isinstance(io, (AtomicCheckpointIO, VerifiedCheckpointIO)):
        return io
    if type(io) is TorchCheckpointIO:
        return AtomicCheckpointIO()
    return VerifiedCheckpointIO(io)


class CheckpointIntegrityGuard(Callback):
    """Makes the Trainer's checkpoint IO write checksums and verify every checkpoint it reads."""

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        checked = verified_io(strategy.checkpoint_io)
        if checked is not strategy.checkpoint_io:
            strategy.checkpoint_io = checked
