"""(e) The callback in projects that are not layermoe's: a hand-written LightningModule over a plain torch
model with MoE-LoRA layers, the ``inject=`` option with its one-call reload, and resume with a pending plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from layermoe.adapters import MoELoRAConfig, inject, layout, moe_layers
from layermoe.callbacks import LayerInfluenceCallback, load_adapted_checkpoint
from tests.fixtures import cpu_trainer
from tests.scripts.callback_fixtures import TinyLlamaModule, loaders

TARGETS = {"target_modules": ["fc1", "fc2"], "experts": 2, "rank": 2, "lora_alpha": 4.0}


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


class PlainNet(nn.Module):
    """A plain torch model; its blocks live under ``layers.<i>`` like a transformer's."""

    def __init__(self, d: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(4, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(blocks))
        self.out = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.layers:
            h = block(h)
        return self.out(h)


class Regression(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.sin(self.x.sum(-1, keepdim=True)) + 0.5 * self.x[:, :1]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i]}


class HandWritten(LightningModule):
    """Written without layermoe's LightningModule: its own loss, its own optimizer."""

    def __init__(self, adapt: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.net = PlainNet()
        if adapt:
            inject(self.net, MoELoRAConfig(**TARGETS))
        self.per_sample_calls = 0

    def per_sample_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.per_sample_calls += 1
        return ((self.net(batch["x"]) - batch["y"]) ** 2).mean(-1)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return ((self.net(batch["x"]) - batch["y"]) ** 2).mean()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", ((self.net(batch["x"]) - batch["y"]) ** 2).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for _, p in sorted(self.named_parameters()) if p.requires_grad], lr=1e-2)


def _data() -> tuple[DataLoader, DataLoader]:
    return DataLoader(Regression(64, 0), batch_size=8, shuffle=True), DataLoader(
        Regression(16, 1), batch_size=8
    )


def _trainer(tmp_path: Path, callbacks: list[Any], **kw: Any) -> Trainer:
    return cpu_trainer(callbacks, **{"default_root_dir": str(tmp_path), **kw})


def test_hand_written_module_over_plain_torch_model(tmp_path) -> None:
    seed_everything(0)
    module = HandWritten()
    cb = LayerInfluenceCallback(
        scorer="layerif", schedule={"warmup": 3}, num_train_samples=16, num_val_samples=8, plot=False
    )
    trainer = _trainer(tmp_path, [cb], max_steps=8, limit_val_batches=0)
    trainer.fit(module, *_data())
    assert len(cb.history) == 1
    entry = cb.history[0]
    assert set(entry["scores"]) == {0, 1, 2} and all(
        torch.isfinite(torch.tensor(list(entry["scores"].values())))
    )
    assert module.per_sample_calls > 0  # scoring and the disturbance probe used the module's own loss
    assert layout(module) == entry["layout_after"]
    assert entry["params_after"] <= entry["budget"]
    listed = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert {id(p) for p in listed} == {id(p) for p in module.parameters() if p.requires_grad}
    assert len(listed) == len({id(p) for p in listed})


def test_inject_option_and_one_call_reload(tmp_path) -> None:
    seed_everything(0)
    module = HandWritten(adapt=False)
    assert not moe_layers(module)
    cb = LayerInfluenceCallback(
        scorer="test_fixed_scores",
        scorer_options={"scores": {0: 4.0, 1: 0.5, 2: 0.5}},
        allocator_options={"rank_policy": "scores"},
        schedule={"warmup": 2},
        num_train_samples=8,
        num_val_samples=8,
        inject=TARGETS,
        plot=False,
    )
    trainer = _trainer(tmp_path, [cb], max_steps=5, limit_val_batches=0)
    trainer.fit(module, *_data())
    rewired = layout(module)
    assert rewired == cb.history[0]["layout_after"] != cb.history[0]["layout_before"]
    path = tmp_path / "adapted.ckpt"
    trainer.save_checkpoint(path)

    with pytest.raises(RuntimeError, match="Unexpected key|Missing key"):
        HandWritten.load_from_checkpoint(path)  # plain loading runs no callback: no adapters
    loaded = load_adapted_checkpoint(HandWritten, path)
    assert type(loaded) is HandWritten
    assert layout(loaded) == rewired
    x = torch.randn(5, 4)
    module.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.net(x), module.net(x), rtol=0, atol=0)


def test_resume_applies_the_pending_plan_like_an_uninterrupted_run(tmp_path) -> None:
    """Scored at the end of epoch 0 (checkpointed there with the plan pending), applied after the next step."""

    def run(ckpt: Path | None, ckpt_dir: Path) -> tuple[TinyLlamaModule, LayerInfluenceCallback]:
        seed_everything(0)
        module = TinyLlamaModule(experts=2, rank=4)
        train, val = loaders()
        train = DataLoader(train.dataset, batch_size=4, shuffle=False)
        cb = LayerInfluenceCallback(
            scorer="test_fixed_scores",
            scorer_options={"scores": {0: 0.5, 1: 3.0, 2: 0.5}},
            schedule={"warmup": 1, "interval": "epoch"},
            num_train_samples=8,
            num_val_samples=8,
            plot=False,
            verbose=False,
        )
        saver = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1)
        trainer = _trainer(
            tmp_path,
            [cb, saver],
            max_epochs=2,
            limit_train_batches=4,
            limit_val_batches=1,
            enable_checkpointing=True,
        )
        trainer.fit(module, train, val, ckpt_path=ckpt)
        return module, cb

    full, full_cb = run(None, tmp_path / "a")
    assert full_cb.history[0]["step"] == 5 and full_cb.history[0]["scored_at_step"] == 4
    ckpt = next((tmp_path / "a").glob("epoch=0*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    (cb_state,) = [v for k, v in state.items() if k.startswith("LayerInfluenceCallback")]
    assert cb_state["pending"] is not None and cb_state["rewires_done"] == 0
    resumed, resumed_cb = run(ckpt, tmp_path / "b")
    assert resumed_cb.history[0]["step"] == 5
    assert layout(resumed) == layout(full) == full_cb.history[0]["layout_after"]
    full_params = dict(full.named_parameters())
    for name, p in resumed.named_parameters():
        torch.testing.assert_close(p, full_params[name], rtol=0, atol=0)
