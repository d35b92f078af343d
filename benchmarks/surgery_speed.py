"""Rewire surgery on SmolLM2-135M-shaped adapters: batched planning vs layer by layer, side by side.

30 blocks x 7 projections (d=576, kv 192, intermediate 1536; frozen base weights are not needed, so they
are left uninitialized), MoE-LoRA 4 experts x rank 4 with trained-looking B and routers. Each round
restores the same starting adapters and times `apply_layout` to the target layout with
`batched=True` (the default) and `batched=False`, interleaved; medians of the rounds are reported.

    python benchmarks/surgery_speed.py --repeats 7
    python benchmarks/surgery_speed.py --layout "0:4x4 1:5x4 ..."     # any target layout
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import skip_init  # noqa: E402

from layermoe.adapters import MoELoRAConfig, apply_layout, inject, named_moe_layers  # noqa: E402
from layermoe.callbacks.transaction import ModuleSnapshot  # noqa: E402

#: the layout LayerInfluenceCallback chose in BENCHMARKS.md's callback run (SmolLM2-135M, SST-2)
CALLBACK_LAYOUT = (
    "0:4x4 1:5x4 2:4x4 3:4x4 4:4x4 5:4x4 6:4x4 7:4x4 8:5x4 9:5x4 10:5x4 11:4x4 12:4x4 13:5x4 14:4x4 15:5x4 "
    "16:5x4 17:5x4 18:5x4 19:5x4 20:5x4 21:4x4 22:4x4 23:3x4 24:3x4 25:5x4 26:2x4 27:2x4 28:1x4 29:1x4"
)


def smollm2_shaped(blocks: int = 30) -> nn.Module:
    """SmolLM2-135M's projection layers under ``layers.<i>.self_attn/mlp`` and nothing else; the weights
    stay uninitialized since surgery reads only their shapes. The adapter tests resize this model too."""
    d, f, kv = 576, 1536, 192
    shapes = {
        "self_attn.q_proj": (d, d),
        "self_attn.k_proj": (d, kv),
        "self_attn.v_proj": (d, kv),
        "self_attn.o_proj": (d, d),
        "mlp.gate_proj": (d, f),
        "mlp.up_proj": (d, f),
        "mlp.down_proj": (f, d),
    }
    model = nn.Module()
    model.layers = nn.ModuleList()
    for _ in range(blocks):
        block = nn.Module()
        block.self_attn, block.mlp = nn.Module(), nn.Module()
        for name, (d_in, d_out) in shapes.items():
            parent, child = name.split(".")
            setattr(getattr(block, parent), child, skip_init(nn.Linear, d_in, d_out, bias=False))
        model.layers.append(block)
    return model


def parse_layout(text: str) -> dict[int, dict[str, int]]:
    out = {}
    for item in text.split():
        block, shape = item.split(":")
        experts, rank = shape.split("x")
        out[int(block)] = {"experts": int(experts), "rank": int(rank)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layout", default=CALLBACK_LAYOUT, help="target layout, 'block:EXPERTSxRANK ...'")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = smollm2_shaped()
    inject(model, MoELoRAConfig(experts=4, rank=4, lora_alpha=8.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in named_moe_layers(model).values():
            layer.lora_B.normal_(0, 0.05, generator=generator)
            layer.lora_router_weight.normal_(0, 0.5, generator=generator)
            layer.lora_routing_mass.copy_(torch.rand(layer.experts, generator=generator))
    target = parse_layout(args.layout)
    snapshot = ModuleSnapshot(model)
    times: dict[str, list[float]] = {"batched": [], "per-layer": []}
    changed = 0
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, batched in (("batched", True), ("per-layer", False)):
            snapshot.restore()
            start = time.perf_counter()
            changed = len(apply_layout(model, target, batched=batched))
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(values[1:]) for name, values in times.items()}
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, {changed} layers resized, {args.repeats} rounds"
    )
    print("| planning | median s | min s | per-layer / batched |")
    print("|---|---|---|---|")
    for name in times:
        print(
            f"| {name} | {med[name]:.3f} | {min(times[name][1:]):.3f} | {med['per-layer'] / med[name]:.2f} |"
        )


if __name__ == "__main__":
    main()
