"""The Trainers the tests build, in one place: the quiet settings, the one-CPU variant, the checkpoint at
every step that resume tests compare, and the callback settings the fits share.

A plain module rather than conftest.py: the scripts in tests/scripts run in fresh processes without
pytest and build the same Trainers, and conftest.py stays light (environment, data files, skips) for the
many tests that never import Lightning. The tiny fits live beside their projects
(``tests/scripts/callback_fixtures.py``, ``plugin_projects.py``, ``resume_run.py``) and build their
Trainer here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from layermoe.callbacks import LayerInfluenceCallback
from layermoe.checkpointing import AtomicCheckpointIO

QUIET: dict[str, Any] = {
    "logger": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}
QUIET_INFLUENCE: dict[str, Any] = {
    "num_train_samples": 8,
    "num_val_samples": 8,
    "plot": False,
    "verbose": False,
}


def quiet_trainer(callbacks: Iterable[Callback] = (), **options: Any) -> L.Trainer:
    """A Trainer with no logger, progress bar, model summary or sanity check; ``options`` add to or
    override these."""
    return L.Trainer(callbacks=list(callbacks), **{**QUIET, **options})


def cpu_trainer(callbacks: Iterable[Callback] = (), **options: Any) -> L.Trainer:
    """:func:`quiet_trainer` on one CPU and without Lightning's default checkpointing (pass a
    ModelCheckpoint in ``callbacks`` and ``enable_checkpointing=True`` to write some)."""
    return quiet_trainer(
        callbacks, **{"accelerator": "cpu", "devices": 1, "enable_checkpointing": False, **options}
    )


def atomic_checkpoint_trainer(max_steps: int, callbacks: list[Callback]) -> L.Trainer:
    """A quiet trainer without validation writing checkpoints through AtomicCheckpointIO (with checksums),
    as the checkpoint tests write them; tests pass their ModelCheckpoint in ``callbacks``."""
    return quiet_trainer(callbacks, max_steps=max_steps, limit_val_batches=0, plugins=[AtomicCheckpointIO()])


def every_step_checkpoint(folder: Path | str, **options: Any) -> ModelCheckpoint:
    """``step=K.ckpt`` in ``folder`` after every optimizer step, all kept (what resume tests restart from)."""
    return ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=1, save_top_k=-1, **options)


def quiet_influence(scorer: str, **options: Any) -> LayerInfluenceCallback:
    """``LayerInfluenceCallback`` scoring on 8 train and 8 validation samples, with no plot and no console
    table; ``options`` add to or override these."""
    return LayerInfluenceCallback(scorer=scorer, **{**QUIET_INFLUENCE, **options})
