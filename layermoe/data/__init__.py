"""Local text data for fine-tuning: file reading, splits, tokenizers, encoding and `TextDataModule`."""

from layermoe.data.encode import Collator, label_token_ids
from layermoe.data.io import DataError, read_rows
from layermoe.data.module import TextDataModule
from layermoe.data.split import stratified_indices
from layermoe.data.tokenizer import build_tiny_tokenizer, load_tokenizer

__all__ = [
    "Collator",
    "DataError",
    "TextDataModule",
    "build_tiny_tokenizer",
    "label_token_ids",
    "load_tokenizer",
    "read_rows",
    "stratified_indices",
]
