"""Training-loss aggregation (``loss_aggregation``) against naive references: token mean as Hugging Face
reduces it, per-sample mean as a loop over rows; identical for classification."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layermoe.lightning_modules import MoELoRAFineTuner
from layermoe.lightning_modules.losses import aggregate_losses, per_sample_loss_from_logits
from tests.conftest import tiny_llama_spec

# router coefficients 0: the training loss is the task loss alone
ADAPTER = {
    "experts": 2,
    "rank": 2,
    "target_modules": ["q_proj", "v_proj"],
    "router_aux_loss_coef": 0.0,
    "router_z_loss_coef": 0.0,
}
LOSSES = ("token_mean", "sample_mean")


def _response_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows whose responses have 1, 4 and 7 supervised tokens (and one row of padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (3, 12), generator=g)
    labels = torch.full_like(ids, -100)
    mask = torch.ones_like(ids)
    for row, (start, stop) in enumerate([(4, 5), (3, 7), (5, 12)]):
        labels[row, start:stop] = ids[row, start:stop]
    mask[0, 9:] = 0
    ids[0, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _module(how: str | None, task: str = "instruction") -> MoELoRAFineTuner:
    kwargs = {} if how is None else {"loss_aggregation": how}
    module = MoELoRAFineTuner(
        model=tiny_llama_spec(), adapter=ADAPTER, task=task, num_classes=2, print_layout=False, **kwargs
    )
    return module.train()


def _training_loss(module: MoELoRAFineTuner, batch, monkeypatch) -> torch.Tensor:
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    monkeypatch.setattr(module, "log_dict", lambda *a, **k: None)
    return module.training_step(batch, 0)


@pytest.mark.parametrize("how", [None, "token_mean", "sample_mean"])
def test_training_loss_matches_a_naive_reference(how, monkeypatch):
    module = _module(how)
    batch = _response_batch()
    loss = _training_loss(module, batch, monkeypatch)
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if how in (None, "token_mean"):  # Hugging Face's causal-LM loss: one mean over every supervised token
        flat = logits[:, :-1].reshape(-1, logits.shape[-1])
        expected = F.cross_entropy(flat, batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    else:
        rows = []
        for row in range(3):
            terms = [
                F.cross_entropy(logits[row, t - 1], batch["labels"][row, t])
                for t in range(1, 12)
                if batch["labels"][row, t] != -100
            ]
            rows.append(torch.stack(terms).mean())
        expected = torch.stack(rows).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_the_two_aggregations_differ_when_response_lengths_differ():
    per_sample = torch.tensor([1.0, 2.0, 4.0])
    labels = _response_batch()["labels"]
    token = aggregate_losses(per_sample, labels, "token_mean")
    assert float(token) == pytest.approx((1.0 * 1 + 2.0 * 4 + 4.0 * 7) / 12)
    assert float(aggregate_losses(per_sample, labels, "sample_mean")) == pytest.approx(7.0 / 3)


def test_classification_aggregations_are_identical(monkeypatch):
    from tests.test_foundation_module import _batch

    batch = _batch(seed=3, batch=5)
    losses = [_training_loss(_module(how, "classification"), batch, monkeypatch) for how in LOSSES]
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    logits = torch.randn(5, 7, 300)
    per_sample = per_sample_loss_from_logits(logits, batch["labels"])
    torch.testing.assert_close(
        aggregate_losses(per_sample, batch["labels"], "token_mean"), per_sample.mean(), rtol=0, atol=0
    )


def test_bad_loss_aggregation_is_refused_by_name():
    with pytest.raises(ValueError, match="loss_aggregation must be one of"):
        _module("per_token")


def test_evaluation_loss_stays_per_sample(monkeypatch):
    module = _module("token_mean").eval()
    batch = _response_batch()
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **k: logged.setdefault(name, value))
    monkeypatch.setattr(module, "log_dict", lambda *a, **k: None)
    with torch.no_grad():
        loss = module.validation_step(batch, 0)
        expected = module.per_sample_loss(batch).mean()
    torch.testing.assert_close(loss, expected)
