"""How much the warm-up's first LR moves a plain peft run (issue 35).

transformers' warm-up (``get_cosine_with_min_lr_schedule_with_warmup``) trains step 1 at LR 0, the
project's (``lr_multiplier``) at lr / warmup_steps; otherwise the two training paths agree step for step
(tests/test_training_parity.py). Here benchmarks/peft_parity.py's plain loop runs twice from the same
LoRA weights over the same batches, once with each schedule, and prints how far apart the adapter
updates (scaling * B A) end, relative to their size, with each run's last training losses and its test
losses; for scale, also how far the project's schedule lands from itself when only the shuffle order
changes (the batches of seed + 1). Defaults: the parity benchmark's settings (150 steps of batch 8, lr 4e-3, 3 warm-up steps, cosine
to 10%, rank 2 on all 7 projections) on its tiny random Llama with the byte tokenizer (``--quick``'s
model and task sizes); any option of peft_parity.py that is not listed here is passed on to it.

    python benchmarks/warmup_start.py                 # facts, seed 0
    python benchmarks/warmup_start.py --task skills --warmup 10
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import peft_parity  # noqa: E402

from layermoe.lightning_modules.model_factory import build_model  # noqa: E402
from layermoe.lightning_modules.schedule import lr_multiplier  # noqa: E402
from layermoe.paths import cache_dir  # noqa: E402

SCHEDULES = ("transformers", "project")


def adapter_updates(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """scaling * B A of every peft LoRA module: what the adapter adds to the frozen weight."""
    return {
        name: float(module.scaling["default"])
        * module.lora_B["default"].weight.detach()
        @ module.lora_A["default"].weight.detach()
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})
    }


def relative_gap(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]) -> float:
    """||theirs - ours|| / ||ours|| over every module's update (Frobenius)."""
    gap = sum(float((theirs[k] - ours[k]).pow(2).sum()) for k in ours)
    size = sum(float(ours[k].pow(2).sum()) for k in ours)
    return math.sqrt(gap / size) if size else math.nan


def train_with(schedule: str, batches: Sequence[dict], args: argparse.Namespace, seed: int):
    """The plain loop from the same initial LoRA (seeded) with transformers' or the project's schedule."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    base = build_model(peft_parity.TINY_MODEL)
    torch.manual_seed(seed)
    model = peft_parity.peft_lora(base, args.rank, args.alpha, args.targets.split(","))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    if schedule == "transformers":
        scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, args.warmup, args.steps, min_lr_rate=args.min_lr_ratio
        )
    else:
        multiplier = lr_multiplier("cosine", args.warmup, args.steps, args.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
    losses = peft_parity.plain_loop(model, batches, optimizer, scheduler, args.loss_aggregation)
    return model, losses


def measure(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="facts", choices=["facts", "skills"])
    p.add_argument("--seed", type=int, default=0)
    own, rest = p.parse_known_args(argv)
    settings = peft_parity.parse(rest)
    args = peft_parity.parse(["--quick", *rest])  # the tiny model, byte tokenizer and task sizes
    for key in ("steps", "batch_size", "lr", "warmup", "max_length"):
        setattr(args, key, getattr(settings, key))
    workdir = Path(args.workdir) if args.workdir else cache_dir() / "parity" / "warmup_start"
    folder, description = peft_parity.prepare_task(own.task, args, workdir / own.task)
    dm = peft_parity.data_module(own.task, folder, args, own.seed, carve=False)
    dm.setup()
    tokenizer = dm.prepare_tokenizer()
    rows = peft_parity.read_rows(folder / "train.jsonl")
    train = [peft_parity.plain_encode(tokenizer, r, own.task, args.max_length) for r in rows]
    batches = list(
        peft_parity.plain_batches(train, args.batch_size, args.steps, own.seed, tokenizer.pad_token_id)
    )
    test = peft_parity.project_examples(dm, "test")
    runs: dict[str, Any] = {}
    for schedule in SCHEDULES:
        model, losses = train_with(schedule, batches, args, own.seed)
        metrics = peft_parity.evaluate(model, test, tokenizer.pad_token_id, args.eval_batch_size, None)
        runs[schedule] = {"updates": adapter_updates(model), "losses": losses, **metrics}
    reshuffled = peft_parity.plain_batches(
        train, args.batch_size, args.steps, own.seed + 1, tokenizer.pad_token_id
    )
    other_order = adapter_updates(train_with("project", list(reshuffled), args, own.seed)[0])
    ours = runs["project"]["updates"]
    return {
        "description": f"{description}; {args.steps} steps of batch {args.batch_size}, lr {args.lr}, "
        f"warm-up {args.warmup}, seed {own.seed}",
        "relative_update_gap": relative_gap(runs["transformers"]["updates"], ours),
        "max_update_gap": max(
            float((runs["transformers"]["updates"][k] - ours[k]).abs().max()) for k in ours
        ),
        "relative_gap_other_order": relative_gap(other_order, ours),
        "runs": {s: {k: v for k, v in run.items() if k != "updates"} for s, run in runs.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    result = measure(argv)
    print(result["description"])
    print(
        f"adapter updates (scaling * B A), transformers' warm-up vs the project's: relative gap "
        f"{result['relative_update_gap']:.4f} (Frobenius, all modules), max |diff| {result['max_update_gap']:.3g};"
        f" for scale, the project's schedule with another shuffle order: {result['relative_gap_other_order']:.4f}"
    )
    for schedule, run in result["runs"].items():
        last = statistics.fmean(run["losses"][-10:])
        print(
            f"{schedule:>12}: train loss (last 10 steps) {last:.4f}, test loss/sample {run['loss_sample']:.4f}, "
            f"loss/token {run['loss_token']:.4f}, exact {run['exact_match']:.3f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
