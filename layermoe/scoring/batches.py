"""Batches of any structure: their size, a slice of their samples, and a map over their tensors.

Scoring never looks inside a batch: it cuts batches into chunks of samples and hands each chunk to the
user's per-sample loss, which decides what the fields mean. So a batch may be a tensor, a tuple or list
(``TensorDataset``, ``(x, y)``), a named tuple, a dataclass, a dict, a ``BatchEncoding`` or any nesting
of these. A sample is one row of the leading dimension: tensors whose first dimension is the batch size
are sliced, as are lists/tuples of non-tensors of that length (e.g. a list of strings); everything else
(scalars, a shared mask with another first dimension) is passed through unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch


def _rebuild_mapping(batch: Mapping[Any, Any], items: dict[Any, Any]) -> Any:
    try:
        return type(batch)(items)
    except Exception:  # noqa: BLE001 - a Mapping whose constructor takes something else
        return items


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(value, "_fields")


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """The same structure with ``fn`` applied to every tensor (dicts, sequences, dataclasses, nesting)."""
    if torch.is_tensor(batch):
        return fn(batch)
    if isinstance(batch, Mapping):
        return _rebuild_mapping(batch, {k: map_tensors(v, fn) for k, v in batch.items()})
    if _is_namedtuple(batch):
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: map_tensors(getattr(batch, f.name), fn) for f in dataclasses.fields(batch) if f.init
        }
        return dataclasses.replace(batch, **changes)
    return batch


def _first_tensor(batch: Any) -> torch.Tensor | None:
    found: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        if not found and tensor.dim() > 0:
            found.append(tensor)
        return tensor

    map_tensors(batch, keep)
    return found[0] if found else None


def batch_size(batch: Any) -> int:
    """Number of samples: the leading dimension of ``input_ids`` in a dict, else of the first tensor that
    has one (depth-first, field order).

    Raises:
        ValueError: the batch holds no tensor with a batch dimension.
    """
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    tensor = ids if torch.is_tensor(ids) and ids.dim() > 0 else _first_tensor(batch)
    if tensor is None:
        raise ValueError(
            f"a {type(batch).__name__} batch holds no tensor with a batch dimension; scoring slices samples "
            "along the leading dimension of the batch's tensors"
        )
    return int(tensor.shape[0])


def slice_batch(batch: Any, start: int, stop: int, size: int) -> Any:
    """Samples ``[start, stop)`` of a batch of ``size`` samples (see the module docstring for what is cut)."""
    if torch.is_tensor(batch):
        return batch[start:stop] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return _rebuild_mapping(batch, {k: slice_batch(v, start, stop, size) for k, v in batch.items()})
    if _is_namedtuple(batch):
        return type(batch)(*(slice_batch(v, start, stop, size) for v in batch))
    if isinstance(batch, (list, tuple)):
        if len(batch) == size and not any(torch.is_tensor(v) for v in batch):
            return batch[start:stop]
        return type(batch)(slice_batch(v, start, stop, size) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: slice_batch(getattr(batch, f.name), start, stop, size)
            for f in dataclasses.fields(batch)
            if f.init
        }
        return dataclasses.replace(batch, **changes)
    return batch
