"""Render a conversation with the tokenizer's chat template, and find the characters the assistant wrote.

The text is exactly what ``tokenizer.apply_chat_template(messages, tokenize=False)`` returns, so the
token ids equal ``apply_chat_template(messages, tokenize=True)``. Each assistant turn's span runs from
the end of the conversation before it rendered with the generation prompt (``<|im_start|>assistant\\n``
for ChatML) to the end of the conversation through it: the reply and the template's end-of-turn
marker, so the model learns to stop. Templates that render earlier turns differently once later turns
exist (some strip reasoning from past replies) have no such spans and are refused.
"""

from __future__ import annotations

from typing import Any

from layermoe.data.io import DataError


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def check_chat_template(tokenizer: Any, source: str) -> None:
    """Raise early when the tokenizer has no chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {source!r} has no chat template, needed for data.messages_column or "
            "data.use_chat_template; use an instruct model's tokenizer, or prompt/response columns with "
            "use_chat_template: false"
        )


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of every assistant turn including its end-of-turn marker)."""
    text = _render(tokenizer, messages, generation_prompt=False)
    spans: list[tuple[int, int]] = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if index == 0:
            raise DataError("a conversation starts with an assistant message; put the user message first")
        before = _render(tokenizer, messages[:index], generation_prompt=True)
        through = _render(tokenizer, messages[: index + 1], generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                "the tokenizer's chat template does not render a conversation as a prefix of its "
                "continuation (it rewrites earlier turns), so assistant tokens cannot be located; use "
                "prompt/response columns without the chat template"
            )
        spans.append((len(before), len(through)))
    return text, spans
