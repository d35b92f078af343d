"""Save and restore the global RNG states (torch, CUDA, numpy, Python) through Lightning checkpoints.

Why: Lightning's checkpoint holds no RNG state, so a resumed run draws different dropout masks and
different scoring samples than the run it continues. The states are stored as plain data (tensors,
lists, ints) so the checkpoint still loads with ``torch.load(..., weights_only=True)``; the stock
``numpy.random.get_state()`` tuple holds an ``ndarray``, which the weights-only unpickler refuses.
"""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override

RNG_STATE_VERSION = 1


def capture_rng_state() -> dict[str, Any]:
    """The current global RNG states as plain data (tensors, lists, ints, floats, str)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "version": RNG_STATE_VERSION,
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "python": {"version": int(py_version), "internal": list(py_internal), "gauss_next": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNG states from ``capture_rng_state()``'s output (all-or-nothing)."""
    if not isinstance(state, dict) or state.get("version") != RNG_STATE_VERSION:
        raise ValueError(
            f"RNG state has version {state.get('version') if isinstance(state, dict) else type(state).__name__!r},"
            f" expected {RNG_STATE_VERSION}; it was not written by layermoe.checkpointing.capture_rng_state."
            " Resume without RNGStateCallback or from a checkpoint written with it."
        )
    try:
        torch_state = state["torch"]
        np_state = state["numpy"]
        numpy_tuple = (
            np_state["kind"],
            np.asarray(np_state["keys"].numpy(), dtype=np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
        py_state = state["python"]
        python_tuple = (
            int(py_state["version"]),
            tuple(int(v) for v in py_state["internal"]),
            py_state["gauss_next"],
        )
    except (KeyError, AttributeError, TypeError) as err:
        raise ValueError(
            f"RNG state is missing or has a malformed field ({err!r}); expected keys 'torch', 'numpy'"
            " ('kind', 'keys', 'pos', 'has_gauss', 'cached_gaussian') and 'python'. The checkpoint is"
            " corrupt: resume from an earlier one."
        ) from err
    cuda_states = state.get("cuda")
    restore_cuda = cuda_states is not None and torch.cuda.is_available()
    if restore_cuda and len(cuda_states) != torch.cuda.device_count():
        raise ValueError(
            f"Checkpoint holds RNG states for {len(cuda_states)} CUDA devices but"
            f" {torch.cuda.device_count()} are visible; resume with the same CUDA_VISIBLE_DEVICES."
        )
    # Everything is validated above, before any generator is touched.
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_tuple)
    random.setstate(python_tuple)
    if restore_cuda:
        torch.cuda.set_rng_state_all(cuda_states)


class RNGStateCallback(Callback):
    """Every training batch starts from the RNG states of the previous batch's end, in every run.

    Rule: at each training batch end the callback captures the global RNG states, and at the next
    training batch start it sets them back; checkpoints hold the states of the last batch end, wherever
    they are written (at that batch end, at a validation end, at an epoch end). Between a batch end
    and the next batch start Lightning does different things in an uninterrupted and in a resumed run:
    the original one may run a validation (a ``DataLoader`` without its own generator draws its worker
    seed from the global torch generator) and epoch hooks, while the resumed one runs the sanity check,
    ``on_fit_start`` hooks and, for a checkpoint written at the batch end right before a validation, a
    fast-forward of that validation without running it. Restoring at the batch start makes all of that
    irrelevant to what follows, so dropout masks in ``training_step`` and scoring samples drawn from the
    global generators continue identically from any checkpoint, and a run's random stream does not
    depend on where or how often it writes checkpoints.

    States are plain data (``capture_rng_state``), so checkpoints still load with
    ``weights_only=True``. Exactness also needs a training loader that does not draw from the global
    generators: ``resumable_train_loader`` owns its generators. Under DDP every rank pins its own
    states, but the checkpoint holds rank 0's, which every rank restores: other ranks' streams after a
    resume differ from the uninterrupted run's.
    """

    def __init__(self) -> None:
        self._pinned: dict[str, Any] | None = None
        self._at_batch_end: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None

    @property
    @override
    def state_key(self) -> str:
        return "layermoe.RNGStateCallback"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        fitting = (
            trainer is not None and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking
        )
        if fitting and self._at_batch_end is not None:
            return {"rng": self._at_batch_end}
        return {"rng": capture_rng_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "rng" not in state_dict:
            raise ValueError(
                f"Checkpoint entry for {self.state_key!r} has no 'rng' field (keys: {sorted(state_dict)});"
                " the checkpoint is corrupt: resume from an earlier one."
            )
        self._pinned = state_dict["rng"]

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pinned is not None:
            state, self._pinned = self._pinned, None
            restore_rng_state(state)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._at_batch_end = self._pinned = capture_rng_state()
