"""(d) for modules adapted by ``LayerInfluenceCallback(inject=...)``: the documented loader gives the
same validation loss as the model that wrote the checkpoint, after a rewire, through weights-only files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from layermoe.adapters import layout, moe_layers
from layermoe.callbacks import load_adapted_checkpoint
from layermoe.checkpointing import exact_resume_callbacks
from layermoe.scoring import causal_lm_per_sample_loss
from tests.fixtures import atomic_checkpoint_trainer, quiet_influence
from tests.scripts.callback_fixtures import TinyLlamaModule, loaders


@torch.no_grad()
def _val_loss(module: TinyLlamaModule, val_loader: torch.utils.data.DataLoader) -> float:
    module.eval()
    return float(torch.cat([causal_lm_per_sample_loss(module.model, b).double() for b in val_loader]).mean())


def test_load_adapted_checkpoint_reproduces_validation_loss(tmp_path: Path) -> None:
    L.seed_everything(0)
    module = TinyLlamaModule(adapt=False)
    train, val = loaders()
    influence = quiet_influence(
        "grad_norm",
        schedule={"warmup": 2},
        inject={"experts": 2, "rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.1},
    )
    trainer = atomic_checkpoint_trainer(
        4, [influence, *exact_resume_callbacks(), ModelCheckpoint(tmp_path, save_last=True)]
    )
    trainer.fit(module, train, val)
    assert influence.state.rewires_done == 1
    expected = _val_loss(module, val)
    path = tmp_path / "last.ckpt"
    torch.load(path, weights_only=True)  # plain data only
    loaded = load_adapted_checkpoint(TinyLlamaModule, path)
    assert moe_layers(loaded) and layout(loaded) == layout(module)
    assert abs(_val_loss(loaded, val) - expected) <= 1e-6
