"""Inputs that used to train silently wrong or crash late now fail before the first step (issue 24).

Each case names the file, row, field or setting and the fix: a null text, a non-UTF-8 byte, a warm-up
longer than the run, a tokenizer larger than the model's vocabulary, an empty validation split or an
impossible budget with the influence callback, and a resume under another scorer.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from layermoe.callbacks import CallbackConfigError, LayerInfluenceCallback
from layermoe.data import DataError, TextDataModule, read_rows
from layermoe.lightning_modules import MoELoRAFineTuner
from tests.conftest import tiny_llama_spec, toy_rows, write_jsonl
from tests.fixtures import quiet_trainer


def test_null_text_names_the_row(tmp_path: Path) -> None:
    rows = toy_rows(4)
    rows[2]["text"] = None
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train.jsonl row 3: text column 'text' holds None"):
        read_rows(path)


def test_non_utf8_byte_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in toy_rows(4)]
    lines[2] = lines[2].replace('"label"', '"caf\xe9", "label"')
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(DataError, match=r"train.jsonl:3: byte b'\\xe9' .* is not UTF-8"):
        read_rows(path)
    csv_path = tmp_path / "train.csv"
    csv_path.write_bytes(b"text,label\ngood,1\nbad \xff,0\n")
    with pytest.raises(DataError, match=r"train.csv:3: byte b'\\xff'"):
        read_rows(csv_path)


def _data(tmp_path: Path, **kwargs) -> TextDataModule:
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(24))
    defaults = {"train_file": str(train), "label_words": ["no", "yes"], "val_size": 8, "batch_size": 4}
    return TextDataModule(**{**defaults, **kwargs})


def _trainer(tmp_path: Path, callbacks: list | None = None, **kwargs) -> L.Trainer:
    options = {"max_steps": 4, "enable_checkpointing": False, "default_root_dir": str(tmp_path), **kwargs}
    return quiet_trainer(callbacks or [], **options)


def _module(**kwargs) -> MoELoRAFineTuner:
    defaults = {"model": tiny_llama_spec(), "adapter": {"experts": 2, "rank": 2}, "print_layout": False}
    return MoELoRAFineTuner(**{**defaults, **kwargs})


def test_warmup_longer_than_the_run_fails_before_training(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    with pytest.raises(
        ValueError, match=r"model.warmup_steps=10 is longer than the run \(4 optimizer steps\)"
    ):
        trainer.fit(_module(warmup_steps=10), datamodule=_data(tmp_path))
    assert trainer.global_step == 0


def test_tokenizer_larger_than_the_vocabulary_fails_before_training(tmp_path: Path) -> None:
    spec = {**tiny_llama_spec(), "vocab_size": 100}
    trainer = _trainer(tmp_path)
    with pytest.raises(
        ValueError, match=r"tokenizer has \d+ tokens but the model's embedding has only 100 rows"
    ):
        trainer.fit(_module(model=spec), datamodule=_data(tmp_path))
    assert trainer.global_step == 0


def _callback(**kwargs) -> LayerInfluenceCallback:
    defaults = dict(
        scorer="grad_norm", schedule={"warmup": 2}, num_train_samples=4, num_val_samples=4, plot=False
    )
    return LayerInfluenceCallback(**{**defaults, **kwargs})


def test_empty_validation_split_with_the_callback_fails_at_fit_start(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [_callback()])
    with pytest.raises(CallbackConfigError, match="validation dataloader is empty.*data.val_size"):
        trainer.fit(_module(), datamodule=_data(tmp_path, val_size=0))
    assert trainer.global_step == 0


def test_impossible_budget_fails_at_fit_start(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [_callback(budget="total_experts:1")])
    with pytest.raises(
        CallbackConfigError, match="total_experts:1.*2 adapted blocks.*below the minimum layout"
    ):
        trainer.fit(_module(), datamodule=_data(tmp_path))
    assert trainer.global_step == 0


def test_resume_under_another_scorer_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    _trainer(
        tmp_path,
        [_callback(), ModelCheckpoint(folder, filename="last")],
        enable_checkpointing=True,
        max_steps=3,
    ).fit(_module(), datamodule=_data(tmp_path))
    saved = torch.load(folder / "last.ckpt", weights_only=True)
    assert any(k.startswith("LayerInfluenceCallback") for k in saved["callbacks"])
    trainer = _trainer(tmp_path, [_callback(scorer="uniform")], max_steps=6)
    with pytest.raises(CallbackConfigError, match=r"holds the state of LayerInfluenceCallback.*grad_norm"):
        trainer.fit(_module(), datamodule=_data(tmp_path), ckpt_path=folder / "last.ckpt")
    assert trainer.global_step == 0  # stopped while restoring, before the loops and any training


@pytest.mark.parametrize(
    ("parameter", "value", "pattern"),
    [
        # NaN: the losses come out NaN
        (
            "model.model.layers.0.self_attn.q_proj.lora_B",
            float("nan"),
            r"q_proj\.lora_B holds NaN or infinity",
        ),
        # finite but huge: the losses stay finite, the gradient statistics overflow
        ("model.model.layers.0.self_attn.q_proj.lora_B", 1e30, r"q_proj\.lora_B holds \|w\| = 1e\+30"),
        # finite, the forward overflows: traced to the module whose output turns non-finite
        ("model.lm_head.weight", 3e38, r"forward pass turns non-finite in model\.lm_head "),
    ],
)
def test_damaged_weights_are_named_by_the_dry_run_not_blamed_on_the_loss(
    parameter: str, value: float, pattern: str
) -> None:
    from tests.scripts.callback_fixtures import TinyLlamaModule, assert_fit_fails_before_first_step, loaders

    module = TinyLlamaModule()
    with torch.no_grad():
        weight = dict(module.named_parameters())[parameter]
        if parameter.endswith("lm_head.weight"):
            weight.fill_(value)
        else:
            weight.view(-1)[0] = value
    # names the weight and the fix, and neither blames per_sample_loss nor gives the autograd advice
    pattern = (
        r"(?s)^(?!.*(?:per_sample_loss|autograd)).*"
        f"{pattern}.*the weights are damaged .* the loss is not at fault: load an earlier checkpoint"
    )
    # (no step taken; the NaN weight would fail the helper's equality check of the weights)
    assert_fit_fails_before_first_step(
        module, _callback(), CallbackConfigError, pattern, *loaders(), weights_unchanged=False
    )


def test_numeric_text_names_the_row_and_column(tmp_path: Path) -> None:
    from layermoe.data.columns import ColumnMap, task_rows

    rows = toy_rows(4)
    rows[1]["text"] = 1984
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(
        DataError, match=r"train.jsonl row 2: text column 'text' holds 1984 \(int\), not a string"
    ):
        read_rows(path)
    # the dataset path (Hugging Face datasets, parquet) reads its columns here
    with pytest.raises(DataError, match=r"row 2: column 'text' holds int 1984, expected text"):
        task_rows(rows, "causal_lm", ColumnMap(label=None), "train")


def test_eval_batch_size_zero_is_refused_not_taken_as_batch_size(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"eval_batch_size must be a positive int, or null for batch_size, got 0"
    ):
        _data(tmp_path, eval_batch_size=0)
    assert _data(tmp_path, eval_batch_size=None).eval_batch_size == 4


@pytest.mark.parametrize(
    ("val_size", "pattern"),
    [
        (
            1.0,
            r"val_size=1\.0 is a float, so a fraction of the 24 rows \(all rows: nothing would be left to train",
        ),
        (
            8.0,
            r"val_size=8\.0 is a float, so a fraction .* must be in \(0, 1\), e\.g\. 0\.1; for 8 rows give the int 8",
        ),
    ],
)
def test_a_float_val_size_is_a_fraction(tmp_path: Path, val_size: float, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _data(tmp_path, val_size=val_size, tokenizer="tiny").setup("fit")
    data = _data(tmp_path, val_size=1, tokenizer="tiny")  # an int: one row
    data.setup("fit")
    assert len(data.val_dataloader().dataset) == 1


def test_all_blocks_without_experts_name_experts_not_target_modules(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path)
    with pytest.raises(
        ValueError, match=r"every one of the 2 adapted blocks has 0 experts \(model\.adapter\.experts\)"
    ):
        trainer.fit(_module(adapter={"experts": 0, "rank": 2}), datamodule=_data(tmp_path))
