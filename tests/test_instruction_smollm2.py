"""Response-only encoding with SmolLM2's real BPE tokenizer and ChatML template (slow: needs the prepared
model folder). The tiny tokenizer is byte-level; here tokens merge across the prompt/response boundary."""

from __future__ import annotations

import pytest

from layermoe.data import TextDataModule
from layermoe.data.synthetic import write_synthetic

pytestmark = pytest.mark.slow


def _supervised_text(dm: TextDataModule, example: dict) -> str:
    return dm.tokenizer.decode(
        [t for t, s in zip(example["input_ids"], example["supervised"], strict=True) if s]
    )


def test_smollm2_chat_and_prompt_response_encoding(tmp_path, smollm2_folder):
    import json

    folder = write_synthetic(tmp_path / "synthetic", train_rows=40, test_rows=4)
    chat = TextDataModule(
        train_file=str(folder / "chat" / "train.jsonl"),
        task="instruction",
        messages_column="messages",
        tokenizer=str(smollm2_folder),
        max_length=256,
        val_size=0,
    )
    chat.setup("fit")
    rows = [json.loads(line) for line in (folder / "chat" / "train.jsonl").read_text().splitlines()]
    for row, example in zip(rows, chat.datasets["train"].examples, strict=True):
        expected = chat.tokenizer.apply_chat_template(row["messages"], tokenize=True)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert example["input_ids"] == expected
        replies = [m["content"] + "<|im_end|>\n" for m in row["messages"] if m["role"] == "assistant"]
        assert _supervised_text(chat, example) == "".join(replies)

    plain = TextDataModule(
        dataset=str(folder / "instruction"),
        test_split="test",
        task="instruction",
        prompt_column="instruction",
        response_column="output",
        prompt_template="{text}\nAnswer:",
        tokenizer=str(smollm2_folder),
        val_size=0,
    )
    plain.setup("fit")
    rows = [json.loads(line) for line in (folder / "instruction" / "train.jsonl").read_text().splitlines()]
    for row, example in zip(rows, plain.datasets["train"].examples, strict=True):
        # BPE merges the separator space into the response's first token, which is then supervised
        assert _supervised_text(plain, example) == " " + row["output"] + "<|im_end|>"

    mc = TextDataModule(
        dataset=str(folder / "multiple_choice"),
        task="multiple_choice",
        prompt_column="question",
        choices_column="options",
        label_column="answer",
        tokenizer=str(smollm2_folder),
        val_size=4,
    )
    mc.setup("fit")
    for example in mc.datasets["val"].examples:
        options = [_supervised_text(mc, o) for o in example["choices"]]
        assert all(o.startswith(" ") for o in options) and len(set(options)) == 4
