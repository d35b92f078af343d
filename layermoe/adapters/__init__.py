"""MoE-LoRA adapters: config, the routed LoRA layer, injection into HF models, layouts and resizing."""

from .base import BaseInfo, base_info, is_supported_base
from .config import DEFAULT_TARGET_MODULES, MoELoRAConfig
from .grow import GROW_INITS, gradient_directions, grow_layer, grow_model, plan_grow, weight_gradients
from .inject import (
    block_index,
    inject,
    modules_to_save,
    moe_layers,
    named_moe_layers,
    split_block_name,
)
from .layer import MoELoRALinear, lora_init_A
from .layout import Layout, apply_layout, layout, normalize_layout
from .peft_interop import export_peft, load_peft
from .resize import (
    ResizeReport,
    add_experts,
    grow_rank,
    plan_resize,
    remove_experts,
    resize_layer,
    rotate_to_singular_basis,
    scale_trailing_slots,
    shrink_rank,
    singular_basis_factors,
)
from .router import RouterLosses, collect_router_losses, compute_gates, router_statistics
from .surgery import LayerState, ParamMap, truncate_factors

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "BaseInfo",
    "LayerState",
    "Layout",
    "MoELoRAConfig",
    "MoELoRALinear",
    "ParamMap",
    "ResizeReport",
    "RouterLosses",
    "add_experts",
    "apply_layout",
    "base_info",
    "block_index",
    "collect_router_losses",
    "compute_gates",
    "export_peft",
    "GROW_INITS",
    "gradient_directions",
    "grow_layer",
    "grow_model",
    "plan_grow",
    "grow_rank",
    "weight_gradients",
    "inject",
    "modules_to_save",
    "is_supported_base",
    "layout",
    "load_peft",
    "lora_init_A",
    "moe_layers",
    "named_moe_layers",
    "normalize_layout",
    "plan_resize",
    "remove_experts",
    "resize_layer",
    "rotate_to_singular_basis",
    "scale_trailing_slots",
    "singular_basis_factors",
    "router_statistics",
    "shrink_rank",
    "split_block_name",
    "truncate_factors",
]
