"""Data for fine-tuning: local files and Hugging Face datasets, column mapping, splits, tokenizers, chat
templates, response-only encoding, the resumable training loader and `TextDataModule`."""

from layermoe.data.chat import render_chat
from layermoe.data.columns import ColumnMap, task_rows
from layermoe.data.encode import Collator, label_token_ids
from layermoe.data.io import DataError, read_rows
from layermoe.data.module import TextDataModule
from layermoe.data.responses import ResponseFormat, encode_multiple_choice, encode_response
from layermoe.data.resumable_loader import ResumableDataLoader, ResumableSampler, resumable_train_loader
from layermoe.data.sources import load_split, read_source
from layermoe.data.split import stratified_indices
from layermoe.data.tokenizer import build_tiny_tokenizer, load_tokenizer

__all__ = [
    "Collator",
    "ColumnMap",
    "DataError",
    "ResponseFormat",
    "ResumableDataLoader",
    "ResumableSampler",
    "TextDataModule",
    "build_tiny_tokenizer",
    "encode_multiple_choice",
    "encode_response",
    "label_token_ids",
    "load_split",
    "load_tokenizer",
    "read_rows",
    "read_source",
    "render_chat",
    "resumable_train_loader",
    "stratified_indices",
    "task_rows",
]
