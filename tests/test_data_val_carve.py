"""Validation carved from training: announced with its size; ``val_from_train: overlap`` keeps the rows
in training; a validation file or split, when given, is what validation reads."""

from __future__ import annotations

import logging

import pytest

from layermoe.data import TextDataModule
from layermoe.data.io import DataError
from tests.conftest import toy_rows, write_jsonl

WORDS = ["no", "yes"]


def _texts(dm: TextDataModule, stage: str) -> list[tuple[int, ...]]:
    return [tuple(e["input_ids"]) for e in dm.datasets[stage].examples]


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", toy_rows(40, seed=0))


def test_holdout_carve_out_is_announced_and_removed_from_training(train_file, caplog):
    dm = TextDataModule(train_file=str(train_file), label_words=WORDS, val_size=8)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        dm.setup("fit")
    assert len(dm.datasets["val"]) == 8 and len(dm.datasets["train"]) == 32
    line = " ".join(r.getMessage() for r in caplog.records)
    assert "8 of the 40 training rows are held out" in line
    assert "data.val_file" in line and "overlap" in line


def test_overlap_scores_on_rows_that_stay_in_training(train_file, caplog):
    holdout = TextDataModule(train_file=str(train_file), label_words=WORDS, val_size=8)
    holdout.setup("fit")
    dm = TextDataModule(train_file=str(train_file), label_words=WORDS, val_size=8, val_from_train="overlap")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        dm.setup("fit")
    assert len(dm.datasets["train"]) == 40
    assert _texts(dm, "val") == _texts(holdout, "val")  # the same seeded, stratified slice
    assert set(_texts(dm, "val")) <= set(_texts(dm, "train"))
    assert "8 of the 40 training rows also serve as validation" in " ".join(
        r.getMessage() for r in caplog.records
    )


def test_a_validation_file_is_used_and_nothing_is_carved(train_file, tmp_path, caplog):
    val = write_jsonl(tmp_path / "val.jsonl", toy_rows(6, seed=5))
    dm = TextDataModule(train_file=str(train_file), val_file=str(val), label_words=WORDS, val_size=8)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        dm.setup("fit")
    alone = TextDataModule(train_file=str(val), label_words=WORDS, val_size=0)
    alone.setup("fit")
    assert len(dm.datasets["train"]) == 40
    assert _texts(dm, "val") == _texts(alone, "train")
    assert not any("Validation:" in r.getMessage() for r in caplog.records)


def test_a_validation_split_is_used(tmp_path):
    folder = tmp_path / "ds"
    write_jsonl(folder / "train.jsonl", toy_rows(30, seed=0))
    write_jsonl(folder / "validation.jsonl", toy_rows(5, seed=7))
    dm = TextDataModule(dataset=str(folder), val_split="validation", label_words=WORDS, val_size=8)
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 30 and len(dm.datasets["val"]) == 5


def test_bad_val_from_train_names_the_field():
    with pytest.raises(DataError, match="val_from_train must be one of"):
        TextDataModule(train_file="x.jsonl", label_words=WORDS, val_from_train="both")


def test_the_carve_out_counts_read_like_the_other_row_counts(caplog):
    """The quickstart printed "training on 2,000 of 26,414 rows" and then "200 of the 26614 training rows"."""
    dm = TextDataModule(train_file="unused.jsonl", label_words=WORDS, val_size=200)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        dm._announce_carve_out(200, 26_614)
    assert "200 of the 26,614 training rows are held out" in caplog.text
