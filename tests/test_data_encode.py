"""Tokenization for both tasks: single-token labels, label-preserving truncation, batch format, file reading."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from layermoe.data import Collator, DataError, build_tiny_tokenizer, label_token_ids, read_rows
from layermoe.data.encode import encode_causal_lm, encode_classification

TEMPLATE = "Q: {text}\nA:"


@pytest.fixture
def tokenizer():
    return build_tiny_tokenizer([" no", " yes"])


def test_tiny_tokenizer_is_byte_level_with_whole_label_words(tokenizer):
    text = "héllo, wörld"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte
    assert tokenizer.decode(ids) == text
    assert label_token_ids(tokenizer, ["no", "yes"]) == [
        tokenizer.convert_tokens_to_ids(" no"),
        tokenizer.convert_tokens_to_ids(" yes"),
    ]
    assert len(tokenizer) == 3 + 256 + 2


def test_multi_token_label_is_rejected_with_a_clear_error(tokenizer):
    with pytest.raises(DataError, match=r"label word 'maybe'.*single token"):
        label_token_ids(tokenizer, ["no", "maybe"])
    with pytest.raises(DataError, match="at least two classes"):
        label_token_ids(tokenizer, ["no"])


def test_classification_encoding_without_truncation_is_prompt_then_label(tokenizer):
    candidates = label_token_ids(tokenizer, ["no", "yes"])
    encoded = encode_classification(tokenizer, TEMPLATE, "abc", 1, candidates, max_length=64)
    prompt_ids = tokenizer("Q: abc\nA:")["input_ids"]
    assert encoded["input_ids"] == prompt_ids + [candidates[1]]
    assert encoded["label_position"] == len(prompt_ids)


def test_truncation_keeps_template_and_label(tokenizer):
    candidates = label_token_ids(tokenizer, ["no", "yes"])
    text = "abcdefghijklmnopqrstuvwxyz" * 4
    max_length = 20
    encoded = encode_classification(tokenizer, TEMPLATE, text, 0, candidates, max_length=max_length)
    ids = encoded["input_ids"]
    assert len(ids) == max_length
    assert ids[-1] == candidates[0]
    # byte-level: the kept text is the longest prefix that fits next to the full template
    room = max_length - 1 - len("Q: \nA:")
    assert tokenizer.decode(ids[:-1]) == f"Q: {text[:room]}\nA:"


def test_truncation_with_a_real_bpe_tokenizer_keeps_the_suffix(smollm2_folder):
    from layermoe.data import load_tokenizer

    tok = load_tokenizer(str(smollm2_folder))
    candidates = label_token_ids(tok, ["no", "yes"])
    template = "Headline: {text}\nIs this headline sarcastic? Answer:"
    text = " ".join(["remarkably"] * 60)
    encoded = encode_classification(tok, template, text, 1, candidates, max_length=24)
    decoded = tok.decode(encoded["input_ids"])
    assert len(encoded["input_ids"]) == 24
    assert decoded.startswith("Headline: remarkably")
    assert decoded.endswith("\nIs this headline sarcastic? Answer: yes")


def test_template_too_long_for_max_length_raises(tokenizer):
    candidates = label_token_ids(tokenizer, ["no", "yes"])
    with pytest.raises(DataError, match="max_length"):
        encode_classification(tokenizer, "a long template around {text} that is long", "x", 0, candidates, 8)


def test_causal_lm_encoding_supervises_every_token(tokenizer):
    encoded = encode_causal_lm(tokenizer, "{text}", "abcdef", max_length=4)
    assert encoded["input_ids"] == tokenizer("abcd")["input_ids"]
    full = encode_causal_lm(tokenizer, "{text}", "ab", max_length=10)
    assert full["input_ids"] == tokenizer("ab")["input_ids"] + [tokenizer.eos_token_id]


def test_collator_builds_the_contract_batch(tokenizer):
    candidates = label_token_ids(tokenizer, ["no", "yes"])
    examples = [
        encode_classification(tokenizer, TEMPLATE, "a", 0, candidates, 64),
        encode_classification(tokenizer, TEMPLATE, "abcd", 1, candidates, 64),
    ]
    batch = Collator(tokenizer.pad_token_id, candidates)(examples)
    lengths = [len(e["input_ids"]) for e in examples]
    assert batch["input_ids"].shape == (2, max(lengths))
    for row, example in enumerate(examples):
        n = lengths[row]
        assert batch["input_ids"][row, :n].tolist() == example["input_ids"]
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        supervised = (batch["labels"][row] != -100).nonzero().flatten().tolist()
        assert supervised == [example["label_position"]]
        assert batch["labels"][row, example["label_position"]] == candidates[example["class_label"]]
    assert batch["class_label"].tolist() == [0, 1]
    assert batch["candidate_token_ids"].tolist() == [candidates, candidates]
    assert batch["class_label"].dtype == torch.long


def test_read_rows_jsonl_csv_tsv_agree(tmp_path):
    rows = [{"sentence": "a, b", "y": 1}, {"sentence": 'say "hi"', "y": 0}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, delimiter in (("d.csv", ","), ("d.tsv", "\t")):
        with (tmp_path / name).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["sentence", "y"], delimiter=delimiter)
            writer.writeheader()
            writer.writerows(rows)
    expected = (["a, b", 'say "hi"'], [1, 0])
    for name in ("d.jsonl", "d.csv", "d.tsv"):
        assert read_rows(tmp_path / name, "sentence", "y") == expected


def test_read_rows_errors_name_the_problem(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "label": "positive"}) + "\n")
    with pytest.raises(DataError, match="label column 'label'.*class indices"):
        read_rows(path)
    with pytest.raises(DataError, match="no text column 'sentence'"):
        read_rows(path, text_column="sentence")
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "missing.jsonl")
    (tmp_path / "d.parquet").write_text("")
    with pytest.raises(DataError, match="unknown file type"):
        read_rows(tmp_path / "d.parquet")
