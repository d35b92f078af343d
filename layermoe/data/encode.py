"""Turn texts into token ids for the two tasks, and collate them into the batch format of the contract.

Batch (docs/architecture.md): ``input_ids``/``attention_mask``/``labels`` (B, T), labels -100 except the
supervised tokens; classification adds ``class_label`` (B,) and ``candidate_token_ids`` (B, C); multiple
choice evaluation batches add ``class_label`` (B,) and every option as ``choice_input_ids``,
``choice_attention_mask``, ``choice_labels`` (B, K, T') with ``choice_mask`` (B, K) marking real options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from layermoe.data.io import DataError

TEXT_FIELD = "{text}"


def check_template(template: str) -> None:
    """A prompt template must contain ``{text}`` exactly once."""
    if template.count(TEXT_FIELD) != 1:
        raise DataError(f"prompt_template must contain {TEXT_FIELD} exactly once, got {template!r}")


def label_token_ids(
    tokenizer: PreTrainedTokenizerBase, label_words: Sequence[str], separator: str = " "
) -> list[int]:
    """The single token of each verbalized label (``separator + word``); raises if any is several tokens.

    Accuracy is the argmax over these candidates at the label position, so each label must be exactly
    one token and the tokens must differ.
    """
    if len(label_words) < 2:
        raise DataError(f"label_words needs at least two classes, got {list(label_words)!r}")
    ids: list[int] = []
    for word in label_words:
        pieces = tokenizer(separator + word, add_special_tokens=False)["input_ids"]
        if len(pieces) != 1:
            shown = [tokenizer.decode([p]) for p in pieces]
            raise DataError(
                f"label word {word!r} (with label_separator {separator!r}) is {len(pieces)} tokens {shown} for this "
                "tokenizer; each label must be a single token: choose other label_words (e.g. ' yes'/' no')"
            )
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise DataError(f"label_words {list(label_words)!r} map to repeated tokens {ids}; use distinct words")
    return ids


def _truncate_text_tokens(
    ids: list[int], offsets: list[tuple[int, int]], span: tuple[int, int], budget: int
) -> list[int]:
    """Drop tokens from the end of the text span (never the template around it) until ``budget`` fits."""
    excess = len(ids) - budget
    if excess <= 0:
        return ids
    start, end = span
    inside = [i for i, (s, e) in enumerate(offsets) if e > s and e > start and s < end]
    if len(inside) < excess:
        raise DataError(
            f"max_length={budget + 1} leaves no room for the text: the template alone needs "
            f"{len(ids) - len(inside) + 1} tokens; raise max_length or shorten prompt_template"
        )
    dropped = set(inside[len(inside) - excess :])
    return [token for i, token in enumerate(ids) if i not in dropped]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, template: str, text: str, budget: int) -> list[int]:
    """Token ids of the formatted prompt, at most ``budget`` long, shortening only the text itself."""
    head, tail = template.split(TEXT_FIELD)
    prompt = head + text + tail
    encoded = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    return _truncate_text_tokens(
        list(encoded["input_ids"]),
        list(encoded["offset_mapping"]),
        (len(head), len(head) + len(text)),
        budget,
    )


def encode_classification(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    text: str,
    label: int,
    candidates: Sequence[int],
    max_length: int,
) -> dict[str, Any]:
    """Prompt tokens then the label token; the label is always kept (the text is truncated instead)."""
    if not 0 <= label < len(candidates):
        raise DataError(
            f"label {label} is outside 0..{len(candidates) - 1} (one class per label_words entry)"
        )
    ids = encode_prompt(tokenizer, template, text, max_length - 1) + [int(candidates[label])]
    return {"input_ids": ids, "label_position": len(ids) - 1, "class_label": label}


def encode_causal_lm(
    tokenizer: PreTrainedTokenizerBase, template: str, text: str, max_length: int, append_eos: bool = True
) -> dict[str, Any]:
    """Prompt tokens (plus EOS), every one supervised; truncated at ``max_length``."""
    check_template(template)
    head, tail = template.split(TEXT_FIELD)
    ids = list(tokenizer(head + text + tail, add_special_tokens=True)["input_ids"])
    if append_eos and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return {"input_ids": ids[:max_length]}


def _pad(rows: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` of encoded rows; labels keep the supervised
    tokens: one label position, a 0/1 ``supervised`` list, or (neither) every token."""
    length = max(len(e["input_ids"]) for e in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), -100, dtype=torch.long)
    for row, example in enumerate(rows):
        ids = torch.tensor(example["input_ids"], dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention[row, : len(ids)] = 1
        if "label_position" in example:
            position = example["label_position"]
            labels[row, position] = ids[position]
        elif "supervised" in example:
            keep = torch.tensor(example["supervised"], dtype=torch.bool)
            labels[row, : len(ids)] = torch.where(keep, ids, torch.full_like(ids, -100))
        else:
            labels[row, : len(ids)] = ids
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class Collator:
    """Right-pads a list of encoded examples into the contract's batch dict."""

    def __init__(
        self, pad_token_id: int, candidates: Sequence[int] | None = None, with_choices: bool = False
    ) -> None:
        self.pad_token_id = int(pad_token_id)
        self.candidates = None if candidates is None else [int(c) for c in candidates]
        self.with_choices = with_choices

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out = _pad(examples, self.pad_token_id)
        batch = len(examples)
        if self.candidates is not None:
            out["class_label"] = torch.tensor([e["class_label"] for e in examples], dtype=torch.long)
            out["candidate_token_ids"] = torch.tensor([self.candidates] * batch, dtype=torch.long)
        if self.with_choices:
            out.update(self._choices(examples))
        return out

    def _choices(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Every option of every row as (B, K, T') tensors; rows with fewer options are padded with
        empty options that ``choice_mask`` marks False."""
        options = max(len(e["choices"]) for e in examples)
        empty = {"input_ids": [self.pad_token_id], "supervised": [0]}
        flat = [(e["choices"] + [empty] * options)[:options] for e in examples]
        padded = _pad([o for row in flat for o in row], self.pad_token_id)
        shape = (len(examples), options, -1)
        return {
            "class_label": torch.tensor([e["class_label"] for e in examples], dtype=torch.long),
            "choice_input_ids": padded["input_ids"].view(shape),
            "choice_attention_mask": padded["attention_mask"].view(shape),
            "choice_labels": padded["labels"].view(shape),
            "choice_mask": torch.tensor(
                [[k < len(e["choices"]) for k in range(options)] for e in examples], dtype=torch.bool
            ),
        }
