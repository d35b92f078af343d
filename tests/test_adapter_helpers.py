"""Shared helpers (no tests here): a naive per-token, per-expert reference of the MoE-LoRA forward.

Loops over tokens and experts in float64 with explicit softmax, top-k selection and renormalization, so
the batched implementation is checked against the definition rather than against itself.
"""

from __future__ import annotations

import math

import torch


def naive_adapter_output(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    router_weight: torch.Tensor | None,
    router_bias: torch.Tensor | None,
    experts: int,
    rank: int,
    top_k: int | None,
    lora_alpha: float,
) -> torch.Tensor:
    """sum_e gate_e(x) * (alpha / rank) * B_e A_e x for each token of x (..., d_in), in float64."""
    flat = x.reshape(-1, x.shape[-1]).double()
    A, B = A.double(), B.double()
    scaling = lora_alpha / rank
    out = torch.zeros(flat.shape[0], B.shape[0], dtype=torch.float64)
    for t in range(flat.shape[0]):
        token = flat[t]
        if experts == 1:
            gates = [1.0]
        else:
            logits = [
                float(router_weight[e].double() @ token + router_bias[e].double()) for e in range(experts)
            ]
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            probs = [v / sum(exps) for v in exps]
            if top_k is None or top_k >= experts:
                gates = probs
            else:
                chosen = sorted(range(experts), key=lambda e: -probs[e])[:top_k]
                total = sum(probs[e] for e in chosen)
                gates = [probs[e] / total if e in chosen else 0.0 for e in range(experts)]
        for e in range(experts):
            if gates[e] == 0.0:
                continue
            A_e = A[e * rank : (e + 1) * rank]
            B_e = B[:, e * rank : (e + 1) * rank]
            out[t] += gates[e] * scaling * (B_e @ (A_e @ token))
    return out.reshape(*x.shape[:-1], B.shape[0])


def layer_reference(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Naive adapter output of an `MoELoRALinear`'s current parameters."""
    return naive_adapter_output(
        x,
        layer.lora_A.detach(),
        layer.lora_B.detach(),
        None if layer.lora_router_weight is None else layer.lora_router_weight.detach(),
        None if layer.lora_router_bias is None else layer.lora_router_bias.detach(),
        layer.experts,
        layer.rank,
        layer.top_k,
        layer.lora_alpha,
    )


def randomize(layer: torch.nn.Module, seed: int = 0, b_std: float = 0.1, router_std: float = 0.5) -> None:
    """Give B and the router nonzero values (a trained-looking adapter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * b_std)
        if layer.lora_router_weight is not None:
            layer.lora_router_weight.copy_(
                torch.randn(layer.lora_router_weight.shape, generator=generator) * router_std
            )
            layer.lora_router_bias.copy_(
                torch.randn(layer.lora_router_bias.shape, generator=generator) * router_std
            )
