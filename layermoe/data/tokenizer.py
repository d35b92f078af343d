"""Tokenizers: one saved beside a model (a folder), or a tiny byte-level one built in code for tests.

The tiny tokenizer needs no download and no training: every byte is a token (byte-level BPE with no
merges) and the verbalized label words are added as whole tokens, so classification as next-token
prediction works on a tiny random model exactly as on a real one.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from layermoe.paths import resolve_path

TINY = "tiny"
TINY_SPECIALS = ("<pad>", "<eos>", "<unk>")
# ChatML, as SmolLM2-Instruct and Qwen use it (written out in bytes: the tiny vocabulary has no chat tokens).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_tiny_tokenizer(extra_tokens: Sequence[str] = ()) -> PreTrainedTokenizerBase:
    """Byte-level tokenizer with 3 specials + 256 bytes (ids 0..258), then ``extra_tokens`` as whole tokens;
    its chat template is ChatML (:data:`TINY_CHAT_TEMPLATE`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(TINY_SPECIALS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    unique = list(dict.fromkeys(t for t in extra_tokens if t))
    if unique:
        tokenizer.add_tokens([AddedToken(t, normalized=False) for t in unique])
    return tokenizer


def load_tokenizer(source: str, extra_tokens: Sequence[str] = ()) -> PreTrainedTokenizerBase:
    """``"tiny"`` builds :func:`build_tiny_tokenizer`; anything else is a local folder (placeholders allowed).

    ``extra_tokens`` only applies to the tiny tokenizer: a real tokenizer is never changed (its vocabulary
    must match the model's embeddings). A fast tokenizer is required for label-preserving truncation.
    """
    if source == TINY:
        tokenizer = build_tiny_tokenizer(extra_tokens)
    else:
        folder = resolve_path(source)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"tokenizer folder {folder} does not exist (from {source!r}); run "
                "`python -m layermoe.models prepare smollm2` or point `tokenizer` at a model folder, or use 'tiny'"
            )
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if not tokenizer.is_fast:
        raise ValueError(
            f"tokenizer {source!r} is not a fast tokenizer; offsets are needed to truncate safely"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
