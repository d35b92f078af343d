"""Encode prompt -> response examples with the loss on the response only (instruction, multiple choice).

An example is ``input_ids`` plus ``supervised`` (one 0/1 per token): 1 on the tokens of the response
(every assistant turn, for a chat), 0 on the prompt. A token is supervised when any of its characters
belongs to the response, so a token that merges the last prompt character with the first response
character (BPE) is predicted, never dropped. Without a chat template the text is
``prompt_template`` around the prompt, then ``response_separator``, then the response, then EOS; with
one it is the template's rendering of a user turn and an assistant turn (or of the ``messages``).
Sequences longer than ``max_length`` lose tokens from the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from layermoe.data.chat import render_chat
from layermoe.data.encode import TEXT_FIELD


@dataclass(frozen=True)
class ResponseFormat:
    """How a prompt and a response become one text (see the module docstring)."""

    prompt_template: str = TEXT_FIELD
    response_separator: str = " "
    use_chat_template: bool = False
    append_eos: bool = True


def _tokenize_spans(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], add_special_tokens: bool
) -> tuple[list[int], list[int]]:
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = [int(i) for i in encoded["input_ids"]]
    supervised = [
        int(end > start and any(end > lo and start < hi for lo, hi in spans))
        for start, end in encoded["offset_mapping"]
    ]
    return ids, supervised


def encode_response(
    tokenizer: Any,
    fmt: ResponseFormat,
    prompt: str | None = None,
    response: str | None = None,
    messages: list[dict[str, str]] | None = None,
    max_length: int | None = None,
    append_eos: bool | None = None,
) -> dict[str, Any]:
    """``{"input_ids", "supervised", "full_length"}`` of one prompt/response pair or one conversation.

    ``full_length`` is the length before truncation (multiple choice drops rows whose options do not fit).
    """
    if messages is not None or fmt.use_chat_template:
        if messages is None:
            assert prompt is not None and response is not None
            messages = [
                {"role": "user", "content": fmt.prompt_template.replace(TEXT_FIELD, prompt)},
                {"role": "assistant", "content": response},
            ]
        text, spans = render_chat(tokenizer, messages)
        # apply_chat_template tokenizes without special tokens: the template writes its own.
        ids, supervised = _tokenize_spans(tokenizer, text, spans, add_special_tokens=False)
    else:
        assert prompt is not None and response is not None
        head = fmt.prompt_template.replace(TEXT_FIELD, prompt) + fmt.response_separator
        ids, supervised = _tokenize_spans(
            tokenizer, head + response, [(len(head), len(head) + len(response))], True
        )
        eos = fmt.append_eos if append_eos is None else append_eos
        if eos and tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
            supervised.append(1)
    full_length = len(ids)
    if max_length is not None:
        ids, supervised = ids[:max_length], supervised[:max_length]
    return {"input_ids": ids, "supervised": supervised, "full_length": full_length}


def encode_multiple_choice(
    tokenizer: Any, fmt: ResponseFormat, prompt: str, choices: list[str], answer: int, max_length: int
) -> dict[str, Any] | None:
    """The correct option as a training example, plus every option for scoring; None when an option
    does not fit in ``max_length`` (its score would miss tokens). Options end without EOS: their
    likelihood is that of the option text (plus the chat template's end-of-turn marker)."""
    options = [
        encode_response(tokenizer, fmt, prompt, c, max_length=max_length, append_eos=False) for c in choices
    ]
    if any(o["full_length"] > max_length or not any(o["supervised"]) for o in options):
        return None
    correct = options[answer]
    return {
        "input_ids": correct["input_ids"],
        "supervised": correct["supervised"],
        "class_label": answer,
        "choices": [{"input_ids": o["input_ids"], "supervised": o["supervised"]} for o in options],
    }
