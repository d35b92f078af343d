"""Grouped MoE-LoRA path: compute only the selected experts, tokens sorted by expert.

The dense path multiplies every token by every expert's A and B, which costs E/k times the useful
flops. Where matmuls are slow relative to indexing (fp16 on CPUs without native support) the
selected-only computation wins, so `MoELoRALinear` picks this path there automatically (see
`MoELoRALinear.use_grouped`). One sort and one index_select gather the token copies grouped by
expert; each expert then runs two small matmuls on its contiguous slice, and one index_add scatters
the weighted results back onto the base output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_lora_output(
    result: torch.Tensor,
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    logits: torch.Tensor,
    experts: int,
    rank: int,
    top_k: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(result + routed adapter output, router probabilities) for flattened x (N, d_in), result (N, d_out).

    Gates: softmax over all experts, top-k kept and renormalized (the same as the dense path).
    """
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top_v, top_i = probs.topk(top_k, dim=-1)
    weights = (top_v / top_v.sum(dim=-1, keepdim=True) * scaling).to(x.dtype)
    flat_expert = top_i.reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    token = torch.div(order, top_k, rounding_mode="floor")
    counts = torch.bincount(flat_expert, minlength=experts).tolist()
    x_sorted = x.index_select(0, token)
    w_sorted = weights.reshape(-1).index_select(0, order).unsqueeze(-1)
    pieces = []
    start = 0
    for e, count in enumerate(counts):
        if count == 0:
            continue
        rows = slice(start, start + count)
        hidden = F.linear(x_sorted[rows], A[e * rank : (e + 1) * rank]) * w_sorted[rows]
        pieces.append(F.linear(hidden, B[:, e * rank : (e + 1) * rank]))
        start += count
    if not pieces:
        return result, probs
    return result.index_add(0, token, torch.cat(pieces).to(result.dtype)), probs
