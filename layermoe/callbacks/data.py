"""Batches for scoring: the first ``m`` validation samples and a seeded sample of ``n`` training samples.

"First" means dataset order, not the loader's order: evaluation loaders may sort rows by length to
cut padding (TextDataModule does), and scoring the ``m`` longest rows would bias the scores.

Scoring must not disturb training: the training sample is drawn with its own ``torch.Generator`` under
``isolate_rng`` (a dataset's ``__getitem__`` may draw random numbers), and no training iterator is
advanced. Map-style datasets are sampled by index through the loader's ``collate_fn``; iterable
datasets fall back to the first ``n`` samples of a fresh iterator.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch.utils.data import DataLoader, IterableDataset

from layermoe.callbacks.errors import RewireError
from layermoe.scoring.batches import slice_batch


def first_loader(loaders: Any) -> Any:
    """The first dataloader of whatever Lightning holds (a loader, a list/tuple or a dict of loaders)."""
    if loaders is None:
        return None
    if isinstance(loaders, Mapping):
        return first_loader(next(iter(loaders.values()), None))
    if isinstance(loaders, (list, tuple)):
        return first_loader(loaders[0]) if loaders else None
    return loaders


def take_samples(batches: Iterable[Any], n: int, batch_size: int | None = None) -> list[Any]:
    """The first ``n`` samples of an iterable of batches, re-cut to ``batch_size`` rows when given."""
    out: list[Any] = []
    got = 0
    for batch in batches:
        size = batch_size(batch)
        step = batch_size or size
        start = 0
        while start < size and got < n:
            stop = min(size, start + step, start + n - got)
            out.append(slice_batch(batch, start, stop, size) if (start, stop) != (0, size) else batch)
            got += stop - start
            start = stop
        if got >= n:
            break
    return out


def _map_style(loader: Any) -> bool:
    dataset = getattr(loader, "dataset", None)
    return (
        isinstance(loader, DataLoader)
        and dataset is not None
        and not isinstance(dataset, IterableDataset)
        and hasattr(dataset, "__len__")
        and len(dataset) > 0
    )


def _collate_rows(loader: DataLoader, indices: list[int], batch_size: int | None) -> list[Any]:
    """Batches of the given dataset rows, built with the loader's own ``collate_fn``."""
    size = batch_size or loader.batch_size or 8
    rows = [loader.dataset[i] for i in indices]
    return [loader.collate_fn(rows[s : s + size]) for s in range(0, len(rows), size)]


def validation_batches(loader: Any, m: int, batch_size: int | None) -> list[Any]:
    """First ``m`` validation samples in dataset order (deterministic across calls)."""
    if loader is None:
        raise RewireError(
            "scoring needs validation data: define val_dataloader() on the module or datamodule "
            "(and keep Trainer(limit_val_batches) > 0)"
        )
    with isolate_rng():
        if _map_style(loader):
            batches = _collate_rows(loader, list(range(min(m, len(loader.dataset)))), batch_size)
        else:
            batches = take_samples(loader, m, batch_size)
    if not batches:
        raise RewireError("the validation dataloader yielded no samples; scoring needs at least one")
    return batches


def training_batches(loader: Any, n: int, seed: int, batch_size: int | None) -> list[Any]:
    """A seeded random sample of ``n`` training samples, without touching the global RNG streams."""
    if loader is None:
        raise RewireError("scoring needs the training dataloader, but the trainer has none")
    with isolate_rng():
        if _map_style(loader):
            generator = torch.Generator().manual_seed(seed)
            order = torch.randperm(len(loader.dataset), generator=generator)[: min(n, len(loader.dataset))]
            return _collate_rows(loader, order.tolist(), batch_size)
        torch.manual_seed(seed)
        batches = take_samples(loader, n, batch_size)
    if not batches:
        raise RewireError("the training dataloader yielded no samples; scoring needs at least one")
    return batches


def to_device(strategy: Any, batches: Sequence[Any]) -> list[Any]:
    """Move batches with the strategy (which runs the module's batch-transfer hooks)."""
    return [strategy.batch_to_device(b) for b in batches]
