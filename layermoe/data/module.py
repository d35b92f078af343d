"""`TextDataModule`: local text files -> tokenized batches for classification or causal-LM fine-tuning.

Classification is next-token prediction over verbalized labels: the prompt is followed by the single
token of its class's label word, only that token is supervised, and accuracy is the argmax of the logits
over the candidate label tokens. The validation split can be carved out of train (seeded, stratified),
which is what the influence callback scores on.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset

from layermoe.data.encode import (
    Collator,
    check_template,
    encode_causal_lm,
    encode_classification,
    label_token_ids,
)
from layermoe.data.io import DataError, read_rows
from layermoe.data.split import stratified_indices
from layermoe.data.tokenizer import TINY, load_tokenizer
from layermoe.layout import is_int_at_least

Task = Literal["classification", "causal_lm"]


class EncodedDataset(Dataset):
    """A list of encoded examples (token ids are built once, in ``setup``)."""

    def __init__(self, examples: list[dict[str, Any]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.examples[index]

    def lengths(self) -> list[int]:
        """Token count of each example (its unpadded length), in dataset order."""
        return [len(e["input_ids"]) for e in self.examples]


class TextDataModule(pl.LightningDataModule):
    """Reads local JSONL/CSV/TSV files and serves batches in the format of docs/architecture.md.

    Args:
        train_file: training rows; ``{cache}``, ``{shared}``, ``{quickstart}`` placeholders allowed.
        val_file: validation rows; when None, ``val_size`` rows (int) or fraction (float) of train are
            carved out, stratified by label and seeded (0 disables validation).
        test_file: rows for ``trainer.test``.
        text_column / label_column: column names (``label_column: null`` for unlabeled causal-LM text).
        task: "classification" (verbalized labels) or "causal_lm" (every token supervised).
        tokenizer: a model folder, or "tiny" (byte-level, built in code; label words become whole tokens).
        prompt_template: must contain ``{text}``; e.g. "Headline: {text}\\nSarcastic:".
        label_words / label_separator: class c is verbalized as ``label_separator + label_words[c]``,
            which must be a single token.
        max_length: longest sequence; longer prompts lose text tokens from the end, never the label.
        limit_train_rows / limit_eval_rows: keep a seeded, stratified subset of train / of val and test.
        batch_size / eval_batch_size / num_workers / seed: loader settings; ``seed`` drives the split,
            the limits and the training shuffle order.
        group_by_length: group each shuffled training epoch by token length (megabatches of 50 batches,
            each sorted longest first, as Hugging Face's ``group_by_length``) so batches need less
            padding; the order stays seeded and resumable. Validation and test batches are always
            sorted by length.
    """

    def __init__(
        self,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        text_column: str = "text",
        label_column: str | None = "label",
        task: Task = "classification",
        tokenizer: str = TINY,
        prompt_template: str = "{text}",
        label_words: list[str] | None = None,
        label_separator: str = " ",
        max_length: int = 64,
        val_size: float | int = 0.1,
        limit_train_rows: int | None = None,
        limit_eval_rows: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        append_eos: bool = True,
        group_by_length: bool = False,
    ) -> None:
        super().__init__()
        if task not in ("classification", "causal_lm"):
            raise DataError(f"task must be 'classification' or 'causal_lm', got {task!r}")
        if task == "classification":
            if not label_words:
                raise DataError("task 'classification' needs label_words, e.g. ['no', 'yes'] (one per class)")
            if label_column is None:
                raise DataError("task 'classification' needs label_column (the column holding class indices)")
        check_template(prompt_template)
        if not is_int_at_least(max_length, 2):
            raise DataError(f"max_length must be an int >= 2, got {max_length!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size or 1)):
            if not is_int_at_least(value):
                raise DataError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("limit_train_rows", limit_train_rows), ("limit_eval_rows", limit_eval_rows)):
            if value is not None and not is_int_at_least(value):
                raise DataError(f"{name} must be a positive int or null, got {value!r}")
        if not isinstance(group_by_length, bool):
            raise DataError(f"group_by_length must be true or false, got {group_by_length!r}")
        self.save_hyperparameters()
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file
        self.text_column = text_column
        self.label_column = label_column if task == "classification" or label_column else None
        self.task = task
        self.tokenizer_source = tokenizer
        self.prompt_template = prompt_template
        self.label_words = list(label_words) if label_words else None
        self.label_separator = label_separator
        self.max_length = max_length
        self.val_size = val_size
        self.limit_train_rows = limit_train_rows
        self.limit_eval_rows = limit_eval_rows
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.append_eos = append_eos
        self.group_by_length = group_by_length
        self.tokenizer: Any = None
        self.candidate_ids: list[int] | None = None
        self.datasets: dict[str, EncodedDataset] = {}
        self._built: set[str] = set()

    # ------------------------------------------------------------------ set-up
    @property
    def num_classes(self) -> int | None:
        """Number of classes (len(label_words)) for classification, None for causal LM."""
        return len(self.label_words) if self.task == "classification" and self.label_words else None

    def prepare_tokenizer(self) -> Any:
        """Load the tokenizer once and check the label words (each must be a single token)."""
        if self.tokenizer is None:
            extra = [self.label_separator + w for w in self.label_words or []]
            tokenizer = load_tokenizer(self.tokenizer_source, extra_tokens=extra)
            if self.task == "classification":
                self.candidate_ids = label_token_ids(tokenizer, self.label_words, self.label_separator)
            self.tokenizer = tokenizer
        return self.tokenizer

    def _encode(self, texts: list[str], labels: list[int] | None) -> EncodedDataset:
        tok = self.prepare_tokenizer()
        if self.task == "classification":
            assert labels is not None and self.candidate_ids is not None
            examples = [
                encode_classification(tok, self.prompt_template, t, y, self.candidate_ids, self.max_length)
                for t, y in zip(texts, labels, strict=True)
            ]
        else:
            examples = [
                encode_causal_lm(tok, self.prompt_template, t, self.max_length, self.append_eos)
                for t in texts
            ]
        return EncodedDataset(examples)

    def _read(self, path: str) -> tuple[list[str], list[int] | None]:
        return read_rows(path, self.text_column, self.label_column)

    @staticmethod
    def _subset(
        texts: list[str], labels: list[int] | None, index: list[int]
    ) -> tuple[list[str], list[int] | None]:
        return [texts[i] for i in index], None if labels is None else [labels[i] for i in index]

    def _limit(
        self, texts: list[str], labels: list[int] | None, limit: int | None, field: str
    ) -> tuple[list[str], list[int] | None]:
        if limit is None or limit >= len(texts):
            return texts, labels
        _, taken = stratified_indices(labels, limit, self.seed + 1, total=len(texts), field=field)
        return self._subset(texts, labels, taken)

    def _carve_val(
        self, texts: list[str], labels: list[int] | None
    ) -> tuple[tuple[list[str], list[int] | None], tuple[list[str], list[int] | None] | None]:
        """(train rows, validation rows): from ``val_file`` if given, else a stratified slice of train."""
        if self.val_file is not None:
            return (texts, labels), self._read(self.val_file)
        if not self.val_size:
            return (texts, labels), None
        kept, taken = stratified_indices(labels, self.val_size, self.seed, total=len(texts))
        return self._subset(texts, labels, kept), self._subset(texts, labels, taken)

    def setup(self, stage: str | None = None) -> None:
        """Read, split and tokenize what ``stage`` needs (once; later calls reuse the datasets)."""
        self.prepare_tokenizer()
        if stage in (None, "fit", "validate") and "fit" not in self._built:
            if self.train_file is not None:
                train, val = self._carve_val(*self._read(self.train_file))
                self.datasets["train"] = self._encode(
                    *self._limit(*train, self.limit_train_rows, "limit_train_rows")
                )
            elif stage == "validate" and self.val_file is not None:
                val = self._read(self.val_file)
            else:
                raise DataError("train_file is not set; give the training data file")
            if val is not None:
                self.datasets["val"] = self._encode(
                    *self._limit(*val, self.limit_eval_rows, "limit_eval_rows")
                )
            self._built.add("fit")
        if stage in (None, "test") and "test" not in self._built:
            if self.test_file is None:
                if stage == "test":
                    raise DataError("trainer.test needs data.test_file; set it to a labeled file")
            else:
                test = self._read(self.test_file)
                self.datasets["test"] = self._encode(
                    *self._limit(*test, self.limit_eval_rows, "limit_eval_rows")
                )
            self._built.add("test")

    # ------------------------------------------------------------------ loaders
    def collator(self) -> Collator:
        """The batch builder (pads with the tokenizer's pad token)."""
        tokenizer = self.prepare_tokenizer()
        return Collator(tokenizer.pad_token_id, self.candidate_ids if self.task == "classification" else None)

    def train_dataloader(self) -> DataLoader:
        """The only place the training loader is built: shuffled by ``seed`` + epoch, and resumable.

        Lightning saves its position in every checkpoint and resumes it mid-epoch (see
        ``layermoe.checkpointing.resumable_train_loader``); iterating it draws nothing from the global RNG.
        With ``group_by_length`` the shuffled order is grouped by token length (less padding per batch).
        """
        from layermoe.checkpointing import resumable_train_loader

        train = self.datasets["train"]
        return resumable_train_loader(
            train,
            self.batch_size,
            shuffle=True,
            seed=self.seed,
            lengths=train.lengths() if self.group_by_length else None,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
            drop_last=False,
        )

    def _eval_loader(self, name: str) -> DataLoader | list:
        """Rows longest first (stable: ties keep file order), so each batch holds similar lengths."""
        if name not in self.datasets:
            return []
        dataset = self.datasets[name]
        lengths = dataset.lengths()
        # Batches are right-padded to their longest row; sorting by length cuts that padding (and the
        # compute spent on it). Accuracy, MCC and mean loss do not depend on the order of the rows.
        order = sorted(range(len(dataset)), key=lambda i: -lengths[i])
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            sampler=order,
            collate_fn=self.collator(),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation loader, rows longest first (empty list when validation is disabled)."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        """Test loader, rows longest first."""
        return self._eval_loader("test")
