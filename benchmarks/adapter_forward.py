"""Forward+backward of one MoE-LoRA layer against peft LoRA, a per-expert loop and the frozen base alone.

Usage:
    python benchmarks/adapter_forward.py [--dims 576 4096] [--experts 2 4 8] [--dtypes fp32 bf16]
        [--repeats 7] [--big-repeats 3] [--threads N] [--tokens 1024] [--markdown out.md]

Variants, all with a frozen d x d nn.Linear base, rank r=8 per expert, top-2 routing, input requiring
grad (as inside a network), loss = sum(output * fixed random weights):
    ours   MoELoRALinear with its automatic path: dense (stacked A, gates on r-blocks, stacked B),
           grouped (selected experts only) where `use_grouped()` picks it, or dense computed in float32
           for bf16 parameters on a CPU without native bf16 (`compute_dtype()`); for the last two
           "dense" (in the parameters' dtype) is timed too
    peft   peft LoRA with the same total rank E*r (the cost floor of any dense-stacked MoE-LoRA)
    loop   per-expert loop as in MoLA / Mixtral-style code: route, index_select each expert's tokens,
           run the expert, index_add back (computes only the selected experts)
    base   the frozen base layer alone (the floor)
"adapter: loop/ours" compares the adapter overheads (variant minus base). Repeats are interleaved (one timing of each variant per round) and the median is reported, so slow
phases of a shared machine hit all variants alike. Ratios are printed from this one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from layermoe.adapters import MoELoRALinear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LoopMoELoRA(nn.Module):
    """Reference MoE-LoRA computing only the selected experts, one Python iteration per expert."""

    def __init__(self, layer: MoELoRALinear) -> None:
        super().__init__()
        self.base_layer = layer.base_layer
        E, r = layer.experts, layer.rank
        self.experts, self.top_k, self.scaling = E, layer.top_k, layer.scaling
        self.A = nn.ParameterList(
            [nn.Parameter(layer.lora_A.detach()[e * r : (e + 1) * r].clone()) for e in range(E)]
        )
        self.B = nn.ParameterList(
            [nn.Parameter(layer.lora_B.detach()[:, e * r : (e + 1) * r].clone()) for e in range(E)]
        )
        self.router = nn.Linear(layer.in_features, E, dtype=layer.lora_A.dtype)
        with torch.no_grad():
            self.router.weight.copy_(layer.lora_router_weight)
            self.router.bias.copy_(layer.lora_router_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = self.base_layer(flat)
        probs = torch.softmax(self.router(flat).float(), dim=-1)
        top_v, top_i = probs.topk(self.top_k, dim=-1)
        top_v = (top_v / top_v.sum(-1, keepdim=True) * self.scaling).to(flat.dtype)
        delta = torch.zeros_like(out)
        for e in range(self.experts):
            token, slot = (top_i == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            h = F.linear(F.linear(flat.index_select(0, token), self.A[e]), self.B[e])
            delta = delta.index_add(0, token, h * top_v[token, slot].unsqueeze(-1))
        return (out + delta).reshape(*x.shape[:-1], -1)


def make_peft(base: nn.Linear, rank: int) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    holder = nn.Module()
    holder.proj = base
    holder.forward = lambda x: holder.proj(x)  # type: ignore[method-assign]
    model = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=16, target_modules=["proj"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    return model


def fwd_bwd(module: nn.Module, x: torch.Tensor, weights: torch.Tensor) -> Callable[[], float]:
    def step() -> float:
        x.grad = None
        for p in module.parameters():
            p.grad = None
        start = time.perf_counter()
        (module(x) * weights).sum().backward()
        return time.perf_counter() - start

    return step


def bench_setting(d: int, experts: int, dtype: torch.dtype, repeats: int, tokens: int) -> dict[str, float]:
    torch.manual_seed(0)
    base = nn.Linear(d, d).to(dtype)
    base.requires_grad_(False)
    ours = MoELoRALinear(base, experts=experts, rank=8, top_k=2, lora_alpha=16.0)
    with torch.no_grad():
        ours.lora_B.normal_(0, 0.01)
        ours.lora_router_weight.normal_(0, 0.02)
    loop = LoopMoELoRA(ours)
    peft_model = make_peft(base, experts * 8)
    x = torch.randn(tokens // 128, 128, d, dtype=dtype, requires_grad=True)
    weights = torch.randn(tokens // 128, 128, d, dtype=dtype)
    steps = {
        "ours": fwd_bwd(ours, x, weights),
        "peft": fwd_bwd(peft_model, x, weights),
        "loop": fwd_bwd(loop, x, weights),
        "base": fwd_bwd(base, x, weights),
    }
    path = "grouped" if ours.use_grouped() else "dense"
    if ours.compute_dtype() != ours.lora_A.dtype:
        path += f" in {str(ours.compute_dtype()).removeprefix('torch.')}"
    if path != "dense":  # the automatic choice is not the plain dense path: also time that one
        dense = MoELoRALinear(base, experts=experts, rank=8, top_k=2, lora_alpha=16.0)
        dense.load_state_dict(ours.state_dict())
        dense.path = "dense"
        steps["dense"] = fwd_bwd(dense, x, weights)
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(step())
    result = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    result["path"] = path
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 4096])
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats (d < 4096)")
    parser.add_argument("--big-repeats", type=int, default=3, help="interleaved repeats at d >= 4096")
    parser.add_argument("--tokens", type=int, default=8 * 128)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    header = (
        "| d | E | dtype | path | ours ms | dense ms | peft(E*r) ms | loop ms | base ms | ours/peft | loop/ours | "
        "ours/base | adapter: loop/ours |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, tokens {args.tokens}, r=8, top-2")
    print(header, flush=True)
    rows = [header]
    for dtype_name in args.dtypes:
        for d in args.dims:
            for experts in args.experts:
                repeats = args.big_repeats if d >= 4096 else args.repeats
                t = bench_setting(d, experts, DTYPES[dtype_name], repeats, args.tokens)
                dense = f"{t['dense']:.1f}" if "dense" in t else "="
                adapter = (t["loop"] - t["base"]) / max(t["ours"] - t["base"], 1e-9)
                row = (
                    f"| {d} | {experts} | {dtype_name} | {t['path']} | {t['ours']:.1f} | {dense} | {t['peft']:.1f} | "
                    f"{t['loop']:.1f} | {t['base']:.1f} | {t['ours'] / t['peft']:.2f} | {t['loop'] / t['ours']:.2f} | "
                    f"{t['ours'] / t['base']:.2f} | {adapter:.2f} |"
                )
                print(row, flush=True)
                rows.append(row)
    if args.markdown:
        with open(args.markdown, "w") as handle:
            handle.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
