"""Shared fixtures: tiny model specs and data files written to tmp_path, and skips for optional assets."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP threads that
# wait for each other make a tiny training step ~50x slower. Subprocesses inherit the variable.
# `make test-slow` sets LAYERMOE_TEST_THREADS=2 for the real-model tests.
os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("LAYERMOE_TEST_THREADS", "1"))

import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("LAYERMOE_TEST_THREADS", "1")))

TINY_VOCAB = 320  # >= the tiny tokenizer's 259 byte/special tokens plus label words


def tiny_llama_spec(num_blocks: int = 2, hidden: int = 32) -> dict[str, Any]:
    """Plain-data config of a tiny random Llama, as `MoELoRAFineTuner(model=...)` takes it."""
    return {
        "type": "llama",
        "vocab_size": TINY_VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": num_blocks,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "tie_word_embeddings": False,
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path


def toy_rows(n: int, seed: int = 0, positive_fraction: float = 0.5) -> list[dict[str, Any]]:
    """A learnable two-class task: the class decides the first word, the rest is noise."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma"]
    rows = []
    for _ in range(n):
        label = int(rng.random() < positive_fraction)
        lead = "great" if label else "awful"
        rows.append({"text": " ".join([lead] + rng.choices(words, k=rng.randint(1, 6))), "label": label})
    return rows


@pytest.fixture
def tiny_spec() -> dict[str, Any]:
    return tiny_llama_spec()


def write_toy_files(root: Path) -> dict[str, Path]:
    """root/data/train.jsonl (96 rows) and root/data/test.jsonl (24 rows) of the toy task; a plain
    function so that module-scoped fixtures write the same files as the ``toy_files`` fixture."""
    return {
        "train": write_jsonl(root / "data" / "train.jsonl", toy_rows(96, seed=0)),
        "test": write_jsonl(root / "data" / "test.jsonl", toy_rows(24, seed=1)),
    }


@pytest.fixture
def toy_files(tmp_path: Path) -> dict[str, Path]:
    """train.jsonl (96 rows) and test.jsonl (24 rows) of the toy task."""
    return write_toy_files(tmp_path)


@pytest.fixture
def shared_data() -> Path:
    """The read-only CoLA/SST-2 folder, or skip when it is not beside the repository."""
    from layermoe.paths import shared_data_dir

    folder = shared_data_dir()
    if not (folder / "sst2" / "train.jsonl").is_file():
        pytest.skip(
            f"shared data not found at {folder} (set LAYERMOE_SHARED_DATA or place ../shared beside the repo)"
        )
    return folder


@pytest.fixture
def smollm2_folder() -> Path:
    """The prepared SmolLM2 folder, or skip with the command that prepares it."""
    from layermoe.models import is_prepared, smollm2_dir

    folder = smollm2_dir()
    if not is_prepared(folder):
        pytest.skip(f"SmolLM2 not prepared at {folder}; run `python -m layermoe.models prepare smollm2`")
    return folder
