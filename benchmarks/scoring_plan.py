"""The scoring memory plan for SmolLM2-135M and a Llama-7B-shaped model, from shapes alone (no weights).

The same planner `capture_statistics` runs before its first pass (`layermoe.scoring.plan_capture`):
given each block's number of scored coordinates d_l, the number of scored samples n + m and the store
size, it says how many passes the capture takes, how many bytes of rows it holds and which blocks are
CountSketched to how many coordinates.

    python benchmarks/scoring_plan.py                       # store: 10% of this machine's available RAM
    python benchmarks/scoring_plan.py --store-gib 8         # a fixed store
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from layermoe.scoring import adapter_block_dim, base_block_dim, plan_capture  # noqa: E402
from layermoe.scoring.plan import DEFAULT_STORE_FRACTION, default_store_bytes  # noqa: E402

#: (d_in, d_out) of the 7 wrapped projections: q, k, v, o, gate, up, down.
SHAPES = {
    "SmolLM2-135M": {"blocks": 30, "hidden": 576, "kv": 192, "intermediate": 1536},
    "Llama-7B": {"blocks": 32, "hidden": 4096, "kv": 4096, "intermediate": 11008},
}


def module_shapes(
    hidden: int, kv: int, intermediate: int, attention_only: bool = False
) -> list[tuple[int, int]]:
    attention = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden)]
    mlp = [(hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    return attention if attention_only else attention + mlp


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=128, help="training samples (the callback's default)")
    parser.add_argument("--m", type=int, default=64, help="validation samples (the callback's default)")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument(
        "--store-gib", type=float, default=None, help="store size (default: 10%% of available RAM)"
    )
    args = parser.parse_args()
    if args.store_gib is None:
        store, source = default_store_bytes(torch.device("cpu"), DEFAULT_STORE_FRACTION)
    else:
        store, source = int(args.store_gib * 2**30), f"--store-gib {args.store_gib}"
    samples = args.n + args.m
    for model, spec in SHAPES.items():
        blocks = range(spec["blocks"])
        shapes = module_shapes(spec["hidden"], spec["kv"], spec["intermediate"])
        cases = {
            f"adapter scope, MoE-LoRA {args.experts}x{args.rank} on all 7 projections": adapter_block_dim(
                shapes, args.experts, args.rank
            ),
            "base scope, attention q/k/v/o (LayerIF as published)": base_block_dim(
                module_shapes(spec["hidden"], spec["kv"], spec["intermediate"], attention_only=True)
            ),
        }
        for what, dim in cases.items():
            plan = plan_capture(dict.fromkeys(blocks, dim), samples, store, store_source=source)
            print(f"## {model} ({spec['blocks']} blocks, hidden {spec['hidden']}), {what}, n + m = {samples}")
            print(plan.describe())
            print()


if __name__ == "__main__":
    main()
