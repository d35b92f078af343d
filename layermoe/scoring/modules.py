"""Which layers a scoring pass looks at, and how to read a wrapped layer's frozen base weight."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layermoe.adapters import moe_layers


def scored_layers(
    model: nn.Module, modules: Sequence[str] | None = None, blocks: Sequence[int] | None = None
) -> dict[int, dict[str, nn.Module]]:
    """MoE-LoRA layers grouped by block, optionally only modules whose name contains one of `modules`
    and only the given `blocks`.

    `modules=["self_attn"]` selects the attention projections (what the LayerIF code scores at base
    scope). Blocks left without a selected module are dropped; selecting nothing at all is an error.
    """
    grouped = moe_layers(model)
    if not grouped:
        raise ValueError(
            "the model has no MoE-LoRA layers; call layermoe.adapters.inject(model, config) first"
        )
    if blocks is not None:
        missing = sorted(set(blocks) - set(grouped))
        if missing:
            raise ValueError(
                f"blocks={list(blocks)}: no MoE-LoRA layers in blocks {missing}; have {list(grouped)}"
            )
        grouped = {block: grouped[block] for block in sorted(set(blocks))}
    if modules is None:
        return grouped
    if isinstance(modules, str):
        modules = [modules]
    picked = {
        block: {name: layer for name, layer in layers.items() if any(key in name for key in modules)}
        for block, layers in grouped.items()
    }
    picked = {block: layers for block, layers in picked.items() if layers}
    if not picked:
        names = sorted({name for layers in grouped.values() for name in layers})
        raise ValueError(f"modules={list(modules)} matches no wrapped module; available: {names}")
    return picked


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The frozen base weight as a float tensor of shape (d_out, d_in), dequantized if needed."""
    base = layer.base_layer
    weight = base.weight
    info = layer.info
    if info.quantized:
        import bitsandbytes.functional as bnb_functional

        if info.four_bit:
            dense = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
        else:
            scb = getattr(weight, "SCB", None)
            if scb is None:
                scb = getattr(base.state, "SCB", None)
            if weight.dtype != torch.int8 or scb is None:
                dense = weight.data
            else:
                dense = bnb_functional.int8_vectorwise_dequant(weight.data, scb)
        dense = dense.reshape(info.out_features, info.in_features)
    else:
        dense = weight.detach()
        if info.fan_in_fan_out:
            dense = dense.T
    return dense.float() if dense.dtype in (torch.float16, torch.bfloat16) else dense
