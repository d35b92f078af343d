"""Put MoE-LoRA layers into a Hugging Face model in place and find them again, grouped by block.

A block is found from the first numbered component of a module's dotted name (`model.layers.3.`,
`transformer.h.3.`, `encoder.layer.3.`); the module name inside the block is the rest
(`self_attn.q_proj`). Blocks are the unit of capacity allocation, so a target outside any numbered block
is an error (or skipped, for the default target list, e.g. BERT's `pooler.dense`).
"""

from __future__ import annotations

import re

from torch import nn

from layermoe.layout import is_adapter_key

from .base import is_supported_base, keep_four_bit_base_differentiable
from .config import DEFAULT_TARGET_MODULES, MoELoRAConfig
from .layer import MoELoRALinear

_FIRST_NUMBER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def split_block_name(name: str) -> tuple[str, int, str] | None:
    """('model.layers', 3, 'self_attn.q_proj') for 'model.layers.3.self_attn.q_proj', None if unnumbered.

    Uses the first numbered component, so nested numbered containers inside a block stay in the module
    name.
    """
    match = _FIRST_NUMBER.search(name)
    if match is None:
        return None
    start, end = match.span(1)
    prefix = name[: start - 1] if start > 0 else ""
    rest = name[end + 1 :] if end < len(name) else ""
    if not prefix or not rest:
        return None
    return prefix, int(match.group(1)), rest


def block_index(name: str) -> int:
    """Block index of a module name; ValueError naming the module if it is not inside a numbered block."""
    parts = split_block_name(name)
    if parts is None:
        raise ValueError(
            f"module {name!r} is not inside a numbered transformer block (like 'model.layers.3.'); "
            "remove it from MoELoRAConfig.target_modules"
        )
    return parts[1]


def _uses_default_targets(config: MoELoRAConfig) -> bool:
    return isinstance(config.target_modules, list) and config.target_modules == list(DEFAULT_TARGET_MODULES)


def _find_targets(model: nn.Module, config: MoELoRAConfig) -> dict[int, dict[str, tuple[str, nn.Module]]]:
    skip_default = _uses_default_targets(config)
    found: dict[int, dict[str, tuple[str, nn.Module]]] = {}
    prefixes: dict[int, str] = {}
    for name, module in model.named_modules():
        if not name or not config.matches(name):
            continue
        if not is_supported_base(module):
            if skip_default:
                continue
            raise TypeError(
                f"target module {name!r} is a {type(module).__name__}, not a linear layer; supported: "
                "nn.Linear, transformers Conv1D, bitsandbytes Linear4bit/Linear8bitLt. Fix "
                "MoELoRAConfig.target_modules"
            )
        parts = split_block_name(name)
        if parts is None:
            if skip_default:
                continue
            block_index(name)  # raises the clear error
        prefix, block, rest = parts
        if prefixes.setdefault(block, prefix) != prefix:
            raise ValueError(
                f"block index {block} appears under both {prefixes[block]!r} and {prefix!r} (e.g. encoder and "
                "decoder stacks); restrict MoELoRAConfig.target_modules to one stack"
            )
        found.setdefault(block, {})[rest] = (name, module)
    return found


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: MoELoRAConfig) -> dict[int, dict[str, MoELoRALinear]]:
    """Wrap the config's target modules with `MoELoRALinear`, in place; freeze everything else.

    Returns the new layers grouped by block index, module names relative to the block. Every layer is
    built before any is swapped in, so a bad config leaves the model untouched.
    """
    if not isinstance(config, MoELoRAConfig):
        raise TypeError(f"inject needs a MoELoRAConfig, got {type(config).__name__}")
    if any(isinstance(m, MoELoRALinear) for m in model.modules()):
        raise ValueError("model already has MoE-LoRA layers; use apply_layout to change their capacity")
    targets = _find_targets(model, config)
    if not targets:
        raise ValueError(
            f"no module of {type(model).__name__} matches MoELoRAConfig.target_modules={config.target_modules!r}"
        )
    built: dict[int, dict[str, MoELoRALinear]] = {}
    swaps: list[tuple[str, MoELoRALinear]] = []
    for block in sorted(targets):
        experts, rank = config.experts_for(block), config.rank_for(block)
        for rest, (name, module) in sorted(targets[block].items()):
            layer = MoELoRALinear(
                module,
                experts=experts,
                rank=rank,
                top_k=config.top_k,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                router_aux_loss_coef=config.router_aux_loss_coef,
                router_z_loss_coef=config.router_z_loss_coef,
                router_init_std=config.router_init_std,
                routing_mass_decay=config.routing_mass_decay,
            )
            built.setdefault(block, {})[rest] = layer
            swaps.append((name, layer))
    for name, layer in swaps:
        _set_submodule(model, name, layer)
    # every 4-bit layer, targeted or not, carries the gradient of the adapters below it
    for module in model.modules():
        keep_four_bit_base_differentiable(module)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_key(name))
    return built


def named_moe_layers(model: nn.Module) -> dict[str, MoELoRALinear]:
    """Every MoE-LoRA layer of the model by its full module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoELoRALinear)}


def moe_layers(model: nn.Module) -> dict[int, dict[str, MoELoRALinear]]:
    """The MoE-LoRA layers of an adapted model grouped by block index (module names relative to it)."""
    grouped: dict[int, dict[str, MoELoRALinear]] = {}
    for name, layer in named_moe_layers(model).items():
        parts = split_block_name(name)
        if parts is None:
            block_index(name)
        _, block, rest = parts
        grouped.setdefault(block, {})[rest] = layer
    return dict(sorted(grouped.items()))
