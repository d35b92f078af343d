"""Training-step time of SmolLM2-135M with MoE-LoRA vs. peft LoRA, measured side by side in one run.

Usage: python scripts/bench_step_time.py [--batch 8] [--length 48] [--steps 5] [--threads N] [--variants ...]
Needs the prepared model (`python -m layermoe.models prepare smollm2`). Prints a markdown table with the
ratio of each step time to peft LoRA's and to MoE-LoRA on all blocks (`moe7`). `moe7top` puts the same
adapters on the top half of the blocks only (0 experts below): backward then stops at the lowest
adapted block, which is the step-time gain of zero-capacity blocks.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from layermoe.adapters import MoELoRAConfig, collect_router_losses, inject
from layermoe.lightning_modules.losses import per_sample_loss_from_logits
from layermoe.lightning_modules.model_factory import build_model

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make(kind: str, targets: list[str], experts: int, rank: int, top_half: bool = False) -> torch.nn.Module:
    model = build_model("smollm2")
    model.config.use_cache = False
    if kind == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        model.lm_head.weight.requires_grad_(False)
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=targets))
    else:
        blocks = model.config.num_hidden_layers
        per_block = {b: 0 if top_half and b < blocks // 2 else experts for b in range(blocks)}
        inject(model, MoELoRAConfig(target_modules=targets, experts=per_block, rank=rank))
    return model.train()


def step_times(model: torch.nn.Module, batch: dict[str, torch.Tensor], steps: int) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = per_sample_loss_from_logits(logits, batch["labels"]).mean() + collect_router_losses(model).loss
        if optimizer is not None:
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[1:]  # first step warms up allocator and kernels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--variants", default="frozen,peft,moe7,moe7top,moeattn", help="comma list of variant keys"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (args.batch, args.length))
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    known = {
        "frozen": ("forward only (no grad), frozen base", "frozen", ALL7, 1, 1, False),
        "peft": ("peft LoRA r=16, 7 projections", "peft", ALL7, 1, 16, False),
        "moe7": ("MoE-LoRA 4 experts x r=4, 7 projections", "moe", ALL7, 4, 4, False),
        "moe7top": ("MoE-LoRA 4 experts x r=4, 7 projections, top half only", "moe", ALL7, 4, 4, True),
        "moeattn": ("MoE-LoRA 4 experts x r=4, attention only", "moe", ATTN, 4, 4, False),
    }
    variants = [known[key] for key in args.variants.split(",")]
    print(f"SmolLM2-135M, batch {args.batch} x {args.length} tokens, fp32, {torch.get_num_threads()} threads")
    print(
        f"| variant | trainable params | step time (s, median of {args.steps}) | ratio to peft LoRA "
        "| ratio to MoE-LoRA on all blocks |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    rows = []
    for label, kind, targets, experts, rank, top_half in variants:
        model = make(kind, targets, experts, rank, top_half)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if kind == "frozen":
            with torch.no_grad():
                t = step_times(model, batch, args.steps)
        else:
            t = step_times(model, batch, args.steps)
        rows.append((label, trainable, statistics.median(t)))
        print(f"measured {label}: {[round(x, 2) for x in t]}", file=sys.stderr, flush=True)
        del model
    reference = next((t for label, _, t in rows if label.startswith("peft")), None)
    all_blocks = next((t for label, _, t in rows if label == known["moe7"][0]), None)
    for label, trainable, t in rows:
        ratio = f"{t / reference:.2f}" if reference else "n/a"
        ratio_moe = f"{t / all_blocks:.2f}" if all_blocks else "n/a"
        print(f"| {label} | {trainable:,} | {t:.2f} | {ratio} | {ratio_moe} |")


if __name__ == "__main__":
    main()
