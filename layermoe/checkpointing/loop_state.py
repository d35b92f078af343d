"""Two repairs of Lightning 2.6's loop restore, so a resume continues exactly where the checkpoint was written.

``LoaderPositionResume``: the training loader's mid-epoch position reaches the loader even when the loader
was built before the loops were restored (``trainer.estimated_stepping_batches`` with ``max_epochs`` set,
called by ``MoELoRAFineTuner.configure_optimizers`` and ``LayerInfluenceCallback``); without it Lightning
drops the position and the resumed run restarts the epoch from its first batch
(:func:`layermoe.lightning_compat.load_pending_train_loader_state`).

``EpochEndResume``: resume a checkpoint written inside ``on_train_epoch_end`` from the next epoch's start,
in that epoch's order.

Why: ``ModelCheckpoint`` saves inside ``on_train_epoch_end`` whenever validation runs once per epoch at
its end (its default ``save_on_train_epoch_end=None`` then means True): the monitored best, ``save_last``,
plain per-epoch checkpoints. Lightning writes that checkpoint after it counted the epoch as processed and
before it counts it as completed. With ``max_epochs`` only, Lightning resumes it as a finished epoch; with
``max_steps`` set (iteration-based training, as in ``configs/quickstart.yaml``) Lightning 2.6 replays the
finished epoch as an empty one and counts it twice, so the resumed run trains epoch ``e + 1`` on the
sampler order of epoch ``e + 2`` (with ``max_epochs`` also set it may stop without training at all).

``EpochEndResume`` rewrites the checkpoint's loop progress in ``on_load_checkpoint``, which Lightning calls
before it restores the loops, into the state the uninterrupted run has when its next epoch starts
(:func:`layermoe.lightning_compat.settle_epoch_end_progress`). Lightning does not replay what the
uninterrupted run did after that save in either mode: the epoch-end hooks that run after
``ModelCheckpoint`` and epoch-interval LR schedulers (``MoELoRAFineTuner``'s schedule is per step).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from layermoe.lightning_compat import load_pending_train_loader_state, settle_epoch_end_progress


class EpochEndResume(Callback):
    """Makes a checkpoint saved inside ``on_train_epoch_end`` resume at the next epoch's start (see the
    module docstring). Stateless; part of ``exact_resume_callbacks()``."""

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        settle_epoch_end_progress(checkpoint)


class LoaderPositionResume(Callback):
    """Makes a mid-epoch checkpoint's training-loader position reach the loader whenever the loader was built
    before Lightning restored the loops (see the module docstring). Stateless; part of
    ``exact_resume_callbacks()``."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        load_pending_train_loader_state(trainer)
