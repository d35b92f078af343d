"""Two "existing Lightning projects" that plug in LayerInfluenceCallback (issue 23), shared by the tests.

- ``TupleProject``: a tiny Llama fed ``(input_ids, labels)`` tuples from a ``TensorDataset``; it scores with
  its own ``per_sample_loss(batch)``.
- ``BertClassifierProject``: a tiny ``BertForSequenceClassification`` fed dict batches, with the task head
  ``classifier`` trained next to the adapters (``modules_to_save``); it defines no ``per_sample_loss``,
  so the callback picks the built-in sequence-classification loss.

Both use the exact-resume pieces a project of one's own needs: ``resumable_train_loader`` for the
training data and ``exact_resume_callbacks()`` in the Trainer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, Dataset, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from layermoe.adapters import MoELoRAConfig, collect_router_losses, inject
from layermoe.callbacks import LayerInfluenceCallback
from layermoe.checkpointing import exact_resume_callbacks, resumable_train_loader
from layermoe.scoring.losses import per_sample_loss_from_logits
from tests.fixtures import every_step_checkpoint, quiet_influence, quiet_trainer
from tests.scripts.callback_fixtures import CountingDataset
from tests.tiny_models import VOCAB, tiny_llama, tiny_sizes


def counting_tensors(size: int, seed: int) -> TensorDataset:
    ids = CountingDataset(size, seed).ids
    return TensorDataset(ids, ids.clone())


class TupleProject(LightningModule):
    """A user's module whose batches are ``(input_ids, labels)`` tuples."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        self.model = tiny_llama(num_blocks=3).train()
        inject(self.model, MoELoRAConfig(experts=2, rank=4, lora_alpha=8.0, lora_dropout=0.1))

    def task_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        input_ids, labels = batch
        return per_sample_loss_from_logits(self.model(input_ids=input_ids).logits, labels)

    def per_sample_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.task_loss(batch)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.task_loss(batch).mean() + collect_router_losses(self.model).loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.task_loss(batch).mean())

    def train_dataloader(self) -> DataLoader:
        return resumable_train_loader(counting_tensors(48, 0), batch_size=4, seed=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(counting_tensors(8, 1), batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for _, p in sorted(self.named_parameters()) if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-2)


NUM_LABELS = 3
SEQ = 10


def tiny_bert_classifier(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(**tiny_sizes(3, positions=64), num_labels=NUM_LABELS)
    return BertForSequenceClassification(config)


class ClassificationDataset(Dataset):
    """Dict samples; the class is the first token modulo 3 (learnable), lengths vary (padding)."""

    def __init__(self, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (size, SEQ), generator=g)
        self.lengths = torch.randint(4, SEQ + 1, (size,), generator=g)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        mask = (torch.arange(SEQ) < self.lengths[i]).long()
        return {
            "input_ids": self.ids[i] * mask,
            "attention_mask": mask,
            "labels": self.ids[i, 0] % NUM_LABELS,
        }


BERT_ADAPTER = {
    "experts": 1,
    "rank": 4,
    "lora_alpha": 8.0,
    "lora_dropout": 0.1,
    "modules_to_save": ["classifier"],
}


class BertClassifierProject(LightningModule):
    """A user's sequence classifier: Hugging Face computes the training loss; no per_sample_loss."""

    def __init__(self, adapter: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = tiny_bert_classifier().train()
        inject(self.model, MoELoRAConfig.from_dict(adapter or BERT_ADAPTER))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss + collect_router_losses(self.model).loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", self.model(**batch).loss)

    def train_dataloader(self) -> DataLoader:
        return resumable_train_loader(ClassificationDataset(48, 0), batch_size=4, seed=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(ClassificationDataset(8, 1), batch_size=4)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for _, p in sorted(self.named_parameters()) if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-2)


def fit_project(
    module_cls: type[LightningModule],
    run_dir: Path,
    *,
    ckpt_path: str | None = None,
    max_steps: int = 8,
    rewire_step: int = 4,
    influence_options: dict[str, Any] | None = None,
) -> tuple[LightningModule, LayerInfluenceCallback]:
    """Fit with a rewire after ``rewire_step`` and a checkpoint after every step (``step=K.ckpt``)."""
    L.seed_everything(0)
    module = module_cls()
    influence = quiet_influence(
        **{
            "scorer": "grad_norm",
            # these tests need a rewire that changes shapes; shrinking 8-sample scores by their standard
            # errors (the default) can leave a tiny model's layout as it is
            "allocator_options": {"error_shrinkage": 0},
            "schedule": {"warmup": rewire_step, "interval": "step"},
            **(influence_options or {}),
        },
    )
    trainer = quiet_trainer(
        [influence, *exact_resume_callbacks(), every_step_checkpoint(run_dir / "checkpoints")],
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        val_check_interval=3,
        check_val_every_n_epoch=None,
        deterministic=True,
        default_root_dir=str(run_dir),
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module, influence


def trainable_state(module: LightningModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
