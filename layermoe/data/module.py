"""`TextDataModule`: local files or Hugging Face datasets -> tokenized batches for fine-tuning.

Tasks: classification is next-token prediction over verbalized labels (the prompt is followed by the
single token of its class's label word, only that token is supervised, and accuracy is the argmax of the
logits over the candidate label tokens); causal_lm supervises every token; instruction supervises the
response tokens only (prompt/response columns, or a chat ``messages`` column rendered with the
tokenizer's chat template); multiple_choice trains on the correct option as the response and evaluates
by scoring every option. The validation split can be carved out of train (seeded, stratified), which is
what the influence callback scores on.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from layermoe.data.chat import check_chat_template
from layermoe.data.columns import TASKS, ColumnMap, task_rows
from layermoe.data.encode import (
    Collator,
    check_template,
    encode_causal_lm,
    encode_classification,
    label_token_ids,
)
from layermoe.data.io import DataError, read_rows
from layermoe.data.responses import ResponseFormat, encode_multiple_choice, encode_response
from layermoe.data.resumable_loader import resumable_train_loader
from layermoe.data.sources import PROJECT_READER_SUFFIXES, load_split, read_source
from layermoe.data.split import stratified_indices
from layermoe.data.tokenizer import TINY, load_tokenizer
from layermoe.layout import is_int_at_least
from layermoe.paths import resolve_path

Task = Literal["classification", "causal_lm", "instruction", "multiple_choice"]
Rows = tuple[list[dict[str, Any]], list[int] | None]
STAGE_SPLITS = {"train": "train_split", "val": "val_split", "test": "test_split"}
VAL_FROM_TRAIN = ("holdout", "overlap")


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


STAGE_NAMES = {"train": "training", "val": "validation", "test": "test"}


class TextDataModule(pl.LightningDataModule):
    """Reads local files or a Hugging Face dataset and serves batches in the format of docs/architecture.md.

    Args:
        train_file: training rows (``.jsonl``, ``.csv``, ``.tsv``, ``.json``, ``.parquet``); ``{cache}``,
            ``{shared}``, ``{quickstart}`` placeholders allowed.
        val_file: validation rows; when None (and no ``val_split``), ``val_size`` rows (int) or fraction
            (float) of train are carved out, stratified by label and seeded (0 disables validation), and
            a line at set-up says so.
        val_from_train: what carving does to those rows: "holdout" (taken out of training) or "overlap"
            (they stay in training too: validation then measures fit to trained rows, not generalization,
            but no training row is lost).
        test_file: rows for ``trainer.test``.
        dataset / dataset_config / dataset_cache_dir: instead of the files, a Hugging Face dataset: a
            name (from the local cache when offline), a local folder of data files, or one local file;
            its ``train_split`` / ``val_split`` / ``test_split`` (``datasets`` slicing such as
            ``"train[:2000]"`` allowed) are used.
        text_column / label_column: column names (``label_column: null`` for unlabeled causal-LM text);
            for multiple_choice, ``label_column`` holds the correct option.
        prompt_column / response_column / messages_column: instruction columns; ``messages_column`` set
            means chat data (a list of role/content messages per row). ``prompt_column`` is also the
            question of multiple_choice.
        choices_column: multiple_choice options: a column holding a list (or an ARC-style
            ``{"text": [...], "label": [...]}`` dict), or a list of columns, one per option.
        task: "classification" (verbalized labels), "causal_lm" (every token supervised),
            "instruction" (response tokens supervised) or "multiple_choice" (options scored).
        use_chat_template: render prompt/response pairs (instruction, multiple_choice) as a user turn and
            an assistant turn with the tokenizer's chat template.
        response_separator: without a chat template, the text between the formatted prompt and the
            response (or option).
        tokenizer: a model folder, or "tiny" (byte-level, built in code; label words become whole tokens).
        prompt_template: must contain ``{text}`` (the text, or the prompt); e.g. "Headline: {text}\\nSarcastic:".
        label_words / label_separator: class c is verbalized as ``label_separator + label_words[c]``,
            which must be a single token.
        max_length: longest sequence; longer prompts lose text tokens from the end, never the label;
            instruction rows lose tokens from the end (rows with no response token left are dropped,
            with a warning); multiple_choice rows with an option that does not fit are dropped.
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
        val_size: int | float = 0.1,  # int first: jsonargparse would turn a row count into a float
        val_from_train: str = "holdout",
        limit_train_rows: int | None = None,
        limit_eval_rows: int | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        append_eos: bool = True,
        group_by_length: bool = False,
        dataset: str | None = None,
        dataset_config: str | None = None,
        dataset_cache_dir: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        test_split: str | None = None,
        prompt_column: str = "prompt",
        response_column: str = "response",
        messages_column: str | None = None,
        choices_column: str | list[str] = "choices",
        use_chat_template: bool = False,
        response_separator: str = " ",
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise DataError(f"task must be one of {list(TASKS)}, got {task!r}")
        if dataset is not None and any(f is not None for f in (train_file, val_file, test_file)):
            raise DataError(
                "set either data.dataset (with train_split / val_split / test_split) or "
                "data.train_file / val_file / test_file, not both"
            )
        if task == "multiple_choice" and label_column is None:
            raise DataError(
                "task 'multiple_choice' needs label_column (the column holding the correct option)"
            )
        if isinstance(choices_column, list) and len(choices_column) < 2:
            raise DataError(
                f"choices_column as a list needs one column per option (>= 2), got {choices_column}"
            )
        if task == "classification":
            if not label_words:
                raise DataError("task 'classification' needs label_words, e.g. ['no', 'yes'] (one per class)")
            if label_column is None:
                raise DataError("task 'classification' needs label_column (the column holding class indices)")
        check_template(prompt_template)
        if val_from_train not in VAL_FROM_TRAIN:
            raise DataError(
                f"val_from_train must be one of {list(VAL_FROM_TRAIN)}, got {val_from_train!r}: 'holdout' "
                "takes the validation rows out of training, 'overlap' scores on rows that also train"
            )
        if not is_int_at_least(max_length, 2):
            raise DataError(f"max_length must be an int >= 2, got {max_length!r}")
        if not is_int_at_least(batch_size):
            raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
        if eval_batch_size is not None and not is_int_at_least(eval_batch_size):
            raise DataError(
                f"eval_batch_size must be a positive int, or null for batch_size, got {eval_batch_size!r}"
            )
        for name, value in (("limit_train_rows", limit_train_rows), ("limit_eval_rows", limit_eval_rows)):
            if value is not None and not is_int_at_least(value):
                raise DataError(f"{name} must be a positive int or null, got {value!r}")
        if not isinstance(group_by_length, bool):
            raise DataError(f"group_by_length must be true or false, got {group_by_length!r}")
        self.save_hyperparameters()
        self.train_file, self.val_file, self.test_file = train_file, val_file, test_file
        self.text_column = text_column
        self.label_column = label_column if task == "classification" or label_column else None
        if task == "instruction":
            self.label_column = None
        self.task = task
        self.dataset, self.dataset_config, self.dataset_cache_dir = dataset, dataset_config, dataset_cache_dir
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.columns = ColumnMap(
            text=text_column,
            label=self.label_column,
            prompt=prompt_column,
            response=response_column,
            messages=messages_column,
            choices=list(choices_column) if isinstance(choices_column, list) else choices_column,
        )
        self.response_format = ResponseFormat(
            prompt_template, response_separator, use_chat_template, append_eos
        )
        self.tokenizer_source = tokenizer
        self.prompt_template = prompt_template
        self.label_words = list(label_words) if label_words else None
        self.label_separator = label_separator
        self.max_length = max_length
        self.val_size = val_size
        self.val_from_train = val_from_train
        self.limit_train_rows = limit_train_rows
        self.limit_eval_rows = limit_eval_rows
        self.batch_size = batch_size
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
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
            if self.columns.messages is not None or self.response_format.use_chat_template:
                check_chat_template(tokenizer, self.tokenizer_source)
            self.tokenizer = tokenizer
        return self.tokenizer

    def _encode(self, rows: list[dict[str, Any]], strata: list[int] | None = None) -> EncodedDataset:
        tok = self.prepare_tokenizer()
        if self.task == "classification":
            assert self.candidate_ids is not None
            examples = [
                encode_classification(
                    tok, self.prompt_template, r["text"], r["label"], self.candidate_ids, self.max_length
                )
                for r in rows
            ]
        elif self.task == "causal_lm":
            examples = [
                encode_causal_lm(tok, self.prompt_template, r["text"], self.max_length, self.append_eos)
                for r in rows
            ]
        elif self.task == "instruction":
            fmt = self.response_format
            encoded = [
                encode_response(
                    tok, fmt, r.get("prompt"), r.get("response"), r.get("messages"), self.max_length
                )
                for r in rows
            ]
            examples = [e for e in encoded if any(e["supervised"])]
            self._report_dropped(len(rows) - len(examples), len(rows), "have no response token within")
        else:
            encoded = [
                encode_multiple_choice(
                    tok, self.response_format, r["prompt"], r["choices"], r["label"], self.max_length
                )
                for r in rows
            ]
            examples = [e for e in encoded if e is not None]
            self._report_dropped(len(rows) - len(examples), len(rows), "have an option longer than")
        return EncodedDataset(examples)

    def _report_dropped(self, dropped: int, total: int, why: str) -> None:
        if dropped == total:
            raise DataError(f"all {total} rows {why} max_length={self.max_length}; raise data.max_length")
        if dropped:
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"dropped {dropped} of {total} rows that {why} max_length={self.max_length}")

    def _source(self, stage: str) -> str | None:
        """What ``stage`` ("train", "val", "test") reads: its file, or the dataset when it has that split."""
        if self.dataset is not None:
            return self.dataset if self.splits[stage] is not None else None
        return {"train": self.train_file, "val": self.val_file, "test": self.test_file}[stage]

    def _read(self, stage: str) -> Rows:
        """The task's rows of ``stage`` and their classes (for stratified splits)."""
        if self.dataset is not None:
            split = self.splits[stage]
            assert split is not None
            records = load_split(
                self.dataset, split, self.dataset_config, self.dataset_cache_dir, field=STAGE_SPLITS[stage]
            )
            return task_rows(records, self.task, self.columns, f"{self.dataset} [{split}]")
        path = self._source(stage)
        assert path is not None
        legacy = self.task in ("classification", "causal_lm")
        if legacy and resolve_path(path).suffix.lower() in PROJECT_READER_SUFFIXES:
            texts, labels = read_rows(path, self.text_column, self.label_column)
            if labels is None:
                return [{"text": t} for t in texts], None
            return [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)], labels
        return task_rows(read_source(path), self.task, self.columns, str(resolve_path(path)))

    @staticmethod
    def _subset(rows: list[dict[str, Any]], strata: list[int] | None, index: list[int]) -> Rows:
        return [rows[i] for i in index], None if strata is None else [strata[i] for i in index]

    def _limit(
        self, rows: list[dict[str, Any]], strata: list[int] | None, limit: int | None, field: str
    ) -> Rows:
        if limit is None or limit >= len(rows):
            return rows, strata
        _, taken = stratified_indices(strata, limit, self.seed + 1, total=len(rows), field=field)
        return self._subset(rows, strata, taken)

    def _announce_rows(self, stage: str, available: int, field: str) -> None:
        """Say how many rows ``stage`` uses out of those available, and which setting limits them."""
        used = len(self.datasets[stage])
        shown = f"all {used:,}" if used == available else f"{used:,} of {available:,}"
        line = f"data: {STAGE_NAMES[stage]} on {shown} rows"
        limit = getattr(self, field)
        if limit is not None and limit < available:
            line += f" (data.{field}: {limit}; null uses them all)"
        rank_zero_info(line)

    def _carve_val(self, rows: list[dict[str, Any]], strata: list[int] | None) -> tuple[Rows, Rows | None]:
        """(train rows, validation rows): from the validation source if any, else a stratified slice of train."""
        if self._source("val") is not None:
            return (rows, strata), self._read("val")
        if not self.val_size:
            return (rows, strata), None
        kept, taken = stratified_indices(strata, self.val_size, self.seed, total=len(rows))
        self._announce_carve_out(len(taken), len(rows))
        if self.val_from_train == "overlap":
            return (rows, strata), self._subset(rows, strata, taken)
        return self._subset(rows, strata, kept), self._subset(rows, strata, taken)

    def _announce_carve_out(self, taken: int, total: int) -> None:
        given = "data.val_split" if self.dataset is not None else "data.val_file"
        if self.val_from_train == "overlap":
            what = (
                f"{taken:,} of the {total:,} training rows also serve as validation (val_from_train: overlap;"
            )
            what += " they stay in training, so validation measures fit, not generalization)"
        else:
            what = f"{taken:,} of the {total:,} training rows are held out for validation and not trained on"
            what += " (val_from_train: holdout; 'overlap' keeps them in training)"
        rank_zero_info(
            f"Validation: no {given} given, so {what}. Give {given}, or data.val_size: 0 for none."
        )

    def setup(self, stage: str | None = None) -> None:
        """Read, split and tokenize what ``stage`` needs (once; later calls reuse the datasets)."""
        self.prepare_tokenizer()
        if stage in (None, "fit", "validate") and "fit" not in self._built:
            if self._source("train") is not None:
                train, val = self._carve_val(*self._read("train"))
                self.datasets["train"] = self._encode(
                    *self._limit(*train, self.limit_train_rows, "limit_train_rows")
                )
            elif stage == "validate" and self._source("val") is not None:
                val = self._read("val")
            else:
                raise DataError("train_file is not set; give the training data file (or data.dataset)")
            if val is not None:
                self.datasets["val"] = self._encode(
                    *self._limit(*val, self.limit_eval_rows, "limit_eval_rows")
                )
            if self._source("train") is not None:
                self._announce_rows("train", len(train[0]), "limit_train_rows")
            if val is not None:
                self._announce_rows("val", len(val[0]), "limit_eval_rows")
            self._built.add("fit")
        if stage in (None, "test") and "test" not in self._built:
            if self._source("test") is None:
                if stage == "test":
                    raise DataError(
                        "trainer.test needs data.test_file (or data.test_split with data.dataset); set it"
                    )
            else:
                test = self._read("test")
                self.datasets["test"] = self._encode(
                    *self._limit(*test, self.limit_eval_rows, "limit_eval_rows")
                )
                self._announce_rows("test", len(test[0]), "limit_eval_rows")
            self._built.add("test")

    # ------------------------------------------------------------------ loaders
    def collator(self, with_choices: bool = False) -> Collator:
        """The batch builder (pads with the tokenizer's pad token); ``with_choices`` adds every option of
        multiple_choice rows (evaluation loaders)."""
        tokenizer = self.prepare_tokenizer()
        return Collator(
            tokenizer.pad_token_id,
            self.candidate_ids if self.task == "classification" else None,
            with_choices=with_choices and self.task == "multiple_choice",
        )

    def train_dataloader(self) -> DataLoader:
        """The only place the training loader is built: shuffled by ``seed`` + epoch, and resumable.

        Lightning saves its position in every checkpoint and resumes it mid-epoch (see
        ``layermoe.data.resumable_loader``); iterating it draws nothing from the global RNG.
        With ``group_by_length`` the shuffled order is grouped by token length (less padding per batch).
        """
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
            collate_fn=self.collator(with_choices=True),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader | list:
        """Validation loader, rows longest first (empty list when validation is disabled)."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        """Test loader, rows longest first."""
        return self._eval_loader("test")
