"""Checkpoints that survive rewires and crashes, exact mid-epoch resume, adapter-only artifacts.

- ``AtomicCheckpointIO``: a checkpoint file is never half-written (temp file + fsync + rename).
- ``resumable_train_loader`` (from :mod:`layermoe.data.resumable_loader`): a train loader Lightning resumes
  mid-epoch.
- ``RNGStateCallback``: torch/CUDA/numpy/Python RNG states in every checkpoint, restored on resume.
- ``EpochEndResume``: a checkpoint saved in ``on_train_epoch_end`` resumes at the next epoch's start.
- ``PreemptionCheckpoint``: SIGTERM writes a resumable checkpoint and exits with status 143.
- ``LoaderPositionResume``: the loader's mid-epoch position is restored even when ``max_epochs`` is set.
- ``validate_checkpoint_layout``: a clear error for a missing/corrupt adapter layout, before loading.
- ``OptimizerStateGuard``: refuses optimizer state saved for other parameters (names, shapes, order).
- ``save_adapters`` / ``load_adapters``: adapter tensors (safetensors) + layout/config (JSON) only.
- ``CheckpointIntegrityGuard``: checksums and finite checks on every save/load, whatever the CheckpointIO.
- ``exact_resume_callbacks()``: the callbacks above, for ``Trainer(callbacks=[...])``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback

# the loader lives with the data (layermoe.data.resumable_loader); exact resume needs it beside the
# callbacks below, so the exact-resume kit is importable from here too
from layermoe.data.resumable_loader import resumable_train_loader

from .adapter_io import AdapterArtifactError, load_adapters, read_adapter_manifest, save_adapters
from .atomic_io import AtomicCheckpointIO, atomic_torch_save, stale_temp_files
from .integrity_guard import CheckpointIntegrityGuard, VerifiedCheckpointIO
from .layout_check import CheckpointLayoutError, validate_checkpoint_layout
from .loop_state import EpochEndResume, LoaderPositionResume
from .optimizer_guard import (
    MANIFEST_KEY,
    OptimizerStateGuard,
    OptimizerStateMismatchError,
    check_optimizer_states,
    optimizer_manifest,
)
from .preemption import PREEMPTED_EXIT_CODE, PreemptionCheckpoint
from .rng import RNGStateCallback, capture_rng_state, restore_rng_state


def exact_resume_callbacks() -> list[Callback]:
    """Fresh ``RNGStateCallback``, ``OptimizerStateGuard``, ``EpochEndResume``, ``LoaderPositionResume``,
    ``PreemptionCheckpoint`` and ``CheckpointIntegrityGuard``: add all six for exact, checked resume that
    survives preemption."""
    return [
        RNGStateCallback(),
        OptimizerStateGuard(),
        EpochEndResume(),
        LoaderPositionResume(),
        PreemptionCheckpoint(),
        CheckpointIntegrityGuard(),
    ]


__all__ = [
    "AdapterArtifactError",
    "MANIFEST_KEY",
    "AtomicCheckpointIO",
    "CheckpointIntegrityGuard",
    "CheckpointLayoutError",
    "EpochEndResume",
    "LoaderPositionResume",
    "OptimizerStateGuard",
    "OptimizerStateMismatchError",
    "PREEMPTED_EXIT_CODE",
    "PreemptionCheckpoint",
    "RNGStateCallback",
    "VerifiedCheckpointIO",
    "atomic_torch_save",
    "capture_rng_state",
    "check_optimizer_states",
    "exact_resume_callbacks",
    "load_adapters",
    "optimizer_manifest",
    "read_adapter_manifest",
    "restore_rng_state",
    "resumable_train_loader",
    "save_adapters",
    "stale_temp_files",
    "validate_checkpoint_layout",
]
