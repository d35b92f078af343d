"""Tiny Hugging Face models built in-process from a config (no download), shared by the tests."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 64


def tiny_sizes(num_blocks: int, hidden: int = 32, positions: int = 128) -> dict[str, int]:
    """The sizes of a tiny model, under the names Llama's, Qwen2's and BERT's configs give them."""
    return {
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": num_blocks,
        "num_attention_heads": 4,
        "max_position_embeddings": positions,
    }


def tiny_llama(num_blocks: int = 3, hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**tiny_sizes(num_blocks, hidden), num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2(num_blocks: int = 2, hidden: int = 32, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(**tiny_sizes(num_blocks, hidden), num_key_value_heads=2)
    return Qwen2ForCausalLM(config).eval()


def tiny_gpt2(num_blocks: int = 2, hidden: int = 32, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=num_blocks,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config).eval()


def tiny_bert(num_blocks: int = 2, hidden: int = 32, seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(BertConfig(**tiny_sizes(num_blocks, hidden))).eval()


def random_tokens(batch: int = 4, length: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)
