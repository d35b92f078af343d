"""Quickstart data, fetched from PyPI at set-up time (the repository commits no third-party text).

The task is sarcasm detection on news headlines (Misra & Arora: The Onion vs. HuffPost, 28,614 rows),
as shipped in OpenAI's ``evals==3.0.1.post1`` wheel (``evals/registry/data/sarcasm/samples.jsonl``; the
wheel is MIT-licensed and its LICENSE.md lists no separate licence for this folder). ``pip download
--no-deps`` fetches the wheel (no install), and the file is read straight out of the zip.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from layermoe.data.io import DataError
from layermoe.data.split import stratified_indices
from layermoe.paths import quickstart_data_dir

REQUIREMENT = "evals==3.0.1.post1"
MEMBER = "evals/registry/data/sarcasm/samples.jsonl"
TEST_ROWS = 2000
SPLIT_SEED = 1234


def parse_sarcasm(lines: list[str]) -> tuple[list[str], list[int]]:
    """Headlines and 0/1 labels from the evals sample format (system prompt, user headline, ideal)."""
    texts: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = json.loads(line)
        users = [m["content"] for m in record["input"] if m.get("role") == "user"]
        ideal = str(record["ideal"]).strip()
        if len(users) != 1 or ideal not in ("0", "1"):
            raise DataError(
                f"{MEMBER} line {number}: unexpected format; expected one user message and ideal 0/1"
            )
        texts.append(users[0].strip())
        labels.append(int(ideal))
    return texts, labels


def _write_jsonl(path: Path, texts: list[str], labels: list[int]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for text, label in zip(texts, labels, strict=True):
            handle.write(json.dumps({"text": text, "label": label}) + "\n")
    tmp.replace(path)


def write_splits(texts: list[str], labels: list[int], folder: Path) -> dict[str, int]:
    """Write a seeded, stratified ``test.jsonl`` of ``TEST_ROWS`` rows and the rest as ``train.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    kept, taken = stratified_indices(labels, TEST_ROWS, SPLIT_SEED, field="TEST_ROWS")
    _write_jsonl(folder / "test.jsonl", [texts[i] for i in taken], [labels[i] for i in taken])
    _write_jsonl(folder / "train.jsonl", [texts[i] for i in kept], [labels[i] for i in kept])
    return {"train": len(kept), "test": len(taken)}


def fetch_quickstart(folder: Path | None = None, force: bool = False) -> Path:
    """Download the evals wheel with pip (no install) and write train/test JSONL into ``folder``."""
    folder = Path(folder) if folder is not None else quickstart_data_dir()
    if not force and (folder / "train.jsonl").is_file() and (folder / "test.jsonl").is_file():
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", REQUIREMENT, "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed (is PyPI reachable?):\n{result.stderr[-2000:]}")
        wheels = sorted(Path(tmp).glob("evals-*.whl"))
        if not wheels:
            raise RuntimeError(f"pip download of {REQUIREMENT} produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as archive:
            lines = archive.read(MEMBER).decode("utf-8").splitlines()
    texts, labels = parse_sarcasm(lines)
    write_splits(texts, labels, folder)
    return folder
