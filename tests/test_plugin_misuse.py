"""Issue 23: every mismatch between batches, loss and model fails before the first optimizer step, with a
message that names the fix (the callback's dry run at fit start), and nothing is trained or changed."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader

from layermoe.adapters import MoELoRAConfig, inject
from layermoe.callbacks import CallbackConfigError, LayerInfluenceCallback
from tests.scripts.callback_fixtures import CountingDataset, assert_fit_fails_before_first_step
from tests.scripts.plugin_projects import TupleProject
from tests.tiny_models import tiny_bert


def _callback(**kw: Any) -> LayerInfluenceCallback:
    return LayerInfluenceCallback(
        **{"schedule": {"warmup": 2}, "num_train_samples": 4, "num_val_samples": 4, "plot": False, **kw}
    )


def _fails(module: LightningModule, pattern: str, **kw: Any) -> None:
    assert_fit_fails_before_first_step(module, _callback(**kw), CallbackConfigError, pattern)


class TupleWithoutLoss(TupleProject):
    per_sample_loss = None  # the built-in default needs dict batches


class MeanOverBatch(TupleProject):
    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        return self.task_loss(batch).mean()


class Detached(TupleProject):
    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        return self.task_loss(batch).detach()


class NotFinite(TupleProject):
    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        return self.task_loss(batch) * float("nan")


class ReadsDictFields(TupleProject):
    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        return self.task_loss((batch["input_ids"], batch["labels"]))


def test_tuple_batches_need_a_per_sample_loss() -> None:
    _fails(
        TupleWithoutLoss(),
        r"built-in causal-LM loss needs dict batches.*yields list.*per_sample_loss\(batch\)",
    )


def test_loss_reduced_over_the_batch() -> None:
    _fails(
        MeanOverBatch(),
        r"returned \(\) for a training batch of 2 samples.*shape \(2,\).*reduces over tokens only",
    )


def test_loss_without_autograd() -> None:
    _fails(
        Detached(),
        r"cannot differentiate Detached.per_sample_loss with respect to the adapter parameters.*no \.detach\(\)",
    )


def test_loss_not_finite() -> None:
    _fails(NotFinite(), r"NotFinite.per_sample_loss returned NaN/inf on training samples")


def test_loss_that_does_not_accept_the_batch() -> None:
    _fails(
        ReadsDictFields(),
        r"per_sample_loss failed on a training batch \(a list of 2 fields\): TypeError.*accepts them",
    )


def test_a_user_loss_fn_is_checked_too() -> None:
    _fails(
        TupleWithoutLoss(),
        r"loss_fn\(model, batch\) returned \(\)",
        loss_fn=lambda model, batch: torch.tensor(1.0),
    )


class DictWithoutLabels(LightningModule):
    """Dict batches without ``labels`` (the module shifts input_ids itself) and no per_sample_loss."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TupleProject().model

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        pass

    def _loader(self, seed: int) -> DataLoader:
        rows = [
            {"input_ids": r["input_ids"], "attention_mask": r["attention_mask"]}
            for r in CountingDataset(8, seed)
        ]
        return DataLoader(rows, batch_size=4)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for _, p in sorted(self.named_parameters()) if p.requires_grad], lr=1e-2)


def test_dict_batch_without_labels() -> None:
    _fails(
        DictWithoutLabels(), r"needs the batch fields \['input_ids', 'labels'\], but \['labels'\] are missing"
    )


class EncoderWithoutHead(DictWithoutLabels):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_bert()
        inject(self.model, MoELoRAConfig(experts=2, rank=2))


def test_model_without_a_known_head_asks_for_per_sample_loss() -> None:
    _fails(
        EncoderWithoutHead(),
        r"BertModel has no causal-LM, masked-LM or sequence-classification head.*per_sample_loss",
    )


def test_more_scoring_samples_than_the_validation_set_warns() -> None:
    with pytest.warns(
        UserWarning, match=r"num_val_samples=64 but the validation set has only 8 samples; scoring uses 8"
    ):
        assert_fit_fails_before_first_step(
            MeanOverBatch(), _callback(num_val_samples=64), CallbackConfigError, "reduces over tokens only"
        )


def test_inject_says_how_to_reload(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from tests.scripts.callback_fixtures import TinyLlamaModule, loaders

    caplog.set_level(logging.INFO)
    assert_fit_fails_before_first_step(
        TinyLlamaModule(adapt=False),
        _callback(inject={"experts": 2, "rank": 2}, loss_fn=lambda model, batch: torch.tensor(0.0)),
        CallbackConfigError,
        r"loss_fn\(model, batch\) returned \(\)",
        *loaders(),
        weights_unchanged=False,
    )
    assert "load_adapted_checkpoint(TinyLlamaModule, path)" in caplog.text
