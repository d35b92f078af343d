"""Less padding: eval loaders sorted by length, and length-grouped (still seeded, resumable) training order."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from torch.utils.data import TensorDataset

from layermoe.data import DataError, TextDataModule
from layermoe.data.resumable_loader import ResumableDataLoader, length_grouped_order, resumable_train_loader
from tests.conftest import toy_rows, write_jsonl

N, BATCH, FACTOR, SEED = 203, 4, 5, 7  # megabatches of 20 rows; the last batch and megabatch are short
MEGA = BATCH * FACTOR


def _lengths(n: int = N) -> list[int]:
    rng = random.Random(3)
    return [rng.randint(1, 60) for _ in range(n)]


LENGTHS = _lengths()


def _dataset(n: int = N) -> TensorDataset:
    return TensorDataset(torch.arange(n))


def _loader(grouped: bool = True, **kwargs) -> ResumableDataLoader:
    kwargs.setdefault("seed", SEED)
    lengths = LENGTHS if grouped else None
    return resumable_train_loader(_dataset(), BATCH, lengths=lengths, group_factor=FACTOR, **kwargs)


def _epoch(loader: ResumableDataLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [idx.tolist() for (idx,) in loader]


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def _mean_padded(batches: list[list[int]]) -> float:
    return sum(max(LENGTHS[i] for i in b) for b in batches) / len(batches)


# ------------------------------------------------------------------ training order
def test_grouped_order_is_a_seeded_permutation_sorted_within_megabatches() -> None:
    loader = _loader()
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    orders = [_flat(_epoch(loader, epoch)) for epoch in range(3)]
    assert torch.equal(torch.rand(1), expected_next)  # grouping draws nothing from the global generator
    for epoch, order in enumerate(orders):
        assert sorted(order) == list(range(N))  # every row exactly once
        plain = torch.randperm(N, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        assert plain == _flat(_epoch(_loader(grouped=False), epoch))
        for start in range(0, N, MEGA):
            chunk = order[start : start + MEGA]
            # same rows as the ungrouped megabatch (order stays random across megabatches) ...
            assert sorted(chunk) == sorted(plain[start : start + MEGA])
            lens = [LENGTHS[i] for i in chunk]
            assert lens == sorted(lens, reverse=True)  # ... sorted longest first
            # stable: equal lengths keep their shuffled order
            for length in set(lens):
                assert [i for i in chunk if LENGTHS[i] == length] == [
                    i for i in plain[start : start + MEGA] if LENGTHS[i] == length
                ]
    assert orders[0] != orders[1] != orders[2]
    assert _flat(_epoch(_loader(), 1)) == orders[1]  # a fresh loader: same (seed, epoch), same order
    assert _flat(_epoch(_loader(seed=SEED + 1), 1)) != orders[1]


def test_grouping_cuts_the_mean_padded_batch_length() -> None:
    grouped = [_mean_padded(_epoch(_loader(), e)) for e in range(3)]
    plain = [_mean_padded(_epoch(_loader(grouped=False), e)) for e in range(3)]
    mean_grouped, mean_plain = sum(grouped) / 3, sum(plain) / 3
    # uniform lengths 1..60, batches of 4: max of 4 draws ~ 48.8; grouped batches ~ their own mean ~ 31
    assert mean_grouped < 0.8 * mean_plain, (mean_grouped, mean_plain)


def test_grouping_follows_the_distributed_split_and_needs_shuffle() -> None:
    for rank in (0, 1):
        plain = _loader(grouped=False, num_replicas=2, rank=rank)
        grouped = _loader(num_replicas=2, rank=rank)
        share = _flat(_epoch(plain, 2))
        assert _flat(_epoch(grouped, 2)) == length_grouped_order(share, LENGTHS, MEGA)
    sequential = _loader(shuffle=False)
    assert _flat(_epoch(sequential, 1)) == list(range(N))
    assert sequential.state_dict()["group_by_length"] is False


@pytest.mark.parametrize("consumed", [0, 1, 7, 23, 51])
def test_grouped_loader_resumes_mid_epoch(consumed: int) -> None:
    uninterrupted = _epoch(_loader(), 1)
    assert len(uninterrupted) == 51
    first = _loader()
    first.sampler.set_epoch(1)
    iterator = iter(first)
    seen = [next(iterator)[0].tolist() for _ in range(consumed)]
    state = first.state_dict()
    assert (state["epoch"], state["batches_yielded"], state["group_by_length"]) == (1, consumed, True)
    assert state["group_factor"] == FACTOR
    resumed = _loader()
    resumed.load_state_dict(state)
    assert len(resumed) == len(uninterrupted)
    assert resumed.state_dict() == state
    rest = [idx.tolist() for (idx,) in resumed]
    assert rest == uninterrupted[consumed:]
    assert seen + rest == uninterrupted
    assert _epoch(resumed, 2) == _epoch(_loader(), 2)


def test_state_without_the_grouping_keys_loads_as_ungrouped() -> None:
    old = _loader(grouped=False)
    old.sampler.set_epoch(1)
    iterator = iter(old)
    seen = [next(iterator)[0].tolist() for _ in range(3)]
    state = old.state_dict()
    assert state["group_by_length"] is False and state["group_factor"] is None
    legacy = {k: v for k, v in state.items() if k not in ("group_by_length", "group_factor")}
    resumed = _loader(grouped=False)
    resumed.load_state_dict(legacy)
    assert seen + [idx.tolist() for (idx,) in resumed] == _epoch(_loader(grouped=False), 1)
    with pytest.raises(ValueError, match="group_by_length=False but this one has group_by_length=True"):
        _loader().load_state_dict(legacy)


def test_mismatched_grouping_is_refused_with_the_field_named() -> None:
    grouped_state = _loader().state_dict()
    plain_state = _loader(grouped=False).state_dict()
    with pytest.raises(ValueError, match="group_by_length=True but this one has group_by_length=False"):
        _loader(grouped=False).load_state_dict(grouped_state)
    with pytest.raises(ValueError, match="group_by_length=False but this one has group_by_length=True"):
        _loader().load_state_dict(plain_state)
    other_factor = resumable_train_loader(_dataset(), BATCH, seed=SEED, lengths=LENGTHS, group_factor=3)
    with pytest.raises(ValueError, match="group_factor=5 but this one has group_factor=3"):
        other_factor.load_state_dict(grouped_state)


def test_bad_lengths_and_group_factor_are_refused() -> None:
    with pytest.raises(ValueError, match=f"lengths has 3 entries but the dataset has {N} rows"):
        resumable_train_loader(_dataset(), BATCH, lengths=[1, 2, 3])
    with pytest.raises(ValueError, match="lengths must be"):
        resumable_train_loader(_dataset(), BATCH, lengths=[1.5] * N)
    with pytest.raises(ValueError, match="lengths must be non-negative"):
        resumable_train_loader(_dataset(), BATCH, lengths=[-1] * N)
    with pytest.raises(ValueError, match="group_factor must be a positive int"):
        resumable_train_loader(_dataset(), BATCH, lengths=LENGTHS, group_factor=0)


# ------------------------------------------------------------------ TextDataModule
def _module(tmp_path, **kwargs) -> TextDataModule:
    rows = toy_rows(90, seed=4)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    test = write_jsonl(tmp_path / "test.jsonl", toy_rows(37, seed=5))
    defaults = {
        "train_file": str(train),
        "test_file": str(test),
        "label_words": ["no", "yes"],
        "val_size": 30,
        "batch_size": 4,
        "eval_batch_size": 4,
    }
    defaults.update(kwargs)
    dm = TextDataModule(**defaults)
    dm.setup("fit")
    dm.setup("test")
    return dm


def _rows(batches) -> list[tuple[tuple[int, ...], int]]:
    """(unpadded ids, class label) of every row of every batch, in loader order."""
    out = []
    for batch in batches:
        for ids, mask, label in zip(
            batch["input_ids"], batch["attention_mask"], batch["class_label"], strict=True
        ):
            out.append((tuple(ids[mask.bool()].tolist()), int(label)))
    return out


@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_loaders_are_sorted_longest_first_and_hold_every_row_once(tmp_path, split: str) -> None:
    dm = _module(tmp_path)
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    dataset = dm.datasets[split]
    rows = _rows(loader)
    file_order = [(tuple(e["input_ids"]), e["class_label"]) for e in dataset.examples]
    assert Counter(rows) == Counter(file_order) and len(rows) == len(file_order)
    lengths = [len(ids) for ids, _ in rows]
    assert lengths == sorted(lengths, reverse=True)
    assert len(set(lengths)) > 1  # the check above is not vacuous
    # ties keep file order (stable sort)
    assert rows == sorted(file_order, key=lambda r: -len(r[0]))
    # order-invariant metrics match the file-order loader: class balance, mean length, label-token accuracy
    plain = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False, collate_fn=dm.collator())
    plain_rows = _rows(plain)
    assert Counter(label for _, label in rows) == Counter(label for _, label in plain_rows)
    assert sum(lengths) / len(lengths) == sum(len(ids) for ids, _ in plain_rows) / len(plain_rows)
    # less padding than file order
    padded_sorted = sum(b["input_ids"].numel() for b in loader)
    padded_plain = sum(b["input_ids"].numel() for b in plain)
    assert padded_sorted < padded_plain


def test_group_by_length_reaches_the_training_loader(tmp_path) -> None:
    dm = _module(tmp_path, group_by_length=True)
    loader = dm.train_dataloader()
    assert loader.sampler.lengths == [len(e["input_ids"]) for e in dm.datasets["train"].examples]
    assert loader.state_dict()["group_by_length"] is True
    rows = _rows(loader)
    assert Counter(rows) == Counter(
        (tuple(e["input_ids"]), e["class_label"]) for e in dm.datasets["train"].examples
    )
    lengths = [len(ids) for ids, _ in rows]
    # 60 train rows < one megabatch (4 * 50): the whole epoch is one sorted megabatch
    assert lengths == sorted(lengths, reverse=True)
    assert dm.hparams.group_by_length is True
    plain = _module(tmp_path, group_by_length=False).train_dataloader()
    assert plain.sampler.lengths is None and plain.state_dict()["group_by_length"] is False


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_bad_group_by_length_names_the_field(tmp_path, value) -> None:
    with pytest.raises(DataError, match="group_by_length must be true or false"):
        TextDataModule(train_file="x.jsonl", label_words=["no", "yes"], group_by_length=value)
