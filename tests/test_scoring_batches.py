"""Issue 23: scoring accepts any batch structure the loss accepts. The same samples packed as a dict (the
reference, whose statistics test_scoring_capture checks against torch.func), a tuple, a named tuple, a
dataclass, a ``BatchEncoding`` or a nested dict give identical statistics, also when chunks cut batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch
from transformers import BatchEncoding

from layermoe.scoring import batch_size, capture_statistics, causal_lm_per_sample_loss, slice_batch
from tests.test_scoring_capture import adapted, padded_batch


class Pair(NamedTuple):
    input_ids: torch.Tensor
    labels: torch.Tensor


@dataclass
class Record:
    input_ids: torch.Tensor
    labels: torch.Tensor
    texts: list[str]
    temperature: float = 1.0


def _as_dict(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "labels": batch["labels"]}


STRUCTURES: dict[str, tuple[Any, Any]] = {
    "tuple": (lambda b: (b["input_ids"], b["labels"]), lambda x: {"input_ids": x[0], "labels": x[1]}),
    "list": (lambda b: [b["input_ids"], b["labels"]], lambda x: {"input_ids": x[0], "labels": x[1]}),
    "namedtuple": (lambda b: Pair(b["input_ids"], b["labels"]), lambda x: x._asdict()),
    "dataclass": (
        lambda b: Record(b["input_ids"], b["labels"], [f"row {i}" for i in range(len(b["labels"]))]),
        lambda x: {"input_ids": x.input_ids, "labels": x.labels},
    ),
    "batch_encoding": (lambda b: BatchEncoding(_as_dict(b)), lambda x: x),
    "nested_dict": (
        lambda b: {"inputs": {"input_ids": b["input_ids"]}, "target": {"labels": b["labels"]}},
        lambda x: {"input_ids": x["inputs"]["input_ids"], "labels": x["target"]["labels"]},
    ),
}


@pytest.mark.parametrize("structure", sorted(STRUCTURES))
def test_any_batch_structure_gives_the_statistics_of_dict_batches(structure: str) -> None:
    pack, unpack = STRUCTURES[structure]
    model = adapted()
    train = [_as_dict(padded_batch(6, seed=0)), _as_dict(padded_batch(4, seed=1))]
    val = [_as_dict(padded_batch(5, seed=2))]
    reference = capture_statistics(model, train, val, causal_lm_per_sample_loss, chunk_size=4)
    seen_rows: list[int] = []

    def loss_fn(model: torch.nn.Module, batch: Any) -> torch.Tensor:
        if structure == "dataclass":  # the non-tensor per-sample list is cut with the tensors
            assert len(batch.texts) == batch.input_ids.shape[0]
        seen_rows.append(batch_size(batch))
        return causal_lm_per_sample_loss(model, unpack(batch))

    got = capture_statistics(model, [pack(b) for b in train], [pack(b) for b in val], loss_fn, chunk_size=4)
    assert sorted(seen_rows) == sorted([4, 2, 4, 4, 1])  # chunks of at most 4 rows
    assert got.keys() == reference.keys()
    for block in reference:
        for field in ("K_tt", "K_vt", "train_sq_norms", "val_sq_norms", "K_gt"):
            assert torch.allclose(
                getattr(got[block], field), getattr(reference[block], field), rtol=1e-12, atol=0
            )


def test_slicing_keeps_fields_without_a_batch_dimension() -> None:
    shared = torch.arange(3.0)  # e.g. class weights: leading dimension is not the batch size
    record = Record(torch.arange(10).view(5, 2), torch.arange(5), list("abcde"), temperature=0.5)
    batch = {"record": record, "weights": shared, "step": 7}
    assert batch_size(batch) == 5
    part = slice_batch(batch, 1, 3, 5)
    assert torch.equal(part["record"].input_ids, record.input_ids[1:3])
    assert part["record"].texts == ["b", "c"] and part["record"].temperature == 0.5
    assert part["weights"] is shared and part["step"] == 7
    with pytest.raises(ValueError, match="no tensor with a batch dimension"):
        batch_size({"text": ["a", "b"]})
