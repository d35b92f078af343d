"""Map source rows (any column names) onto the fields each task needs, with errors naming row and column.

Each task reads these fields (``ColumnMap`` says which source column holds each):

- classification: ``text``, ``label`` (a class index 0..C-1);
- causal_lm: ``text``;
- instruction: ``prompt`` and ``response``, or ``messages`` (a list of ``{"role", "content"}`` dicts);
- multiple_choice: ``prompt`` (the question), ``choices`` (a list of strings, a ``{"text": [...],
  "label": [...]}`` dict as in ARC, or several columns, one per option) and ``label`` (the correct option:
  an index, or one of the choice labels, or a letter A, B, ...).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from layermoe.data.io import DataError, _as_label

TASKS = ("classification", "causal_lm", "instruction", "multiple_choice")


@dataclass(frozen=True)
class ColumnMap:
    """Source column of each field (see the module docstring for which task reads which)."""

    text: str = "text"
    label: str | None = "label"
    prompt: str = "prompt"
    response: str = "response"
    messages: str | None = None
    choices: str | list[str] = "choices"


def _cell(record: dict[str, Any], column: str, origin: str, number: int, setting: str) -> Any:
    if column not in record:
        raise DataError(
            f"{origin} row {number} has no column {column!r} (columns: {sorted(record)}); set data.{setting}"
        )
    value = record[column]
    if value is None:
        raise DataError(f"{origin} row {number}: column {column!r} is empty (null); fix or drop the row")
    return value


def _text(record: dict[str, Any], column: str, origin: str, number: int, setting: str) -> str:
    value = _cell(record, column, origin, number, setting)
    if not isinstance(value, str):  # a number is a mistaken column, not text to train on
        raise DataError(
            f"{origin} row {number}: column {column!r} holds {type(value).__name__} {value!r}, expected text;"
            f" set data.{setting} to a text column (or quote the value in the file)"
        )
    return value


def _messages(value: Any, origin: str, number: int, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{origin} row {number}: {column!r} must be a non-empty list of messages, got {value!r}"
        )
    out = []
    for turn in value:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or turn.get("content") is None:
            raise DataError(
                f"{origin} row {number}: each message in {column!r} needs a 'role' and a 'content', got {turn!r}"
            )
        out.append({"role": turn["role"], "content": str(turn["content"])})
    if not any(turn["role"] == "assistant" for turn in out):
        raise DataError(f"{origin} row {number}: {column!r} has no 'assistant' message, so nothing to learn")
    return out


def _choices(
    record: dict[str, Any], columns: ColumnMap, origin: str, number: int
) -> tuple[list[str], list[str]]:
    """(choice texts, choice labels); the labels are ``[]`` when the source gives none."""
    if isinstance(columns.choices, list):
        texts = [_text(record, c, origin, number, "choices_column") for c in columns.choices]
        return texts, []
    value = _cell(record, columns.choices, origin, number, "choices_column")
    labels: list[str] = []
    if isinstance(value, dict):
        if "text" not in value:
            raise DataError(
                f"{origin} row {number}: choices column {columns.choices!r} is a dict without a 'text' list "
                f"(keys: {sorted(value)})"
            )
        labels = [str(v) for v in value.get("label") or []]
        value = value["text"]
    if not isinstance(value, list) or len(value) < 2 or any(v is None for v in value):
        raise DataError(
            f"{origin} row {number}: choices column {columns.choices!r} must hold a list of at least two "
            f"options, got {value!r}"
        )
    return [str(v) for v in value], labels


def _answer(value: Any, choices: list[str], labels: list[str], origin: str, number: int, column: str) -> int:
    """Index of the correct option: a choice label, an index, or a letter A, B, ..."""
    if isinstance(value, str) and value.strip() in labels:
        index = labels.index(value.strip())
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip() in string.ascii_uppercase:
        index = string.ascii_uppercase.index(value.strip())
    else:
        index = _as_label(value, origin, number, column)
    if not 0 <= index < len(choices):
        raise DataError(
            f"{origin} row {number}: answer {value!r} in column {column!r} is not one of the "
            f"{len(choices)} options (indices 0..{len(choices) - 1}, letters A.., or the choice labels)"
        )
    return index


def task_rows(
    records: list[dict[str, Any]], task: str, columns: ColumnMap, origin: str
) -> tuple[list[dict[str, Any]], list[int] | None]:
    """The task's fields of every record, and the class of each row for stratified splits (None if none)."""
    rows: list[dict[str, Any]] = []
    strata: list[int] | None = [] if task in ("classification", "multiple_choice") else None
    for number, record in enumerate(records, 1):
        if task == "causal_lm":
            rows.append({"text": _text(record, columns.text, origin, number, "text_column")})
        elif task == "classification":
            assert columns.label is not None and strata is not None
            label = _as_label(
                _cell(record, columns.label, origin, number, "label_column"), origin, number, columns.label
            )
            rows.append({"text": _text(record, columns.text, origin, number, "text_column"), "label": label})
            strata.append(label)
        elif task == "instruction":
            if columns.messages is not None:
                value = _cell(record, columns.messages, origin, number, "messages_column")
                rows.append({"messages": _messages(value, origin, number, columns.messages)})
            else:
                if columns.prompt not in record and "messages" in record:
                    raise DataError(
                        f"{origin} row {number} has no prompt column {columns.prompt!r} but has 'messages'; "
                        "for chat data set data.messages_column: messages"
                    )
                rows.append(
                    {
                        "prompt": _text(record, columns.prompt, origin, number, "prompt_column"),
                        "response": _text(record, columns.response, origin, number, "response_column"),
                    }
                )
        elif task == "multiple_choice":
            assert columns.label is not None and strata is not None
            choices, labels = _choices(record, columns, origin, number)
            answer = _answer(
                _cell(record, columns.label, origin, number, "label_column"),
                choices,
                labels,
                origin,
                number,
                columns.label,
            )
            rows.append(
                {
                    "prompt": _text(record, columns.prompt, origin, number, "prompt_column"),
                    "choices": choices,
                    "label": answer,
                }
            )
            strata.append(answer)
        else:
            raise DataError(f"task must be one of {TASKS}, got {task!r}")
    return rows, strata
