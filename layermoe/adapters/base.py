"""What the adapter needs to know about the frozen layer it wraps: sizes, device and compute dtype.

Kept apart from the layer so the supported base types (nn.Linear, transformers' Conv1D, bitsandbytes'
Linear4bit / Linear8bitLt) are listed in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

try:  # bitsandbytes is a dependency, but keep the adapter importable if its native library is missing
    import bitsandbytes as _bnb

    _QUANTIZED_TYPES: tuple[type, ...] = (_bnb.nn.Linear4bit, _bnb.nn.Linear8bitLt)
    _FOUR_BIT_TYPES: tuple[type, ...] = (_bnb.nn.Linear4bit,)
except Exception:  # pragma: no cover - depends on the installation
    _QUANTIZED_TYPES = ()
    _FOUR_BIT_TYPES = ()


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D stores weight as (d_in, d_out); matched by name to avoid importing
    # transformers here (other Conv1D copies exist in user code and behave the same way).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx")


def is_supported_base(module: nn.Module) -> bool:
    """Whether `module` is a layer type `MoELoRALinear` can wrap."""
    return isinstance(module, nn.Linear) or _is_conv1d(module) or isinstance(module, _QUANTIZED_TYPES)


@dataclass(frozen=True)
class BaseInfo:
    """Sizes and placement of a base layer; `dtype` is the dtype the adapter's parameters use."""

    in_features: int
    out_features: int
    device: torch.device
    dtype: torch.dtype
    quantized: bool
    four_bit: bool
    fan_in_fan_out: bool


def keep_four_bit_base_differentiable(module: nn.Module) -> None:
    """Keep gradients flowing through a frozen bitsandbytes ``Linear4bit`` on CPUs with AVX512-BF16.

    There, bitsandbytes (0.50) repacks the weight into an inference-only layout at the layer's first
    forward in eval mode without grad (a validation pass), and from then on multiplies with a kernel that
    has no backward: every adapter below the layer silently trains on zero gradients afterwards, and layers
    whose output size is not a multiple of 32 fail outright. Turn the repacking off, and undo it if it has
    already happened. Other modules are left alone.
    """
    if not isinstance(module, _FOUR_BIT_TYPES):
        return
    module.support_avx512bf16_for_cpu = False
    state = getattr(module.weight, "quant_state", None)
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        # Packing rounded the block scales to bf16 and dropped their nesting; keep exactly those scales
        # (the weights the layer now computes with) rather than let the inverse quantize them once more.
        packed_scales = state.absmax
        state.original_nested = False
        module.weight.data, restored = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
        restored.absmax = packed_scales.T.reshape(-1).float().contiguous()
        restored.nested = False
        module.weight.quant_state = restored
        if getattr(module, "quant_state", None) is not None:
            module.quant_state = restored


def base_info(module: nn.Module) -> BaseInfo:
    """Describe a supported base layer; raises TypeError naming the type otherwise."""
    if not is_supported_base(module):
        raise TypeError(
            f"MoELoRALinear cannot wrap {type(module).__name__}; supported: nn.Linear, transformers Conv1D, "
            "bitsandbytes Linear4bit/Linear8bitLt. Remove it from target_modules."
        )
    weight = module.weight
    device = weight.device
    quantized = isinstance(module, _QUANTIZED_TYPES)
    if _is_conv1d(module):
        d_in, d_out, fan_in_fan_out = int(module.nx), int(module.nf), True
    else:
        d_in, d_out, fan_in_fan_out = int(module.in_features), int(module.out_features), False
    if quantized:
        # Quantized storage is not a compute dtype: use the layer's compute dtype on accelerators and
        # float32 on CPU, where low-precision matmuls are emulated and slow.
        compute = getattr(module, "compute_dtype", None)
        if device.type != "cpu" and isinstance(compute, torch.dtype) and compute.is_floating_point:
            dtype = compute
        else:
            dtype = torch.float32
    else:
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return BaseInfo(
        in_features=d_in,
        out_features=d_out,
        device=device,
        dtype=dtype,
        quantized=quantized,
        four_bit=isinstance(module, _FOUR_BIT_TYPES),
        fan_in_fan_out=fan_in_fan_out,
    )
