"""Loading through Hugging Face ``datasets``: every local file kind, folders with splits, a dataset name
from the local cache offline, clear errors for names that need the network, and column mapping."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from layermoe.data import DataError, TextDataModule
from layermoe.data.sources import load_split, read_source
from tests.conftest import write_jsonl

ROWS = [
    {"question": "2+2", "answer": "4", "label": 1},
    {"question": "capital of France", "answer": "Paris", "label": 0},
    {"question": "say hi", "answer": "hi", "label": 1},
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    kind = path.suffix
    if kind == ".jsonl":
        write_jsonl(path, rows)
    elif kind == ".json":  # one JSON array, as Alpaca ships
        path.write_text(json.dumps(rows, indent=2))
    elif kind in (".csv", ".tsv"):
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(
                handle, fieldnames=list(rows[0]), delimiter="\t" if kind == ".tsv" else ","
            )
            writer.writeheader()
            writer.writerows(rows)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".tsv", ".parquet"])
def test_each_file_kind_loads_through_datasets(tmp_path, suffix):
    path = _write(tmp_path / f"rows{suffix}", ROWS)
    rows = load_split(str(path), cache_dir=str(tmp_path / "hf"))
    assert rows == ROWS
    # read_source: the project's reader for .jsonl/.csv/.tsv (csv cells stay strings), datasets otherwise
    plain = read_source(str(path))
    assert [{k: str(v) for k, v in r.items()} for r in plain] == [
        {k: str(v) for k, v in r.items()} for r in ROWS
    ]


def test_folder_splits_and_instruction_rows_from_a_dataset(tmp_path):
    folder = tmp_path / "qa"
    _write(folder / "train.parquet", ROWS * 4)
    _write(folder / "test.parquet", ROWS[:2])
    dm = TextDataModule(
        dataset=str(folder),
        dataset_cache_dir=str(tmp_path / "hf"),
        test_split="test",
        task="instruction",
        prompt_column="question",
        response_column="answer",
        val_size=3,
    )
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"]), len(dm.datasets["test"])) == (9, 3, 2)
    test_texts = [dm.tokenizer.decode(e["input_ids"]) for e in dm.datasets["test"].examples]
    assert test_texts == ["2+2 4<eos>", "capital of France Paris<eos>"]
    with pytest.raises(DataError, match="test_split='validation' is not a split"):
        bad = TextDataModule(dataset=str(folder), test_split="validation", task="instruction")
        bad.setup("test")


def _cache_named_dataset(cache: Path, source: Path, namespace: str, name: str) -> None:
    """What ``load_dataset("namespace/name")`` leaves in the datasets cache after a download."""
    from datasets.packaged_modules.json.json import Json

    builder = Json(
        cache_dir=str(cache),
        dataset_name=name,
        config_name="default",
        config_id="default",
        data_files={"train": str(source)},
        hash="0123abcd",
    )
    builder.download_and_prepare()
    (cache / name).rename(cache / f"{namespace}___{name}")


def test_a_cached_dataset_name_loads_offline_and_an_uncached_one_fails_clearly(tmp_path):
    import datasets

    assert datasets.config.HF_HUB_OFFLINE  # conftest / lm-test run offline, as CI machines must
    cache = tmp_path / "hf"
    _cache_named_dataset(cache, _write(tmp_path / "src.jsonl", ROWS), "someone", "tiny_qa")
    dm = TextDataModule(
        dataset="someone/tiny_qa",
        dataset_cache_dir=str(cache),
        task="classification",
        text_column="question",
        label_words=["no", "yes"],
        val_size=1,
    )
    dm.setup("fit")
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 3
    with pytest.raises(
        DataError, match=r"'someone/missing' is not in the local datasets cache.*cannot be reached"
    ):
        load_split("someone/missing", cache_dir=str(cache))
    with pytest.raises(DataError, match="set either data.dataset"):
        TextDataModule(dataset="someone/tiny_qa", train_file="x.jsonl")


def test_column_mapping_errors_name_the_setting(tmp_path):
    path = _write(tmp_path / "rows.parquet", ROWS)
    with pytest.raises(DataError, match=r"no column 'prompt'.*set data.prompt_column"):
        TextDataModule(train_file=str(path), task="instruction", val_size=0).setup("fit")
    nulls = _write(tmp_path / "nulls.jsonl", [{"prompt": "a", "response": None}])
    with pytest.raises(DataError, match="row 1: column 'response' is empty"):
        TextDataModule(train_file=str(nulls), task="instruction", val_size=0).setup("fit")
    with pytest.raises(DataError, match="unknown file type"):
        load_split(str(_write(tmp_path / "rows.jsonl", ROWS).rename(tmp_path / "rows.txt")))
