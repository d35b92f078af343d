"""A training DataLoader that Lightning can checkpoint and resume in the middle of an epoch.

Why: Lightning saves a train loader's position only when the loader itself is ``_Stateful`` (has
``state_dict``/``load_state_dict``): ``FitLoop.on_save_checkpoint`` stores
``CombinedLoader._state_dicts()`` under the fit loop's ``combined_loader`` entry, and
``FitLoop.setup_data`` hands them back to ``loader.load_state_dict`` before it creates the iterator.
A plain ``DataLoader`` restarts the epoch from its first batch instead (Lightning warns "your
dataloader is not resumable"). Lightning then expects the resumed iterator to yield only the
remaining batches while ``len(loader)`` stays the full epoch length; that is what this loader does.

Determinism: the order of epoch ``e`` is ``randperm(len(dataset), seed + e)``, and the worker base seed
comes from the loader's own generator re-seeded per epoch, so iterating never draws from the global
torch generator (which would shift the dropout masks of a resumed run).

Length grouping (``lengths=``): like Hugging Face's ``LengthGroupedSampler``, the shuffled order is cut
into megabatches of ``batch_size * group_factor`` indices and each megabatch is sorted by decreasing
length, so a batch holds rows of similar length (less right-padding) while the order across megabatches
stays random. It uses no randomness of its own, so the order is still a function of ``(seed, epoch)``.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from layermoe.layout import is_int_at_least

LOADER_STATE_VERSION = 1
_SEED_MIX = 1_000_003  # odd multiplier so (seed, epoch) pairs map to distinct worker base seeds
DEFAULT_GROUP_FACTOR = 50  # megabatch = batch_size * group_factor rows, as in HF's LengthGroupedSampler
# Keys added after version 1 and their value in a state that predates them (such a state never grouped).
_STATE_DEFAULTS: dict[str, Any] = {"group_by_length": False, "group_factor": None}


def _check_lengths(lengths: Sequence[int] | None, count: int) -> list[int] | None:
    """``lengths`` as a list of ``count`` non-negative ints (one per dataset row), or None."""
    if lengths is None:
        return None
    try:
        values = [operator.index(n) for n in lengths]
    except TypeError:
        raise ValueError(
            f"lengths must be a sequence of ints (one per dataset row), got {lengths!r}"
        ) from None
    if len(values) != count:
        raise ValueError(
            f"lengths has {len(values)} entries but the dataset has {count} rows; give exactly {count}"
            " (the token length of each row, in dataset order)."
        )
    if any(n < 0 for n in values):
        raise ValueError(f"lengths must be non-negative, got {min(values)}")
    return values


def length_grouped_order(indices: Sequence[int], lengths: Sequence[int], megabatch: int) -> list[int]:
    """``indices`` cut into consecutive chunks of ``megabatch``, each sorted by decreasing length (stable)."""
    out: list[int] = []
    for start in range(0, len(indices), megabatch):
        out.extend(sorted(indices[start : start + megabatch], key=lambda i: -lengths[i]))
    return out


class ResumableSampler(DistributedSampler):
    """Shuffled (or sequential) per-epoch order seeded by ``seed + epoch``, startable at an offset.

    It subclasses ``DistributedSampler`` so that under DDP Lightning keeps it instead of wrapping the
    loader in a new sampler (``DataConnector._requires_distributed_sampler``); ``num_replicas`` and
    ``rank`` default to the initialized process group, or one replica without one.

    With ``lengths`` (one int per dataset row) and ``shuffle``, this rank's shuffled order is grouped by
    length in megabatches of ``batch_size * group_factor`` (see the module docstring).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        lengths: Sequence[int] | None = None,
        batch_size: int = 1,
        group_factor: int = DEFAULT_GROUP_FACTOR,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("group_factor", group_factor)):
            if not is_int_at_least(value):
                raise ValueError(f"ResumableSampler {name} must be a positive int, got {value!r}.")
        self.lengths = _check_lengths(lengths, len(dataset))  # type: ignore[arg-type]
        self.batch_size = batch_size
        self.group_factor = group_factor
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.start_index = 0

    @property
    def group_by_length(self) -> bool:
        """Whether the order is length-grouped (needs ``lengths`` and ``shuffle``)."""
        return self.lengths is not None and self.shuffle

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())  # seeded permutation, then this rank's share
        if self.group_by_length:
            assert self.lengths is not None
            indices = length_grouped_order(indices, self.lengths, self.batch_size * self.group_factor)
        # Slice after grouping, so a resumed pass continues the same grouped order. The offset applies
        # to one pass only: set it right before iterating.
        start, self.start_index = self.start_index, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """``DataLoader`` with ``state_dict``/``load_state_dict`` that Lightning saves in its checkpoints.

    The state is the epoch and the number of batches already handed to the training loop (counted on
    the consumer side, so worker prefetching does not skew it). After ``load_state_dict``, the next
    iteration over the same epoch skips those batches without loading them.

    ``lengths`` (one int per row, e.g. token counts) groups each shuffled epoch by length in megabatches
    of ``batch_size * group_factor`` rows, so batches need less padding (see ``ResumableSampler``).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        lengths: Sequence[int] | None = None,
        group_factor: int = DEFAULT_GROUP_FACTOR,
        **kwargs: Any,
    ) -> None:
        for name in ("sampler", "batch_sampler", "generator"):
            if kwargs.get(name) is not None:
                raise ValueError(
                    f"ResumableDataLoader got {name}=..., but it builds its own to be resumable; drop the"
                    f" {name!r} argument (use shuffle=/seed= to control the order)."
                )
            kwargs.pop(name, None)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"ResumableDataLoader batch_size must be a positive int, got {batch_size!r}.")
        if not isinstance(seed, int):
            raise ValueError(f"ResumableDataLoader seed must be an int, got {seed!r}.")
        sampler = ResumableSampler(
            dataset,
            shuffle=shuffle,
            seed=seed,
            num_replicas=num_replicas,
            rank=rank,
            lengths=lengths,
            batch_size=batch_size,
            group_factor=group_factor,
        )
        super().__init__(
            dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator(), **kwargs
        )
        self.seed = seed
        self._epoch = 0  # epoch of the current/last pass
        self._yielded = 0  # batches of that pass handed out
        self._resume_from: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: nothing runs until the first batch is requested, i.e. after Lightning's
        # set_epoch() on the sampler (FitLoop.setup_data creates the iterator before set_epoch).
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        epoch = sampler.epoch
        skip = 0
        if self._resume_from is not None:
            resume_epoch, resume_batches = self._resume_from
            self._resume_from = None
            if resume_epoch == epoch:
                skip = resume_batches
        self._epoch, self._yielded = epoch, skip
        sampler.start_index = skip * self.batch_size
        self.generator.manual_seed((self.seed * _SEED_MIX + epoch) % (2**63))
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler: ResumableSampler = self.sampler  # type: ignore[assignment]
        if self._resume_from is not None:
            epoch, batches = self._resume_from
        elif self._epoch == sampler.epoch:
            epoch, batches = self._epoch, self._yielded
        else:  # set_epoch() moved on and the new pass has not started yet
            epoch, batches = sampler.epoch, 0
        return {
            "version": LOADER_STATE_VERSION,
            "epoch": int(epoch),
            "batches_yielded": int(batches),
            "batch_size": int(self.batch_size),
            "dataset_len": len(self.dataset),
            "seed": int(self.seed),
            "shuffle": bool(sampler.shuffle),
            "num_replicas": int(sampler.num_replicas),
            "group_by_length": sampler.group_by_length,
            "group_factor": int(sampler.group_factor) if sampler.group_by_length else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or state_dict.get("version") != LOADER_STATE_VERSION:
            raise ValueError(
                f"Train loader state {state_dict!r} was not written by ResumableDataLoader (version"
                f" {LOADER_STATE_VERSION}); the checkpoint is corrupt or from another loader."
            )
        current = self.state_dict()
        fields = (
            "batch_size",
            "dataset_len",
            "seed",
            "shuffle",
            "num_replicas",
            "group_by_length",
            "group_factor",
        )
        for field in fields:
            # A state written before a key existed gets its default (such a loader never grouped).
            saved = state_dict.get(field, _STATE_DEFAULTS.get(field))
            if saved != current[field]:
                raise ValueError(
                    f"Cannot resume the training data mid-epoch: the checkpoint's loader has {field}="
                    f"{saved!r} but this one has {field}={current[field]!r}, so the remaining batches"
                    " would differ. Keep the same data, batch_size, seed, shuffle, group_by_length and"
                    " number of devices, or resume from an end-of-epoch checkpoint with a new DataModule."
                )
        epoch, batches = state_dict.get("epoch"), state_dict.get("batches_yielded")
        if not (
            isinstance(epoch, int) and isinstance(batches, int) and epoch >= 0 and 0 <= batches <= len(self)
        ):
            raise ValueError(
                f"Train loader state has epoch={epoch!r}, batches_yielded={batches!r}; expected ints with"
                f" 0 <= batches_yielded <= {len(self)}. The checkpoint is corrupt: resume from an earlier one."
            )
        self.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        self._resume_from = (epoch, batches)


def resumable_train_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int | None = None,
    lengths: Sequence[int] | None = None,
    **kwargs: Any,
) -> ResumableDataLoader:
    """Build the training DataLoader for exact mid-epoch resume (what ``train_dataloader`` returns).

    ``seed=None`` takes the seed given to ``lightning.seed_everything`` (env ``PL_GLOBAL_SEED``), or 0,
    as Lightning's own distributed sampler does. ``lengths`` (one int per row) groups each shuffled
    epoch by length (``group_factor=`` sets the megabatch size in batches, default 50). Other keyword
    arguments (``collate_fn``, ``num_workers``, ``drop_last``, ``pin_memory``, ...) go to ``DataLoader``.
    """
    if seed is None:
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    return ResumableDataLoader(dataset, batch_size, shuffle=shuffle, seed=seed, lengths=lengths, **kwargs)
