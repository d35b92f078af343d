"""Instruction data: response-only supervision token by token, and chat rendering equal to the tokenizer's
own ``apply_chat_template`` with exactly the assistant turns supervised."""

from __future__ import annotations

import pytest
import torch
from tokenizers import AddedToken

from layermoe.data import Collator, DataError, TextDataModule, build_tiny_tokenizer
from layermoe.data.chat import render_chat
from layermoe.data.responses import ResponseFormat, encode_response
from tests.conftest import write_jsonl

TEMPLATE = "Q: {text}\nA:"
PAIRS = [
    ("reverse abc", "cba"),
    ("double xy", "xyxy"),
    ("héllo wörld", "ok"),
    ("a", "a much longer reply here"),
]
CHATS = [
    [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ],
    [{"role": "user", "content": "name?"}, {"role": "assistant", "content": "tiny"}],
]


def _batch_rows(dm: TextDataModule, stage: str = "train") -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) of every row of a stage in dataset order, unpadded, through the collator."""
    batch = dm.collator()(dm.datasets[stage].examples)
    out = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        n = int(mask.sum())
        assert (labels[n:] == -100).all()  # padding carries no loss
        out.append((ids[:n].tolist(), labels[:n].tolist()))
    return out


def test_prompt_tokens_carry_no_loss_token_by_token(tmp_path):
    rows = [{"instruction": p, "output": r} for p, r in PAIRS]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = TextDataModule(
        train_file=str(train),
        task="instruction",
        prompt_column="instruction",
        response_column="output",
        prompt_template=TEMPLATE,
        val_size=0,
        max_length=128,
    )
    dm.setup("fit")
    tok = dm.tokenizer
    for (prompt, response), (ids, labels) in zip(PAIRS, _batch_rows(dm), strict=True):
        # independent reference: the byte tokenizer has no merges, so the prompt's tokens are a prefix
        head = tok(TEMPLATE.replace("{text}", prompt) + " ")["input_ids"]
        tail = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert ids == head + tail
        for position, (token, label) in enumerate(zip(ids, labels, strict=True)):
            expected = token if position >= len(head) else -100
            assert label == expected, (prompt, position)


def test_a_token_spanning_prompt_and_response_is_supervised():
    # "A: 4" becomes one token: it holds the prompt's last characters and the response's first one.
    tok = build_tiny_tokenizer()
    tok.add_tokens([AddedToken("A: 4", normalized=False)])
    merged = tok.convert_tokens_to_ids("A: 4")
    out = encode_response(tok, ResponseFormat(TEMPLATE), "2+2", "42")
    ids, supervised = out["input_ids"], out["supervised"]
    at = ids.index(merged)
    assert supervised == [0] * at + [1] * (len(ids) - at)
    assert tok.decode(ids[at:]) == "A: 42<eos>"


def test_truncation_keeps_partial_responses_and_drops_rows_without_one(tmp_path):
    rows = [{"prompt": "short", "response": "r" * 30}, {"prompt": "p" * 60, "response": "lost"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    dm = TextDataModule(train_file=str(train), task="instruction", val_size=0, max_length=20)
    with pytest.warns(UserWarning, match="dropped 1 of 2 rows"):
        dm.setup("fit")
    ((ids, labels),) = _batch_rows(dm)
    assert len(ids) == 20 and sum(label != -100 for label in labels) == 20 - len("short ")
    with pytest.raises(DataError, match="all 1 rows have no response token within max_length=20"):
        only_long = write_jsonl(tmp_path / "long.jsonl", rows[1:])
        TextDataModule(train_file=str(only_long), task="instruction", val_size=0, max_length=20).setup("fit")


def _assistant_mask(text: str, messages: list[dict[str, str]]) -> list[int]:
    """Reference mask by string search in the rendered ChatML text (byte tokenizer: one token per byte;
    these texts are ASCII): each reply plus its ``<|im_end|>\\n``."""
    mask = [0] * len(text)
    cursor = 0
    for turn in messages:
        if turn["role"] != "assistant":
            continue
        header = "<|im_start|>assistant\n"
        start = text.index(header + turn["content"], cursor) + len(header)
        end = start + len(turn["content"] + "<|im_end|>\n")
        mask[start:end] = [1] * (end - start)
        cursor = end
    return mask


def _apply_ids(tok, messages) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_chat_rows_match_apply_chat_template_and_supervise_assistant_turns_only(tmp_path):
    train = write_jsonl(tmp_path / "chat.jsonl", [{"conv": m} for m in CHATS])
    dm = TextDataModule(
        train_file=str(train), task="instruction", messages_column="conv", val_size=0, max_length=256
    )
    dm.setup("fit")
    tok = dm.tokenizer
    for messages, (ids, labels) in zip(CHATS, _batch_rows(dm), strict=True):
        assert ids == _apply_ids(tok, messages)
        text = tok.apply_chat_template(messages, tokenize=False)
        mask = _assistant_mask(text, messages)
        assert len(ids) == len(text)
        for position, (token, label) in enumerate(zip(ids, labels, strict=True)):
            assert label == (token if mask[position] else -100), position
    replies = [tok.decode([t for t in labels if t != -100]) for _, labels in _batch_rows(dm)]
    assert replies == ["hello<|im_end|>\n4<|im_end|>\n", "tiny<|im_end|>\n"]


def test_prompt_response_with_chat_template_is_a_user_and_an_assistant_turn(tmp_path):
    train = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS[:2]])
    dm = TextDataModule(
        train_file=str(train),
        task="instruction",
        use_chat_template=True,
        prompt_template=TEMPLATE,
        val_size=0,
        max_length=128,
    )
    dm.setup("fit")
    for (prompt, response), (ids, _) in zip(PAIRS[:2], _batch_rows(dm), strict=True):
        messages = [
            {"role": "user", "content": TEMPLATE.replace("{text}", prompt)},
            {"role": "assistant", "content": response},
        ]
        assert ids == _apply_ids(dm.tokenizer, messages)


def test_chat_errors_are_clear(tmp_path):
    tok = build_tiny_tokenizer()
    # a template that renders past assistant turns differently once a later turn exists
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}[old]"
        "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    with pytest.raises(DataError, match="rewrites earlier turns"):
        render_chat(tok, CHATS[0])
    with pytest.raises(DataError, match="starts with an assistant"):
        render_chat(build_tiny_tokenizer(), [{"role": "assistant", "content": "x"}])
    rows = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match="no 'assistant' message"):
        TextDataModule(
            train_file=str(rows), task="instruction", messages_column="messages", val_size=0
        ).setup("fit")
    with pytest.raises(DataError, match="set data.messages_column: messages"):
        TextDataModule(train_file=str(rows), task="instruction", val_size=0).setup("fit")


def test_instruction_batch_loss_is_the_response_only_cross_entropy(tmp_path):
    """The module's per-sample loss (what training and the callback use) against a hand computation."""
    from layermoe.lightning_modules import MoELoRAFineTuner
    from tests.conftest import tiny_llama_spec

    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p, "response": r} for p, r in PAIRS])
    dm = TextDataModule(train_file=str(train), task="instruction", prompt_template=TEMPLATE, val_size=0)
    dm.setup("fit")
    module = MoELoRAFineTuner(model=tiny_llama_spec(), task="instruction", print_layout=False)
    module.eval()
    batch = dm.collator()(dm.datasets["train"].examples)
    with torch.no_grad():
        losses = module.per_sample_loss(batch)
    for row, (ids, labels) in enumerate(_batch_rows(dm)):
        with torch.no_grad():
            logits = module.model(input_ids=torch.tensor([ids])).logits[0].double()
        terms = [
            -torch.log_softmax(logits[t - 1], dim=-1)[labels[t]]
            for t in range(1, len(ids))
            if labels[t] != -100
        ]
        assert len(terms) == len(PAIRS[row][1].encode()) + 1  # response bytes + EOS
        assert float(losses[row]) == pytest.approx(float(torch.stack(terms).mean()), abs=1e-5)


def test_exact_match_is_greedy_decoding_reproducing_the_response():
    """``greedy_exact_match`` (teacher-forced argmax on every response token) against ``generate``."""
    from layermoe.lightning_modules import MoELoRAFineTuner
    from layermoe.lightning_modules.losses import greedy_exact_match
    from tests.conftest import tiny_llama_spec

    module = MoELoRAFineTuner(model=tiny_llama_spec(), task="instruction", print_layout=False).eval()
    tok = build_tiny_tokenizer()
    rows = []
    for prompt in ("Q: a\nA:", "Q: longer prompt\nA:", "Q: x\nA:"):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.no_grad():
            generated = module.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, use_cache=True
            )[0, ids.shape[1] :].tolist()
        rows.append({"input_ids": ids[0].tolist() + generated, "supervised": [0] * ids.shape[1] + [1] * 6})
        wrong = list(generated)
        wrong[3] = (wrong[3] + 1) % 259  # one response token is not the greedy choice
        rows.append({"input_ids": ids[0].tolist() + wrong, "supervised": [0] * ids.shape[1] + [1] * 6})
    batch = Collator(tok.pad_token_id)(rows)
    with torch.no_grad():
        logits = module(batch)
    assert greedy_exact_match(logits, batch["labels"]).tolist() == [True, False] * 3
