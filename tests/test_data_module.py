"""TextDataModule: validation carved from train (seeded, stratified), limits, test file, both tasks."""

from __future__ import annotations

from collections import Counter

import pytest

from layermoe.data import DataError, TextDataModule, read_rows
from tests.conftest import toy_rows, write_jsonl


def _module(train, **kwargs):
    defaults = {"train_file": str(train), "label_words": ["no", "yes"], "val_size": 20, "batch_size": 8}
    defaults.update(kwargs)
    return TextDataModule(**defaults)


def _texts(dataset, tokenizer):
    return sorted(tokenizer.decode(e["input_ids"][:-1]) for e in dataset.examples)


def test_validation_split_is_stratified_seeded_and_disjoint(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(100, seed=3, positive_fraction=0.3))
    _, labels = read_rows(train)
    dm = _module(train, seed=5)
    dm.setup("fit")
    val = dm.datasets["val"].examples
    counts = Counter(e["class_label"] for e in val)
    share = Counter(labels)
    # largest-remainder apportionment of 20 rows over the class sizes
    exact = {c: 20 * n / len(labels) for c, n in share.items()}
    assert abs(counts[1] - exact[1]) < 1 and abs(counts[0] - exact[0]) < 1 and sum(counts.values()) == 20
    assert len(dm.datasets["train"]) == 80
    again = _module(train, seed=5)
    again.setup("fit")
    assert _texts(again.datasets["val"], again.tokenizer) == _texts(dm.datasets["val"], dm.tokenizer)
    other = _module(train, seed=6)
    other.setup("fit")
    assert _texts(other.datasets["val"], other.tokenizer) != _texts(dm.datasets["val"], dm.tokenizer)


def test_train_limit_and_val_are_independent(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(100, seed=3))
    full = _module(train, seed=1)
    limited = _module(train, seed=1, limit_train_rows=30)
    full.setup("fit")
    limited.setup("fit")
    assert len(limited.datasets["train"]) == 30
    # the validation slice does not depend on the training limit
    assert _texts(limited.datasets["val"], limited.tokenizer) == _texts(full.datasets["val"], full.tokenizer)
    train_texts = set(_texts(limited.datasets["train"], limited.tokenizer))
    assert train_texts <= set(_texts(full.datasets["train"], full.tokenizer))


def test_loaders_batches_and_test_file(tmp_path, toy_files):
    dm = _module(toy_files["train"], test_file=str(toy_files["test"]), eval_batch_size=5)
    dm.setup("fit")
    dm.setup("test")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "class_label", "candidate_token_ids"}
    assert batch["input_ids"].shape[0] == 8
    assert ((batch["labels"] != -100).sum(dim=1) == 1).all()
    assert len(dm.datasets["test"]) == 24
    assert sum(b["input_ids"].shape[0] for b in dm.test_dataloader()) == 24
    assert dm.num_classes == 2
    # the shuffle order is a function of the seed
    order = [b["input_ids"].tolist() for b in dm.train_dataloader()]
    assert order == [b["input_ids"].tolist() for b in dm.train_dataloader()]


def test_causal_lm_mode_supervises_all_tokens(tmp_path):
    train = write_jsonl(tmp_path / "lm.jsonl", [{"text": f"line {i} " * (i % 5 + 1)} for i in range(30)])
    dm = TextDataModule(
        train_file=str(train), task="causal_lm", label_column=None, val_size=0.2, max_length=16
    )
    dm.setup("fit")
    assert len(dm.datasets["val"]) == 6 and dm.num_classes is None
    batch = next(iter(dm.train_dataloader()))
    mask = batch["attention_mask"].bool()
    assert (batch["labels"][mask] == batch["input_ids"][mask]).all()
    assert (batch["labels"][~mask] == -100).all()
    assert "class_label" not in batch


def test_configuration_errors_are_clear(tmp_path, toy_files):
    with pytest.raises(DataError, match="label_words"):
        TextDataModule(train_file=str(toy_files["train"]))
    with pytest.raises(DataError, match=r"\{text\}"):
        _module(toy_files["train"], prompt_template="no placeholder")
    with pytest.raises(DataError, match="max_length"):
        _module(toy_files["train"], max_length=1)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 2}, {"text": "b", "label": 0}] * 5)
    with pytest.raises(DataError, match="outside 0..1"):
        _module(bad, val_size=2).setup("fit")
    with pytest.raises(DataError, match="test_file"):
        _module(toy_files["train"]).setup("test")


def test_shared_sst2_reads(shared_data):
    dm = TextDataModule(
        train_file="{shared}/sst2/train.jsonl",
        val_file="{shared}/sst2/validation.jsonl",
        label_words=["negative", "positive"],
        limit_train_rows=64,
        limit_eval_rows=32,
    )
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 64 and len(dm.datasets["val"]) == 32
    assert Counter(e["class_label"] for e in dm.datasets["train"].examples).keys() == {0, 1}


def test_multi_token_label_word_fails_at_setup_with_a_real_tokenizer(smollm2_folder, toy_files):
    dm = _module(toy_files["train"], tokenizer=str(smollm2_folder), label_words=["serious", "sarcastic"])
    with pytest.raises(DataError, match=r"label word 'sarcastic'.*2 tokens.*single token"):
        dm.setup("fit")
