"""Costs of the checkpointing pieces, each measured side by side with its baseline in one run.

1. Saving: ``AtomicCheckpointIO`` (temp file in the folder, fsync, rename, fsync folder) vs Lightning's
   ``TorchCheckpointIO``, for checkpoints of several sizes (median of interleaved repeats).
2. Per-checkpoint extras: ``capture_rng_state`` and ``optimizer_manifest`` for a SmolLM2-sized adapter
   count (30 blocks x 7 modules x 4 tensors), vs the ``torch.save`` of that checkpoint.
3. Data: iterating ``ResumableDataLoader`` vs a plain shuffled ``DataLoader`` (per-batch overhead), and
   reaching batch k after a restart: ``load_state_dict`` + first batch vs iterating k batches.

    python benchmarks/checkpoint_io.py [--sizes-mb 1 16 64] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from layermoe.checkpointing import (
    AtomicCheckpointIO,
    capture_rng_state,
    optimizer_manifest,
    resumable_train_loader,
)


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench_save(sizes_mb: list[int], repeats: int) -> list[str]:
    rows = ["| size MB | stock ms | atomic ms | atomic/stock |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as folder:
        for size in sizes_mb:
            checkpoint = {"state_dict": {"w": torch.randn(size * 2**18)}, "step": 1}  # 4 bytes per value
            stock, atomic = TorchCheckpointIO(), AtomicCheckpointIO()
            stock_times, atomic_times = [], []
            for _ in range(repeats):  # interleaved: both see the same disk and machine load
                stock_times.append(
                    _median_ms(lambda io=stock, c=checkpoint: io.save_checkpoint(c, f"{folder}/s.ckpt"), 1)
                )
                atomic_times.append(
                    _median_ms(lambda io=atomic, c=checkpoint: io.save_checkpoint(c, f"{folder}/a.ckpt"), 1)
                )
            s, a = statistics.median(stock_times), statistics.median(atomic_times)
            rows.append(f"| {size} | {s:.1f} | {a:.1f} | {a / s:.2f} |")
    return rows


def bench_extras(repeats: int) -> list[str]:
    params = {
        f"model.layers.{b}.{m}.{t}": torch.nn.Parameter(
            torch.randn(16, 576) if t in ("lora_A", "lora_B") else torch.randn(4)
        )
        for b in range(30)
        for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        for t in ("lora_A", "lora_B", "lora_router_weight", "lora_router_bias")
    }
    module = torch.nn.Module()
    for name, p in params.items():
        module.register_parameter(name.replace(".", "_"), p)
    optimizer = torch.optim.AdamW(list(params.values()))
    checkpoint = {"state_dict": {k: v.detach() for k, v in params.items()}}
    rng_ms = _median_ms(capture_rng_state, repeats * 5)
    manifest_ms = _median_ms(lambda: optimizer_manifest(module, [optimizer]), repeats)
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as folder:
        save_ms = _median_ms(lambda: torch.save(checkpoint, f"{folder}/x.ckpt"), repeats)
    return [
        "| what | ms | / torch.save of the adapters |",
        "|---|---|---|",
        f"| torch.save, {len(params)} adapter tensors | {save_ms:.2f} | 1.00 |",
        f"| capture_rng_state | {rng_ms:.3f} | {rng_ms / save_ms:.3f} |",
        f"| optimizer_manifest ({len(params)} params) | {manifest_ms:.3f} | {manifest_ms / save_ms:.3f} |",
    ]


def bench_data(repeats: int) -> list[str]:
    dataset = TensorDataset(torch.randn(4096, 64), torch.arange(4096))
    plain = DataLoader(dataset, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    resumable = resumable_train_loader(dataset, 8, seed=0)
    plain_ms = _median_ms(lambda: sum(1 for _ in plain), repeats)
    ours_ms = _median_ms(lambda: sum(1 for _ in resumable), repeats)
    k = 400
    state = {**resumable.state_dict(), "epoch": 0, "batches_yielded": k}

    def restart_ours() -> None:
        loader = resumable_train_loader(dataset, 8, seed=0)
        loader.load_state_dict(state)
        next(iter(loader))

    def restart_by_iterating() -> None:
        iterator = iter(resumable_train_loader(dataset, 8, seed=0))
        for _ in range(k + 1):
            next(iterator)

    ours_restart = _median_ms(restart_ours, repeats)
    naive_restart = _median_ms(restart_by_iterating, repeats)
    return [
        "| what | ms | ratio |",
        "|---|---|---|",
        f"| epoch of 512 batches, plain DataLoader | {plain_ms:.1f} | 1.00 |",
        f"| epoch of 512 batches, ResumableDataLoader | {ours_ms:.1f} | {ours_ms / plain_ms:.2f} |",
        f"| reach batch {k} by iterating | {naive_restart:.1f} | 1.00 |",
        f"| reach batch {k}: load_state_dict + first batch | {ours_restart:.2f} | {ours_restart / naive_restart:.3f} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for title, rows in (
        ("Saving a checkpoint", bench_save(args.sizes_mb, args.repeats)),
        ("Extras per checkpoint", bench_extras(args.repeats)),
        ("Training data", bench_data(args.repeats)),
    ):
        print(f"\n### {title}\n")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
