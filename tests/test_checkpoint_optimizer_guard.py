"""OptimizerStateGuard: optimizer state saved for other parameters is refused, naming them."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from layermoe.checkpointing import (
    MANIFEST_KEY,
    OptimizerStateGuard,
    OptimizerStateMismatchError,
    check_optimizer_states,
    optimizer_manifest,
)
from tests.fixtures import quiet_trainer


def _stepped_adam(module: nn.Module, params: list[nn.Parameter]) -> torch.optim.Adam:
    optimizer = torch.optim.Adam(params, lr=0.1)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    return optimizer


def _two_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


def test_matching_state_passes_and_manifest_is_plain_data() -> None:
    model = _two_layer()
    optimizer = _stepped_adam(model, list(model.parameters()))
    manifest = optimizer_manifest(model, [optimizer])
    assert manifest == [[[["0.weight", [4, 4]], ["0.bias", [4]], ["1.weight", [4, 4]], ["1.bias", [4]]]]]
    check_optimizer_states(model, [optimizer], [optimizer.state_dict()], manifest)
    check_optimizer_states(model, [optimizer], [optimizer.state_dict()], None)


def test_same_shapes_in_another_order_is_caught_by_the_manifest() -> None:
    model = _two_layer()
    saved = _stepped_adam(model, list(model.parameters()))
    manifest = optimizer_manifest(model, [saved])
    p = dict(model.named_parameters())
    swapped = torch.optim.Adam([p["1.weight"], p["1.bias"], p["0.weight"], p["0.bias"]], lr=0.1)
    # Shapes agree position by position, so torch would load it silently onto the wrong tensors.
    swapped.load_state_dict(saved.state_dict())
    with pytest.raises(
        OptimizerStateMismatchError, match=r"position 0: saved for 0\.weight \[4, 4\], now 1\.weight"
    ):
        check_optimizer_states(model, [swapped], [saved.state_dict()], manifest)


def test_resized_parameter_is_caught_without_a_manifest() -> None:
    model = _two_layer()
    saved = _stepped_adam(model, list(model.parameters()))
    model[0] = nn.Linear(4, 6)
    model[1] = nn.Linear(6, 4)
    current = torch.optim.Adam(model.parameters(), lr=0.1)
    with pytest.raises(
        OptimizerStateMismatchError,
        match=r"state 'exp_avg' has shape \[4, 4\], parameter 0\.weight has \[6, 4\]",
    ):
        check_optimizer_states(model, [current], [saved.state_dict()], None)


def test_count_mismatches_are_reported() -> None:
    model = _two_layer()
    saved = _stepped_adam(model, list(model.parameters()))
    manifest = optimizer_manifest(model, [saved])
    fewer = torch.optim.Adam(list(model[0].parameters()), lr=0.1)
    with pytest.raises(
        OptimizerStateMismatchError,
        match=r"4 parameters, now 2 .*only in checkpoint: \[1\.weight, 1\.bias\]",
    ):
        check_optimizer_states(model, [fewer], [saved.state_dict()], manifest)
    with pytest.raises(
        OptimizerStateMismatchError, match=r"state for 1 optimizer\(s\) but configure_optimizers returned 2"
    ):
        check_optimizer_states(model, [saved, fewer], [saved.state_dict()], manifest)


class _Module(L.LightningModule):
    def __init__(self, width: int = 4, reverse: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, width)
        self.b = nn.Linear(width, width)
        self.reverse = reverse

    def training_step(self, batch, batch_idx):
        return self.b(self.a(batch[0])).pow(2).mean()

    def configure_optimizers(self):
        params = sorted(self.named_parameters(), reverse=self.reverse)
        return torch.optim.Adam([p for _, p in params], lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4)), batch_size=2)


def _trainer(max_steps: int, callbacks: list) -> L.Trainer:
    return quiet_trainer(callbacks, max_steps=max_steps, enable_checkpointing=False)


def test_lightning_resume_with_reordered_optimizer_fails_before_training(tmp_path: Path) -> None:
    trainer = _trainer(2, [OptimizerStateGuard()])
    trainer.fit(_Module())
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)[MANIFEST_KEY][0][0][0] == ["a.bias", [4]]
    _trainer(3, [OptimizerStateGuard()]).fit(_Module(), ckpt_path=path)  # same order: resumes fine
    guard = OptimizerStateGuard()
    resumed = _Module(reverse=True)
    with pytest.raises(OptimizerStateMismatchError, match=r"saved for a\.bias \[4\], now b\.weight \[4, 4\]"):
        _trainer(3, [guard]).fit(resumed, ckpt_path=path)
    saved_weights = torch.load(path, weights_only=True)["state_dict"]
    for name, p in resumed.named_parameters():  # restored, and no optimizer step ran after that
        assert torch.equal(p, saved_weights[name]), name
