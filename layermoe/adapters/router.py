"""Routing math shared by the layer and the tests' reference: gates, load and auxiliary router losses.

Switch-Transformer load balancing: aux = E * sum_e f_e * P_e, with f_e the fraction of token slots
dispatched to expert e (top-k selection; top-1 under dense routing, where every expert is "selected" and
the loss would otherwise be constant) and P_e the mean gate probability. ST-MoE z-loss: mean over tokens
of logsumexp(logits)^2, which keeps router logits small and the softmax well conditioned.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from layermoe.layout import effective_top_k


def compute_gates(logits: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates (..., E) from router logits and the softmax probabilities (float32 or wider) they came from.

    top_k None means dense softmax; otherwise the k largest probabilities are kept and renormalized
    to sum to one (the rest are exactly zero).
    """
    # at least float32 (bf16 softmax is too coarse for gates), float64 stays float64
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top_k = effective_top_k(top_k, logits.shape[-1])
    if top_k is None:
        return probs, probs
    values, index = probs.topk(top_k, dim=-1)
    values = values / values.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, index, values)
    return gates, probs


def router_statistics(
    logits: torch.Tensor, probs: torch.Tensor, top_k: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unweighted Switch aux loss, unweighted z-loss, load per expert) over all tokens of a forward."""
    num_experts = logits.shape[-1]
    flat_probs = probs.reshape(-1, num_experts)
    flat_logits = logits.reshape(-1, num_experts).to(flat_probs.dtype)
    k = effective_top_k(top_k, num_experts) or 1
    selected = flat_probs.detach().topk(k, dim=-1).indices
    counts = torch.zeros(num_experts, dtype=flat_probs.dtype, device=logits.device)
    counts.scatter_add_(0, selected.reshape(-1), torch.ones_like(selected.reshape(-1), dtype=counts.dtype))
    load = counts / max(selected.numel(), 1)
    aux = num_experts * (load * flat_probs.mean(dim=0)).sum()
    z_loss = torch.logsumexp(flat_logits, dim=-1).pow(2).mean()
    return aux, z_loss, load


class RouterLosses(NamedTuple):
    """Router losses of the last forward, already weighted by their coefficients.

    loss: aux_loss + z_loss, a scalar to add to the task loss. load: per-layer fraction of token slots
    sent to each expert (detached), keyed by module name, for logging.
    """

    loss: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    load: dict[str, torch.Tensor]


def collect_router_losses(model: nn.Module) -> RouterLosses:
    """Sum (and clear) the weighted router losses of every MoE-LoRA layer's last training forward.

    Layers record statistics only in training mode with gradients enabled and only when they have more
    than one expert; a model with none returns zeros on the device of its first parameter.
    """
    from .layer import MoELoRALinear  # layer.py imports this module's gate math at its top: a cycle

    aux_terms: list[torch.Tensor] = []
    z_terms: list[torch.Tensor] = []
    load: dict[str, torch.Tensor] = {}
    device = torch.device("cpu")
    for name, module in model.named_modules():
        if not isinstance(module, MoELoRALinear):
            continue
        device = module.lora_shape.device
        stats = module.pop_router_stats()
        if stats is None:
            continue
        aux_terms.append(stats["aux_loss"])
        z_terms.append(stats["z_loss"])
        load[name] = stats["load"]
    zero = torch.zeros((), device=device)
    aux = torch.stack(aux_terms).sum() if aux_terms else zero
    z_loss = torch.stack(z_terms).sum() if z_terms else zero.clone()
    return RouterLosses(loss=aux + z_loss, aux_loss=aux, z_loss=z_loss, load=load)
