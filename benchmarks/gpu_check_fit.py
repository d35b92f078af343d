"""gpu_check's fit phases: a Lightning fit with a rewire (or growth rounds) and a checkpoint per step,
resumed exactly.

One unbroken run (``fit_steps`` optimizer steps, a LayerInfluenceCallback rewire after half of them,
validation every 4 steps, dropout 0.1, shuffled data) writes ``step=K.ckpt`` after every step. Two more
runs start from its checkpoints (one before the rewire, one after it) in the same process and train to
the end; their final trainable tensors are compared with the unbroken run's, tensor for tensor. The growth
variant (``growth=True``): growth mode with two rounds after steps 2 and 5, the new A rows from the
weight gradients (SVD on the device), starting from 5% of the budget (a rank-1 expert on some blocks
only, so a round also adapts blocks that had none), resumed from between the rounds and after them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

ADAPTER = {"experts": 2, "rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.1}
VALIDATE_EVERY = 4
GROWTH = {"rounds": 2, "init": "gradient", "initial_fraction": 0.05}
GROWTH_SCHEDULE = {"warmup": 2, "every": 3, "interval": "step"}  # rounds after steps 2 and 5


def write_data(folder: Path) -> None:
    """A small two-class task whose label follows the words (learnable, so the fit moves the weights)."""
    rng = random.Random(0)
    words = ["good", "bad", "great", "awful", "fine", "poor", "nice", "sad"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", 48), ("val", 8)):
        with open(folder / f"{name}.jsonl", "w") as handle:
            for _ in range(rows):
                text = [rng.choice(words) for _ in range(rng.randint(2, 6))]
                label = int(2 * sum(words.index(w) % 2 == 0 for w in text) > len(text))
                handle.write(json.dumps({"text": " ".join(text), "label": label}) + "\n")


def fit(
    data: Path,
    run_dir: Path,
    spec: dict,
    shapes: Any,
    device: torch.device,
    ckpt: str | None = None,
    growth: bool = False,
) -> dict[str, Any]:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from layermoe.adapters import layout
    from layermoe.callbacks import LayerInfluenceCallback
    from layermoe.checkpointing import AtomicCheckpointIO, exact_resume_callbacks
    from layermoe.lightning_modules import MoELoRAFineTuner, TextDataModule

    L.seed_everything(0, verbose=False)
    module = MoELoRAFineTuner(
        model=spec,
        adapter=ADAPTER,
        task="classification",
        num_classes=2,
        lr=1e-2,
        scheduler="cosine",
        warmup_steps=2,
        dtype=shapes.dtype,
        print_layout=False,
        print_metrics=False,
    )
    data_module = TextDataModule(
        train_file=str(data / "train.jsonl"),
        val_file=str(data / "val.jsonl"),
        tokenizer="tiny",
        label_words=["no", "yes"],
        max_length=24,
        batch_size=4,
        eval_batch_size=4,
        seed=0,
    )
    mode: dict[str, Any] = {
        # a rewire that moves something even from 8-sample scores, so the resume must rebuild shapes
        "allocator_options": {"error_shrinkage": 0},
        "schedule": {"warmup": shapes.fit_steps // 2, "interval": "step"},
    }
    if growth:
        mode = {"growth": GROWTH, "schedule": GROWTH_SCHEDULE, "keep_scaling": True}
    influence = LayerInfluenceCallback(
        scorer="grad_norm",
        **mode,
        num_train_samples=8,
        num_val_samples=8,
        plot=False,
        verbose=False,
    )
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        precision=shapes.precision,
        max_steps=shapes.fit_steps,
        val_check_interval=VALIDATE_EVERY,
        check_val_every_n_epoch=None,
        limit_val_batches=2,
        num_sanity_val_steps=0,
        # "warn": an op without a deterministic CUDA kernel must not end the phase; the comparison tells
        deterministic="warn",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            influence,
            *exact_resume_callbacks(),
            ModelCheckpoint(
                dirpath=run_dir / "checkpoints",
                filename="{step}",
                every_n_train_steps=1,
                save_top_k=-1,
                save_last=True,
            ),
        ],
    )
    trainer.fit(module, datamodule=data_module, ckpt_path=ckpt)
    return {
        "trainable": {n: p.detach().float().cpu() for n, p in module.named_parameters() if p.requires_grad},
        "layout": layout(module.model),
        "global_step": trainer.global_step,
        "rewires_done": influence.state.rewires_done,
        "history": influence.history,
        "start_layout": None if influence.state.growth is None else influence.state.growth["plan"]["initial"],
    }


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max((float((a[k] - b[k]).abs().max()) for k in a if a[k].numel()), default=0.0)


def compare_resumes(
    tmp: Path, spec: dict, shapes: Any, device: torch.device, growth: bool = False
) -> dict[str, Any]:
    data = tmp / "data"
    write_data(data)
    unbroken = fit(data, tmp / "unbroken", spec, shapes, device, growth=growth)
    start_layout = unbroken["start_layout"] or {
        b: {"experts": ADAPTER["experts"], "rank": ADAPTER["rank"]} for b in unbroken["layout"]
    }
    resumes = []
    # before and after the rewire; growth: between its rounds and after both
    steps = (3, 6) if growth else (shapes.fit_steps // 2 - 1, shapes.fit_steps // 2 + 1)
    for from_step in steps:
        checkpoint = tmp / "unbroken" / "checkpoints" / f"step={from_step}.ckpt"
        resumed = fit(
            data, tmp / f"from{from_step}", spec, shapes, device, ckpt=str(checkpoint), growth=growth
        )
        identical = unbroken["trainable"].keys() == resumed["trainable"].keys() and all(
            torch.equal(unbroken["trainable"][k], resumed["trainable"][k]) for k in unbroken["trainable"]
        )
        resumes.append(
            {
                "from_step": from_step,
                "global_step": resumed["global_step"],
                "same_layout": resumed["layout"] == unbroken["layout"],
                "tensors": len(resumed["trainable"]),
                "identical": identical,
                "max_abs_diff": max_abs_diff(unbroken["trainable"], resumed["trainable"]),
            }
        )
    out = {
        "steps": shapes.fit_steps,
        "rewires_done": unbroken["rewires_done"],
        "layout_changed": unbroken["layout"] != start_layout,
        "final_layout": {str(b): f"{v['experts']}x{v['rank']}" for b, v in unbroken["layout"].items()},
        "resumes": resumes,
    }
    if growth:
        out["start_layout"] = {str(b): f"{v['experts']}x{v['rank']}" for b, v in start_layout.items()}
        out["round_steps"] = [entry["step"] for entry in unbroken["history"]]
        # the validation loss on the scoring samples before and after each round (B = 0: unchanged)
        out["max_round_disturbance"] = max((abs(e["disturbance"]) for e in unbroken["history"]), default=None)
    return out
