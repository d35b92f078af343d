"""Per-sample gradients of one MoE-LoRA layer from its hooked activations and output gradients.

A linear map y_t = W a_t applied at every token t of a sample has d loss / d W = sum_t dy_t (x) a_t, so
the per-sample gradient is one batched einsum over tokens (the Opacus construction): no backward pass
per sample, and the batch backward never has to form parameter gradients at all.
"""

from __future__ import annotations

import torch


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., d) -> (B, tokens, d): every position between the batch and feature axes is a token."""
    return t.reshape(t.shape[0], -1, t.shape[-1])


def outer_sum(grad_out: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """(B, d_out, d_in) per-sample sum over tokens of grad_out_t (x) inputs_t."""
    g = _tokens(grad_out)
    a = _tokens(inputs).to(g.dtype)
    return torch.einsum("bto,bti->boi", g, a)


def adapter_pieces_from_output(layer: torch.nn.Module, saved: dict, grad_output: torch.Tensor) -> list:
    """Per-sample gradient of lora_B, (B, d_out, E*r), from d(output)."""
    hidden, _ = layer.gated_hidden(saved["expert_hidden"], saved["router_logits"])
    return [("lora_B", outer_sum(grad_output.to(hidden.dtype), hidden))]


def adapter_pieces_from_hidden(saved: dict, grad_hidden: torch.Tensor) -> list:
    """Per-sample gradient of lora_A, (B, E*r, d_in), from d(expert_hidden)."""
    return [("lora_A", outer_sum(grad_hidden, saved["lora_input"]))]


def adapter_pieces_from_logits(layer: torch.nn.Module, saved: dict, grad_logits: torch.Tensor) -> list:
    """Per-sample gradients of the router weight (B, E, d_in) and bias (B, E) from d(router_logits).

    The router reads x cast to the adapter dtype (before dropout), as in MoELoRALinear.forward.
    """
    router_input = saved["x"].to(layer.lora_A.dtype)
    grad = grad_logits.to(layer.lora_A.dtype)
    return [
        ("lora_router_weight", outer_sum(grad, router_input)),
        ("lora_router_bias", _tokens(grad).sum(dim=1)),
    ]


def base_piece_from_output(layer: torch.nn.Module, saved: dict, grad_output: torch.Tensor) -> list:
    """Per-sample gradient of the frozen base weight in its own layout: (B, d_out, d_in), or (B, d_in,
    d_out) for a GPT-2 Conv1D base (which stores the transpose)."""
    x = saved["x"]
    dtype = piece_dtype(layer, "base_layer.weight")
    grad = outer_sum(grad_output.to(dtype), x.to(dtype))
    if layer.info.fan_in_fan_out:
        grad = grad.transpose(1, 2)
    return [("base_layer.weight", grad)]


def piece_names(layer: torch.nn.Module, scope: str) -> list[str]:
    """Parameter names (relative to the layer) whose per-sample gradients a scope produces."""
    if scope == "base":
        return ["base_layer.weight"]
    names = ["lora_A", "lora_B"]
    if layer.lora_router_weight is not None:
        names += ["lora_router_weight", "lora_router_bias"]
    return names


def piece_numel(layer: torch.nn.Module, name: str) -> int:
    """Number of coordinates of a piece (for a quantized base weight: d_out * d_in)."""
    if name == "base_layer.weight":
        return layer.info.out_features * layer.info.in_features
    return getattr(layer, name).numel()


def piece_dtype(layer: torch.nn.Module, name: str) -> torch.dtype:
    """dtype of a piece's per-sample gradient: the adapter dtype, or at least float32 for a base weight."""
    if name == "base_layer.weight":
        return torch.promote_types(layer.info.dtype, torch.float32)
    return layer.lora_A.dtype
