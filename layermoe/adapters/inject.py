"""Put MoE-LoRA layers into a Hugging Face model in place and find them again, grouped by block.

A block is found from the first numbered component of a module's dotted name (`model.layers.3.`,
`transformer.h.3.`, `encoder.layer.3.`); the module name inside the block is the rest
(`self_attn.q_proj`). Blocks are the unit of capacity allocation, so a target outside any numbered block
is an error (or skipped, for the default target list, e.g. BERT's `pooler.dense`).
"""

from __future__ import annotations

import re
import warnings

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


SAVED_MODULE_FLAG = "_layermoe_module_to_save"
# Task heads transformers adds on top of a base model (sequence/token classification, QA): usually new and
# randomly initialized, so freezing them trains the adapters against a random head (the names peft adds to
# modules_to_save for its classification task types, plus QA's).
TASK_HEAD_NAMES = ("classifier", "score", "qa_outputs")


def _find_modules_to_save(
    model: nn.Module, config: MoELoRAConfig, targets: dict[int, dict[str, tuple[str, nn.Module]]]
) -> dict[str, nn.Module]:
    """The outermost modules named by `config.modules_to_save`; every entry must match, none may overlap
    an adapted layer (its base weights would become trainable under the adapter)."""
    if not config.modules_to_save:
        return {}
    target_names = [name for block in targets.values() for name, _ in block.values()]
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not name or not config.saves(name) or any(name.startswith(kept + ".") for kept in found):
            continue
        clash = next(
            (t for t in target_names if t == name or t.startswith(name + ".") or name.startswith(t + ".")),
            None,
        )
        if clash is not None:
            raise ValueError(
                f"MoELoRAConfig.modules_to_save names {name!r}, which overlaps the adapted layer {clash!r}; "
                "modules_to_save is for modules outside the adapted layers (task heads such as 'classifier')"
            )
        found[name] = module
    for entry in config.modules_to_save:
        if not any(n == entry or n.endswith("." + entry) for n in found):
            raise ValueError(
                f"MoELoRAConfig.modules_to_save entry {entry!r} matches no module of {type(model).__name__}; "
                "give the end of a module's dotted name, e.g. 'classifier' or 'lm_head'"
            )
    return found


def modules_to_save(model: nn.Module) -> dict[str, nn.Module]:
    """The modules that `inject` kept trainable through `MoELoRAConfig.modules_to_save`, by full name."""
    return {
        name: module for name, module in model.named_modules() if getattr(module, SAVED_MODULE_FLAG, False)
    }


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def inject(model: nn.Module, config: MoELoRAConfig) -> dict[int, dict[str, MoELoRALinear]]:
    """Wrap the config's target modules with `MoELoRALinear`, in place; freeze everything else except the
    config's `modules_to_save` (kept fully trainable).

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
    saved = _find_modules_to_save(model, config, targets)
    built: dict[int, dict[str, MoELoRALinear]] = {}
    swaps: list[tuple[str, MoELoRALinear]] = []
    for block in sorted(targets):
        experts, rank = config.experts_for(block), config.rank_for(block)
        for rest, (name, module) in sorted(targets[block].items()):
            layer = MoELoRALinear(module, experts=experts, rank=rank, **config.layer_settings())
            layer.train(module.training)  # a model in eval mode must not start dropping adapter inputs
            built.setdefault(block, {})[rest] = layer
            swaps.append((name, layer))
    for name, layer in swaps:
        _set_submodule(model, name, layer)
    # every 4-bit layer, targeted or not, carries the gradient of the adapters below it
    for module in model.modules():
        keep_four_bit_base_differentiable(module)
    for name, param in model.named_parameters():
        param.requires_grad_(is_adapter_key(name))
    for module in saved.values():
        setattr(module, SAVED_MODULE_FLAG, True)
        module.requires_grad_(True)
    _warn_frozen_task_heads(model, saved)
    return built


def _warn_frozen_task_heads(model: nn.Module, saved: dict[str, nn.Module]) -> None:
    """Warn about a task head that inject froze: unless it was trained before, it stays at its random init."""
    frozen = [
        name
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in TASK_HEAD_NAMES
        and not any(name == kept or name.startswith(kept + ".") for kept in saved)
        and any(True for _ in module.parameters())
    ]
    if frozen:
        warnings.warn(
            f"inject froze the task head {frozen[0]!r} of {type(model).__name__}: it will not train, so a head"
            " that was just created stays at its random initialization. Add it to"
            f" MoELoRAConfig.modules_to_save (e.g. modules_to_save=[{frozen[0].rpartition('.')[2]!r}]) to"
            " train it with the adapters; ignore this warning only if the head was already trained.",
            UserWarning,
            stacklevel=3,
        )


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
