"""Read local JSONL / CSV / TSV files into rows of (text, label), with errors that name the file and field."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from layermoe.paths import resolve_path

SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


class DataError(ValueError):
    """A data file, column or setting is unusable; the message names it and says how to fix it."""


def _read_records(path: Path) -> list[dict[str, Any]]:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}; use .jsonl, .csv or .tsv")
    try:
        return _parse_records(path, kind)
    except UnicodeDecodeError as err:
        raw = path.read_bytes()
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}:{line}: byte {raw[err.start : err.start + 1]!r} at offset {err.start} is not UTF-8"
            f" ({err.reason}); re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _parse_records(path: Path, kind: str) -> list[dict[str, Any]]:
    if kind == "jsonl":
        records = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(
                        f"{path}:{number}: not valid JSON ({err.msg}); expected one object per line"
                    ) from None
                if not isinstance(record, dict):
                    raise DataError(
                        f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}"
                    )
                records.append(record)
        return records
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t" if kind == "tsv" else ","))


def _as_label(value: Any, path: Path, number: int, column: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise DataError(
        f"{path} row {number}: label column {column!r} holds {value!r}; labels must be class indices 0..C-1 "
        "(map string labels to integers first)"
    )


def read_rows(
    path: str | Path, text_column: str = "text", label_column: str | None = "label"
) -> tuple[list[str], list[int] | None]:
    """Texts and (when ``label_column`` is set) integer labels of a local file.

    ``path`` may use the ``{cache}``/``{shared}``/``{quickstart}`` placeholders of
    :func:`layermoe.paths.resolve_path`.
    """
    file = resolve_path(str(path))
    if not file.is_file():
        raise DataError(f"data file {file} does not exist (from {path!r}); check the path or run the set-up")
    records = _read_records(file)
    if not records:
        raise DataError(f"{file} has no rows")
    texts: list[str] = []
    labels: list[int] | None = [] if label_column else None
    for number, record in enumerate(records, 1):
        if text_column not in record:
            raise DataError(
                f"{file} row {number} has no text column {text_column!r} (columns: {sorted(record)}); "
                "set text_column"
            )
        text = record[text_column]
        if not isinstance(text, str):
            fix = (
                "drop or fill the row (a null would otherwise train on the text 'None')"
                if text is None
                else "set text_column to the text column, or quote the value in the file if it is text"
            )
            raise DataError(
                f"{file} row {number}: text column {text_column!r} holds {text!r}"
                f" ({type(text).__name__}), not a string; {fix}"
            )
        texts.append(text)
        if labels is not None:
            if label_column not in record:
                raise DataError(
                    f"{file} row {number} has no label column {label_column!r} (columns: {sorted(record)}); "
                    "set label_column, or label_column: null for causal_lm"
                )
            labels.append(_as_label(record[label_column], file, number, label_column))
    return texts, labels
