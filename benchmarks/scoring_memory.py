"""Peak RSS of the scoring pass against training's, on the same batches, in one process (SmolLM2-135M).

Why: the callback benchmark compares the RSS peak of scoring (24 batches of the scored samples) with
the peak of the few training steps before the rewire, whose batches may be shorter (batches are padded
to their longest row): that ratio mixes sequence length into the comparison. Here both phases see the
same batches, in the same process, in this order:

1. training: ``--batches`` optimizer steps (train mode, AdamW) over the first batches of the SST-2
   training loader (seed 0), twice over; peak RSS of these steps;
2. the measured phase (``--variant``), on the same batches (the last ``--val-batches`` as validation):
   ``capture``: ``capture_statistics`` at ``--projection-dim`` (the callback's k for SmolLM2 is 8,704);
   ``eval``: a plain eval-mode forward+backward (no hooks, no sketch), to separate the capture's own
   memory from that of an eval-mode backward; ``anchored``: the same, differentiating w.r.t. a detached
   copy of the input embeddings as the capture does.

Each variant runs in a fresh subprocess (RSS high-water marks never go down within one).

    python benchmarks/scoring_memory.py                       # all three variants
    python benchmarks/scoring_memory.py --variants capture
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("capture", "eval", "anchored")


class PeakRSS:
    """The process's RSS sampled every 10 ms; `measure(fn)` returns fn's peak."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.01)

    def measure(self, fn: Any) -> int:
        gc.collect()
        self.peak = self.process.memory_info().rss
        fn()
        time.sleep(0.05)
        return self.peak


def run_variant(variant: str, batches: int, val_batches: int, projection_dim: int) -> dict[str, Any]:
    import torch
    from callback_overhead import sst2_data_module  # this script's folder: run as a script

    from layermoe.callbacks.scoring_pass import resolve_per_sample_loss
    from layermoe.lightning_modules import MoELoRAFineTuner
    from layermoe.models import smollm2_dir
    from layermoe.paths import shared_data_dir
    from layermoe.scoring import capture_statistics

    torch.set_num_threads(1)
    rss = PeakRSS()
    model_dir, data_dir = smollm2_dir(), shared_data_dir() / "sst2"
    torch.manual_seed(0)
    module = MoELoRAFineTuner(
        model=str(model_dir),
        adapter={"experts": 4, "rank": 4, "lora_alpha": 8.0},
        task="classification",
        num_classes=2,
        lr=1e-3,
        print_layout=False,
        print_metrics=False,
    )
    data = sst2_data_module(model_dir, data_dir, batch_size=8)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    chunks = [next(loader) for _ in range(batches)]
    per_sample = resolve_per_sample_loss(module, None)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)

    def train() -> None:
        module.train()
        for batch in chunks:
            per_sample(module, batch).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def eval_backward(anchored: bool) -> None:
        anchors: list[torch.Tensor] = []
        handle = None
        if anchored:

            def anchor(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
                anchors.append(output.detach().requires_grad_(True))
                return anchors[-1]

            handle = module.model.get_input_embeddings().register_forward_hook(anchor)
        module.eval()
        try:
            with torch.enable_grad():
                for batch in chunks:
                    anchors.clear()
                    loss = per_sample(module, batch).sum()
                    if anchored:
                        torch.autograd.grad(loss, anchors)
                    else:
                        loss.backward()
        finally:
            if handle is not None:
                handle.remove()
            module.zero_grad(set_to_none=True)
            module.train()

    def capture() -> None:
        capture_statistics(
            module,
            chunks[: batches - val_batches],
            chunks[batches - val_batches :],
            per_sample,
            projection_dim=projection_dim,
            progress=False,
            show_plan=False,
        )

    measured = {
        "capture": capture,
        "eval": lambda: eval_backward(False),
        "anchored": lambda: eval_backward(True),
    }
    train_peak = max(rss.measure(train), rss.measure(train))
    phase_peak = rss.measure(measured[variant])
    return {
        "variant": variant,
        "batch_lengths": [int(b["input_ids"].shape[1]) for b in chunks],
        "train_peak_mib": train_peak / 2**20,
        "phase_peak_mib": phase_peak / 2**20,
        "ratio": phase_peak / train_peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument(
        "--batches", type=int, default=6, help="batches of 8 (training steps and scored chunks)"
    )
    parser.add_argument("--val-batches", type=int, default=2, help="of those, scored as validation")
    parser.add_argument("--projection-dim", type=int, default=8704)
    parser.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_variant(args.run_one, args.batches, args.val_batches, args.projection_dim)))
        return
    rows = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--run-one", variant, "--batches", str(args.batches)]
        command += ["--val-batches", str(args.val_batches), "--projection-dim", str(args.projection_dim)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"{variant} done (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    print(f"batches of 8, lengths {rows[0]['batch_lengths']} tokens; each variant in its own process\n")
    print("| measured phase | training peak RSS (same batches) | phase peak RSS | phase / training |")
    print("|---|---|---|---|")
    names = {
        "capture": f"capture_statistics, CountSketch k={args.projection_dim:,}",
        "eval": "eval-mode fwd+bwd, no capture",
        "anchored": "eval-mode fwd+bwd to detached embeddings, no capture",
    }
    for row in rows:
        print(
            f"| {names[row['variant']]} | {row['train_peak_mib']:.0f} MiB | {row['phase_peak_mib']:.0f} MiB "
            f"| {row['ratio']:.2f}x |"
        )


if __name__ == "__main__":
    main()
