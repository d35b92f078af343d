"""Quickstart data: parsing the evals sample format and the seeded stratified train/test split.

The download itself (pip download of the evals wheel) runs in set-up, not in tests; these tests feed
synthetic lines in the same format.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from layermoe.data import read_rows
from layermoe.data.io import DataError
from layermoe.data.quickstart import TEST_ROWS, parse_sarcasm, write_splits


def _line(text: str, ideal: str) -> str:
    system = {"role": "system", "content": "Respond with only a 1 or 0"}
    return json.dumps({"input": [system, {"role": "user", "content": text}], "ideal": ideal})


def test_parse_sarcasm_reads_user_text_and_label():
    texts, labels = parse_sarcasm([_line(" a headline ", "1"), "", _line("another", "0")])
    assert texts == ["a headline", "another"] and labels == [1, 0]
    with pytest.raises(DataError, match="line 1"):
        parse_sarcasm([_line("x", "maybe")])


def test_write_splits_is_stratified_and_complete(tmp_path):
    n = TEST_ROWS * 3
    texts = [f"headline {i}" for i in range(n)]
    labels = [int(i % 5 < 2) for i in range(n)]  # 40% positive
    sizes = write_splits(texts, labels, tmp_path)
    train, test = read_rows(tmp_path / "train.jsonl"), read_rows(tmp_path / "test.jsonl")
    assert sizes == {"train": n - TEST_ROWS, "test": TEST_ROWS}
    assert sorted(train[0] + test[0]) == sorted(texts)
    assert Counter(test[1]) == {1: TEST_ROWS * 2 // 5, 0: TEST_ROWS * 3 // 5}
    assert not list(tmp_path.glob("*.tmp"))


def test_fetched_quickstart_data_when_present():
    from layermoe.paths import quickstart_data_dir

    folder = quickstart_data_dir()
    if not (folder / "train.jsonl").is_file():
        pytest.skip(
            f"quickstart data not fetched at {folder}; run `python -m layermoe.data fetch-quickstart`"
        )
    texts, labels = read_rows(folder / "test.jsonl")
    assert len(texts) == TEST_ROWS and set(labels) == {0, 1}
