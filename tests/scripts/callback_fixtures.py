"""Shared pieces of the LayerInfluenceCallback tests and the DDP script: tiny data, modules, scorers, fits.

Not a test module: importable from pytest (``tests.scripts.callback_fixtures``) and from the standalone
DDP script (run with the repository root on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, Dataset

from layermoe.adapters import MoELoRAConfig, collect_router_losses, inject
from layermoe.checkpointing import exact_resume_callbacks, resumable_train_loader
from layermoe.scoring import Scorer, causal_lm_per_sample_loss, register_scorer
from tests.fixtures import cpu_trainer, every_step_checkpoint, quiet_trainer
from tests.tiny_models import VOCAB, tiny_llama

SEQ = 12


class CountingDataset(Dataset):
    """Learnable sequences: token t+1 = (token t + step) mod VOCAB, random start and step per sample."""

    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (size, 1), generator=g)
        steps = torch.randint(1, 4, (size, 1), generator=g)
        self.ids = (starts + steps * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def loaders(batch_size: int = 4, train_size: int = 64, val_size: int = 16) -> tuple[DataLoader, DataLoader]:
    train = DataLoader(CountingDataset(train_size, 0), batch_size=batch_size, shuffle=True)
    val = DataLoader(CountingDataset(val_size, 1), batch_size=batch_size)
    return train, val


class TinyLlamaModule(LightningModule):
    """A user's LightningModule around a tiny HF Llama with MoE-LoRA adapters (optionally none)."""

    def __init__(
        self,
        experts: int = 2,
        rank: int = 4,
        num_blocks: int = 3,
        lr: float = 1e-2,
        adapt: bool = True,
        scheduler: str | None = None,
        optimizer: str = "adamw",
        train_head: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = tiny_llama(num_blocks=num_blocks).train()
        if adapt:
            inject(self.model, MoELoRAConfig(experts=experts, rank=rank, lora_alpha=8.0))
        if train_head:
            self.model.lm_head.weight.requires_grad_(True)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return causal_lm_per_sample_loss(self.model, batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch).mean()
        router = collect_router_losses(self.model)
        total = loss + router.loss
        self.log("train_loss", loss, prog_bar=False)
        return total

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self(batch).mean())

    def configure_optimizers(self) -> Any:
        params = [p for _, p in sorted(self.named_parameters()) if p.requires_grad]
        if self.hparams.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.hparams.lr, momentum=0.9)
        else:
            opt = torch.optim.AdamW(params, lr=self.hparams.lr)
        if self.hparams.scheduler == "inverse":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + 0.1 * step))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def fit_counting_task(
    module: LightningModule,
    influence: Any,
    root: Path,
    run: str,
    ckpt_path: Path | None = None,
    max_steps: int = 8,
    **options: Any,
) -> None:
    """An exactly resumable, deterministic fit on the counting task (64 train, 16 validation sequences,
    one validation batch), writing ``root/run/step=K.ckpt`` after every step."""
    trainer = quiet_trainer(
        [influence, *exact_resume_callbacks(), every_step_checkpoint(root / run)],
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        limit_val_batches=1,
        deterministic=True,
        default_root_dir=str(root),
        **options,
    )
    train = resumable_train_loader(CountingDataset(64, 0), 4, seed=0)
    trainer.fit(module, train, DataLoader(CountingDataset(16, 1), batch_size=4), ckpt_path=ckpt_path)


def assert_fit_fails_before_first_step(
    module: LightningModule,
    callback: Any,
    error: type[Exception],
    pattern: str,
    *loaders: Any,
    weights_unchanged: bool = True,
    **kw: Any,
) -> None:
    """``trainer.fit`` raises ``error`` matching ``pattern`` with no optimizer step taken and (unless the
    callback injects adapters) the weights unchanged."""
    import pytest

    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = cpu_trainer([callback], **{"max_steps": 4, **kw})
    with pytest.raises(error, match=pattern):
        trainer.fit(module, *loaders)
    assert trainer.global_step == 0
    if not weights_unchanged:
        return
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed although training must not have started"


@register_scorer("test_fixed_scores")
class FixedScorer(Scorer):
    """Returns the scores it was given, whatever the statistics (planted-case tests)."""

    def __init__(self, scores: dict[int, float]) -> None:
        self.scores = {int(k): float(v) for k, v in scores.items()}

    def score(self, stats: dict[int, Any]) -> dict[int, float]:
        missing = set(stats) - set(self.scores)
        if missing:
            raise ValueError(f"no fixed score for blocks {sorted(missing)}")
        return {b: self.scores[b] for b in stats}


def plant_grad_norm_winner(module: TinyLlamaModule, keep_block: int, factor: float = 1e-3) -> None:
    """The planted grad_norm case: B drawn with std 0.05 (so that A gets gradients too), then every
    adapter parameter outside ``keep_block`` multiplied by ``factor``."""
    from layermoe.adapters import moe_layers

    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        for block, layers in moe_layers(module.model).items():
            if block == keep_block:
                continue
            for layer in layers.values():
                for name, p in layer.named_parameters(recurse=False):
                    if name in ("lora_A", "lora_B"):
                        p.mul_(factor)


@register_scorer("test_empty_toggle")
class EmptyToggleScorer(Scorer):
    """Block 0 scores low while it has adapters and high once it has none: with block 0 allowed to go
    empty, successive rewires remove its adapters and then give them back (deterministic on resume,
    since it reads only the model)."""

    needs_statistics = False

    def score(self, model: nn.Module) -> dict[int, float]:  # type: ignore[override]
        from layermoe.adapters import layout

        current = layout(model)
        return {b: (0.0 if spec["experts"] else 10.0) if b == 0 else 5.0 for b, spec in current.items()}
