"""Issue 23: the built-in per-sample losses follow the model's head, each checked against the model's own
Hugging Face loss computed on one sample at a time, and a model without a known head is refused."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import LightningModule
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from layermoe.callbacks.scoring_pass import resolve_per_sample_loss
from layermoe.scoring import (
    causal_lm_per_sample_loss,
    default_per_sample_loss,
    masked_lm_per_sample_loss,
    sequence_classification_per_sample_loss,
)
from tests.tiny_models import random_tokens, tiny_bert, tiny_gpt2, tiny_llama, tiny_sizes


def _bert_config(**kw) -> BertConfig:
    return BertConfig(**tiny_sizes(2, positions=64), **kw)


def _padded(batch: int = 4, length: int = 8) -> dict[str, torch.Tensor]:
    ids = random_tokens(batch, length, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 3:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def _per_row_reference(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own (mean) loss on each sample alone: one forward per row."""
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        rows.append(model(**{k: v[i : i + 1] for k, v in batch.items()}).loss)
    return torch.stack(rows)


@torch.no_grad()
def test_masked_lm_loss_per_sample_equals_the_models_loss_per_row() -> None:
    torch.manual_seed(0)
    model = BertForMaskedLM(_bert_config()).eval()
    batch = _padded()
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, [1, 4]] = batch["input_ids"][0, [1, 4]]
    labels[1, 2] = batch["input_ids"][1, 2]
    labels[2, [0, 3, 6, 7]] = batch["input_ids"][2, [0, 3, 6, 7]]
    labels[3, 1] = batch["input_ids"][3, 1]
    batch["labels"] = labels
    assert torch.allclose(
        masked_lm_per_sample_loss(model, batch), _per_row_reference(model, batch), atol=1e-5
    )


@pytest.mark.parametrize(
    ("num_labels", "problem_type", "labels"),
    [
        (3, None, torch.tensor([0, 2, 1, 2])),
        (1, None, torch.tensor([0.5, -1.0, 2.0, 0.0])),
        (3, "multi_label_classification", torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 1], [0, 0, 0]])),
    ],
    ids=["single_label", "regression", "multi_label"],
)
@torch.no_grad()
def test_sequence_classification_loss_per_sample_equals_the_models_loss_per_row(
    num_labels: int, problem_type: str | None, labels: torch.Tensor
) -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        _bert_config(num_labels=num_labels, problem_type=problem_type)
    ).eval()
    batch = {**_padded(), "labels": labels}
    got = sequence_classification_per_sample_loss(model, batch)
    assert got.shape == (4,)
    assert torch.allclose(got, _per_row_reference(model, batch), atol=1e-5)
    assert torch.allclose(got.mean(), model(**batch).loss, atol=1e-5)  # the batch mean is HF's loss


def test_the_loss_follows_the_models_head() -> None:
    assert default_per_sample_loss(tiny_llama()) is causal_lm_per_sample_loss
    assert default_per_sample_loss(tiny_gpt2()) is causal_lm_per_sample_loss
    assert default_per_sample_loss(BertForMaskedLM(_bert_config())) is masked_lm_per_sample_loss
    assert (
        default_per_sample_loss(BertForSequenceClassification(_bert_config()))
        is sequence_classification_per_sample_loss
    )
    with pytest.raises(TypeError, match="BertModel has no causal-LM.*per_sample_loss"):
        default_per_sample_loss(tiny_bert())


class HoldsMaskedLM(LightningModule):
    """The Hugging Face model under another attribute name than ``model``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = BertForMaskedLM(_bert_config()).eval()


@torch.no_grad()
def test_the_callback_scores_a_masked_lm_with_the_masked_loss() -> None:
    module = HoldsMaskedLM()
    batch = _padded()
    batch["labels"] = torch.where(batch["attention_mask"] > 0, batch["input_ids"], -100)
    got = resolve_per_sample_loss(module, None)(module, batch)
    assert torch.allclose(got, _per_row_reference(module.encoder, batch), atol=1e-5)
