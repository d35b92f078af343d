"""SIGTERM (how clusters preempt a job) ends a fit with a resumable checkpoint and a non-zero exit status.

Why: Lightning 2.6 turns SIGTERM into a graceful stop (``trainer.received_sigterm``; the loops raise
``SIGTERMException`` after the current batch), but that exception is a ``SystemExit`` with no code, so the
process exits 0 with the run incomplete (``fit && test`` then tests a half-trained model), and nothing is
saved unless a ``ModelCheckpoint`` happens to fire. Lightning saves on a signal only for SLURM
auto-requeue (SIGUSR1, ``hpc_ckpt_N.ckpt``); this callback writes the same file for SIGTERM, anywhere.

Where it saves: at the first training batch end after the signal (after ``LayerInfluenceCallback`` and
in the same state as a ``ModelCheckpoint(every_n_train_steps=1)`` checkpoint, which resumes exactly), or,
when Lightning stops before another batch ends (a signal during a validation or the epoch-end hooks), in
``on_exception``. The exit status is 143 (128 + SIGTERM), what a shell reports for a process SIGTERM
killed. Resume with ``--ckpt_path hpc`` (Lightning's name for the newest ``hpc_ckpt_N.ckpt`` in
``default_root_dir``) or the printed path.
"""

from __future__ import annotations

import signal
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

from layermoe.lightning_compat import hpc_checkpoint_path

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class PreemptionCheckpoint(Callback):
    """On SIGTERM: write a resumable checkpoint, say where it is and how to resume, exit with status 143.
    Nothing of it goes into checkpoints; part of ``exact_resume_callbacks()``."""

    def __init__(self) -> None:
        self.saved_path: str | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved_path = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Every rank takes the same decision (save_checkpoint is collective under DDP).
        signalled = trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False)
        if signalled and self.saved_path is None:
            self._save(trainer)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        # SystemExit without a code exits 0; the run is not finished, so say so to the shell.
        exception.code = PREEMPTED_EXIT_CODE
        if trainer.state.fn != TrainerFn.FITTING:  # validate/test/predict: nothing to resume
            rank_zero_warn(
                f"Received SIGTERM: {trainer.state.fn} stopped early. Exiting with status {PREEMPTED_EXIT_CODE}."
            )
            return
        if self.saved_path is None:
            self._save(trainer)
        rank_zero_warn(
            f"Received SIGTERM at step {trainer.global_step}: the run is incomplete. A resumable checkpoint"
            f" is at {self.saved_path}. Resume with the same command plus `--ckpt_path {self.saved_path}`"
            " (or `--ckpt_path hpc`, the newest hpc_ckpt_N.ckpt in the run's default_root_dir), or"
            f" `trainer.fit(..., ckpt_path={self.saved_path!r})`. Exiting with status {PREEMPTED_EXIT_CODE}."
        )

    def _save(self, trainer: pl.Trainer) -> None:
        path = trainer.strategy.broadcast(hpc_checkpoint_path(trainer))
        trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint, said so (None logs a notice)
        self.saved_path = path
