"""One fit of a tiny MoE-LoRA classifier with a rewire mid-run, run by the resume tests in a fresh process.

    python tests/scripts/resume_run.py --data DIR --run-dir DIR --out FILE [--ckpt PATH|last]

Checkpoints are written after every optimizer step (``step=K.ckpt`` and ``last.ckpt``) through
``AtomicCheckpointIO``; ``LayerInfluenceCallback`` rewires once after step ``--rewire-step``; the final
trainable tensors, layout and progress go to ``--out`` (``torch.save``, plain data).

``LAYERMOE_TEST_KILL_AT`` makes the process SIGKILL itself at one deterministic point:
``train_step`` (between backward and optimizer step of step ``--kill-step``), ``scoring`` (inside the
rewire's scoring pass), ``after_rewire`` (right after the rewire, before that step's checkpoint),
``checkpoint_write`` (halfway through writing ``last.ckpt`` for step ``--kill-step``), ``validation``
(inside the validation that follows step ``--kill-step``). ``sigterm_train_step`` and ``sigterm_validation``
send SIGTERM instead (what a cluster does to preempt a job) at the ``train_step`` / ``validation`` points:
the run must then write a resumable checkpoint and exit with a non-zero status.

``--epochs N`` switches to epoch mode: ``max_epochs=N``, one validation at each epoch end, an
epoch-interval rewire after epoch ``--rewire-step`` (scored at that epoch's validation end), and a
``val-step=K.ckpt`` written at every validation end (where ``ModelCheckpoint(monitor=...)`` saves
the best).
"""

from __future__ import annotations

import argparse
import io
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from layermoe.adapters import layout
from layermoe.callbacks import LayerInfluenceCallback
from layermoe.checkpointing import AtomicCheckpointIO, exact_resume_callbacks
from layermoe.lightning_modules import MoELoRAFineTuner, TextDataModule
from tests.fixtures import QUIET, QUIET_INFLUENCE, every_step_checkpoint, quiet_influence, quiet_trainer

KILL_AT = os.environ.get("LAYERMOE_TEST_KILL_AT", "")
TINY_LLAMA = {
    "type": "llama",
    "vocab_size": 264,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": False,
}
ADAPTER = {"experts": 2, "rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.1}
MODULE_ARGS: dict[str, Any] = {
    "model": TINY_LLAMA,
    "adapter": ADAPTER,
    "task": "classification",
    "num_classes": 2,
    "lr": 1e-2,
    "scheduler": "cosine",
    "warmup_steps": 2,
    "print_layout": False,
}
# a config's precision and devices: what the plug-in runs' Trainer gets from its defaults and "cpu"
ONE_CPU_FLOAT32 = {"precision": "32-true", "accelerator": "cpu", "devices": 1}


def die(point: str) -> None:
    """SIGKILL this process (no cleanup, no exception handlers): what an OOM killer does."""
    print(f"KILLING at {point}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def terminate(point: str) -> None:
    """SIGTERM this process once (how a cluster preempts a job); the fit goes on to a graceful stop."""
    global KILL_AT
    KILL_AT = ""
    print(f"SIGTERM at {point}", flush=True)
    os.kill(os.getpid(), signal.SIGTERM)


class KillableFineTuner(MoELoRAFineTuner):
    """The real module plus the kill points that live inside its steps."""

    kill_step = -1

    def on_after_backward(self) -> None:
        if self.trainer.global_step == self.kill_step:
            if KILL_AT == "train_step":
                die("train_step")
            if KILL_AT == "sigterm_train_step":
                terminate("train_step")

    def per_sample_loss(self, batch: Any) -> torch.Tensor:
        # Only the influence callback calls this (training and validation do not): its dry run at fit start,
        # before any step (global_step is still 0 there, also on resume), and its scoring pass.
        if KILL_AT == "scoring" and self.trainer.global_step > 0:
            die("scoring")
        return super().per_sample_loss(batch)

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if not self.trainer.sanity_checking and self.trainer.global_step == self.kill_step:
            if KILL_AT == "validation" and batch_idx == 1:
                die("validation")
            # batch 0 is not the last one: Lightning stops the validation right after it
            if KILL_AT == "sigterm_validation" and batch_idx == 0:
                terminate("validation")
        return super().validation_step(batch, batch_idx)


class KillAfterRewire(Callback):
    """Placed after LayerInfluenceCallback: dies once the rewire is done, before ModelCheckpoint saves."""

    def __init__(self, influence: LayerInfluenceCallback) -> None:
        self.influence = influence

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, idx: int
    ) -> None:
        if KILL_AT == "after_rewire" and self.influence.state.rewires_done == 1:
            die("after_rewire")


class KillingCheckpointIO(AtomicCheckpointIO):
    """Writes half of ``last.ckpt`` for the kill step, then dies mid-write."""

    def __init__(self, kill_step: int) -> None:
        super().__init__()
        self.kill_step = kill_step

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if (
            KILL_AT == "checkpoint_write"
            and Path(path).name == "last.ckpt"
            and checkpoint["global_step"] == self.kill_step
        ):
            real_save = torch.save

            def half_then_die(obj: Any, handle: Any) -> None:
                buffer = io.BytesIO()
                real_save(obj, buffer)
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                handle.flush()
                os.fsync(handle.fileno())
                die("checkpoint_write")

            torch.save = half_then_die
        super().save_checkpoint(checkpoint, path, storage_options)


@torch.no_grad()
def validation_loss(module: MoELoRAFineTuner, data: TextDataModule) -> float:
    """Mean per-sample task loss over the whole validation file, in eval mode (float64 accumulation)."""
    was_training = module.training
    module.eval()
    data.setup("validate")
    losses = [MoELoRAFineTuner.per_sample_loss(module, batch).double() for batch in data.val_dataloader()]
    module.train(was_training)
    return float(torch.cat(losses).mean())


def data_args(folder: str) -> dict[str, Any]:
    """The ``TextDataModule`` arguments (and a config's ``data`` section) for the files in ``folder``."""
    return {
        "train_file": str(Path(folder) / "train.jsonl"),
        "val_file": str(Path(folder) / "val.jsonl"),
        "tokenizer": "tiny",
        "label_words": ["no", "yes"],
        "max_length": 24,
        "batch_size": 4,
        "eval_batch_size": 4,
        "seed": 0,
    }


def data_module(folder: str) -> TextDataModule:
    return TextDataModule(**data_args(folder))


def build(
    args: argparse.Namespace,
) -> tuple[L.Trainer, MoELoRAFineTuner, TextDataModule, LayerInfluenceCallback]:
    L.seed_everything(0)
    module = KillableFineTuner(**MODULE_ARGS)
    module.kill_step = args.kill_step
    data = data_module(args.data)
    epochs = args.epochs is not None
    influence = quiet_influence(
        "grad_norm",
        # resume must rebuild changed shapes: a rewire that moves something, even from 8-sample scores
        # (the default shrinks them by their standard errors, which can leave a tiny model as it is)
        allocator_options={"error_shrinkage": 0},
        schedule={"warmup": args.rewire_step, "interval": "epoch" if epochs else "step"},
    )
    length: dict[str, Any] = (
        {"max_epochs": args.epochs, "check_val_every_n_epoch": 1}
        if epochs
        else {
            "max_steps": args.max_steps,
            "val_check_interval": args.val_every,
            "check_val_every_n_epoch": None,
        }
    )
    at_validation = [
        ModelCheckpoint(
            dirpath=Path(args.run_dir) / "checkpoints",
            filename="val-{step}",
            monitor="val/loss",
            save_top_k=-1,
            save_on_train_epoch_end=False,
        )
    ]
    trainer = quiet_trainer(
        [
            influence,
            KillAfterRewire(influence),
            *exact_resume_callbacks(),
            every_step_checkpoint(Path(args.run_dir) / "checkpoints", save_last=True),
            *(at_validation if epochs else []),
        ],
        accelerator="cpu",
        devices=1,
        **length,
        limit_val_batches=2,
        num_sanity_val_steps=1,
        deterministic=True,
        default_root_dir=args.run_dir,
        plugins=[KillingCheckpointIO(args.kill_step)],
    )
    return trainer, module, data, influence


def cli_config(
    data: str, run_dir: str, max_steps: int = 12, rewire_step: int = 6, val_every: int = 4
) -> dict:
    """The same run as ``build`` as a ``python train.py fit --config`` YAML dict (no kill points)."""
    return {
        "seed_everything": 0,
        "trainer": {
            **ONE_CPU_FLOAT32,
            **step_trainer_args({"max_steps": max_steps}, val_every, run_dir),
            "plugins": [{"class_path": "layermoe.checkpointing.AtomicCheckpointIO"}],
            "callbacks": [
                {
                    "class_path": "layermoe.callbacks.LayerInfluenceCallback",
                    "init_args": {
                        "scorer": "grad_norm",
                        "schedule": {"warmup": rewire_step, "interval": "step"},
                        **QUIET_INFLUENCE,
                    },
                },
                {"class_path": "layermoe.checkpointing.RNGStateCallback"},
                {"class_path": "layermoe.checkpointing.OptimizerStateGuard"},
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(Path(run_dir) / "checkpoints"),
                        "filename": "{step}",
                        "every_n_train_steps": 1,
                        "save_top_k": -1,
                        "save_last": True,
                    },
                },
            ],
        },
        "model": MODULE_ARGS,
        "data": data_args(data),
    }


# The resume matrix (tests/test_resume_matrix.py): 40 rows = 10 batches of 4 per epoch, validation every 5
# steps (mid-epoch at 5 and 15, at epoch 0's end at 10), every run 20 steps long however its length is set.
MATRIX_LENGTHS: dict[str, dict[str, int]] = {
    "max_steps": {"max_steps": 20},
    "max_epochs": {"max_epochs": 2},
    "both": {"max_steps": 24, "max_epochs": 2},  # as filed in issue 37: max_epochs is the bound that binds
}
# A step rewire after step 8; an epoch rewire scored at epoch 0's validation end (step 10), applied after step 11.
MATRIX_WARMUP = {"step": 8, "epoch": 1}
# Where each kind of checkpoint is written and the one the matrix resumes from (see matrix_checkpoints).
MATRIX_RESUME_FROM = {
    "mid_epoch": ("steps", "step=7.ckpt"),
    "epoch_end": ("epoch_end", "step=10.ckpt"),
    "validation_end": ("validation_end", "step=15.ckpt"),
}


def matrix_checkpoints(run_dir: str) -> list[dict[str, Any]]:
    """ModelCheckpoint arguments: after every step (``steps/``), inside ``on_train_epoch_end``
    (``epoch_end/``, where a monitored best lands when validation runs at the epoch end) and at every
    validation end (``validation_end/``)."""
    root = Path(run_dir) / "checkpoints"
    common = {"filename": "{step}", "save_top_k": -1}
    return [
        {"dirpath": str(root / "steps"), "every_n_train_steps": 1, **common},
        {"dirpath": str(root / "epoch_end"), "every_n_epochs": 1, "save_on_train_epoch_end": True, **common},
        # monitored, as a best checkpoint is (and so that its state_key differs from epoch_end's)
        {
            "dirpath": str(root / "validation_end"),
            "save_on_train_epoch_end": False,
            "monitor": "val/loss",
            **common,
        },
    ]


def matrix_trainer_args(length: str, run_dir: str) -> dict[str, Any]:
    return step_trainer_args(MATRIX_LENGTHS[length], 5, run_dir)


def step_trainer_args(length: dict[str, int], val_every: int, run_dir: str) -> dict[str, Any]:
    """Trainer arguments of a run of ``length`` validating every ``val_every`` steps (plain data: also a
    config's ``trainer`` section)."""
    return {
        **length,
        "val_check_interval": val_every,
        "check_val_every_n_epoch": None,
        "limit_val_batches": 2,
        **QUIET,
        "num_sanity_val_steps": 1,
        "deterministic": True,
        "default_root_dir": run_dir,
    }


def matrix_influence_args(interval: str) -> dict[str, Any]:
    return {
        "scorer": "grad_norm",
        "allocator_options": {"error_shrinkage": 0},  # a rewire that changes shapes (see build)
        "schedule": {"warmup": MATRIX_WARMUP[interval], "interval": interval},
        **QUIET_INFLUENCE,
    }


MATRIX_MODULE_ARGS = {**MODULE_ARGS, "print_metrics": False}


def matrix_plugin_fit(
    data: str, run_dir: str, length: str, interval: str, ckpt: str | None = None
) -> L.Trainer:
    """The plug-in path: a plain ``lightning.Trainer`` with the callback and ``exact_resume_callbacks()``."""
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        **matrix_trainer_args(length, run_dir),
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            LayerInfluenceCallback(**matrix_influence_args(interval)),
            *exact_resume_callbacks(),
            *(ModelCheckpoint(**kwargs) for kwargs in matrix_checkpoints(run_dir)),
        ],
    )
    trainer.fit(MoELoRAFineTuner(**MATRIX_MODULE_ARGS), datamodule=data_module(data), ckpt_path=ckpt)
    return trainer


def matrix_cli_config(data: str, run_dir: str, length: str, interval: str) -> dict[str, Any]:
    """The same run as ``matrix_plugin_fit`` as a ``python train.py fit --config`` YAML dict."""
    checkpoint = "lightning.pytorch.callbacks.ModelCheckpoint"
    return {
        "seed_everything": 0,
        "trainer": {
            **ONE_CPU_FLOAT32,
            **matrix_trainer_args(length, run_dir),
            "callbacks": [
                {
                    "class_path": "layermoe.callbacks.LayerInfluenceCallback",
                    "init_args": matrix_influence_args(interval),
                },
                *({"class_path": checkpoint, "init_args": kwargs} for kwargs in matrix_checkpoints(run_dir)),
            ],
        },
        "model": MATRIX_MODULE_ARGS,
        "data": data_args(data),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--rewire-step", type=int, default=6)
    parser.add_argument("--val-every", type=int, default=4)
    parser.add_argument("--kill-step", type=int, default=-1)
    parser.add_argument("--epochs", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny matrices: one thread is much faster on a shared 2-core machine
    trainer, module, data, influence = build(args)
    trainer.fit(module, datamodule=data, ckpt_path=args.ckpt)
    torch.save(
        {
            "trainable": {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad},
            "layout": layout(module.model),
            "global_step": trainer.global_step,
            "rewires_done": influence.state.rewires_done,
            "val_loss": validation_loss(module, data),
        },
        args.out,
    )
    print(f"DONE step={trainer.global_step} rewires={influence.state.rewires_done}", flush=True)


if __name__ == "__main__":
    main()
