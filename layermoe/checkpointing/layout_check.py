"""Check that a checkpoint's MoE-LoRA layout is present and consistent before any weight is loaded.

Why: each ``MoELoRALinear`` re-allocates itself from the ``lora_shape`` buffer of the incoming
state_dict, so a rewired model loads into a model built from the original config. If ``lora_shape``
is missing (a checkpoint edited by hand, or written by other code) or disagrees with the tensors
(corruption), torch reports dozens of "size mismatch" lines that do not say what is wrong. This
check names the layer, what the layout says and what the tensors say, and how to get out of it.
Call it where the raw checkpoint is available before ``load_state_dict``:
``LightningModule.on_load_checkpoint`` (covers ``Trainer.fit(ckpt_path=...)`` and
``load_from_checkpoint``) or ``AtomicCheckpointIO.load_checkpoint`` (Trainer paths).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from layermoe.adapters import split_block_name
from layermoe.layout import LAYOUT_KEY, normalize_layout

from ..messages import listed_lines

_MAX_LISTED = 6


class CheckpointLayoutError(ValueError):
    """A checkpoint's MoE-LoRA layout is missing or does not match its adapter tensors."""


def _shape(value: Any) -> tuple[int, ...] | None:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _layer_problems(prefix: str, state: Mapping[str, Any]) -> tuple[list[str], tuple[int, int] | None]:
    shape_tensor = state.get(prefix + "lora_shape")
    if shape_tensor is None:
        return [f"{prefix}lora_shape is missing (the layer's [experts, rank])"], None
    values = torch.as_tensor(shape_tensor).reshape(-1).tolist()
    if len(values) != 2 or any(int(v) != v for v in values) or values[0] < 0 or values[1] < 1:
        return [f"{prefix}lora_shape is {values}, not [experts >= 0, rank >= 1]"], None
    experts, rank = int(values[0]), int(values[1])
    problems = []
    a_shape, b_shape = _shape(state.get(prefix + "lora_A")), _shape(state.get(prefix + "lora_B"))
    if experts == 0:  # a layer without adapter holds no factors
        if a_shape is not None or b_shape is not None:
            problems.append(f"{prefix}lora_shape says 0 experts but the checkpoint holds lora_A/lora_B")
    else:
        if a_shape is None or len(a_shape) != 2 or a_shape[0] != experts * rank:
            problems.append(f"{prefix}lora_shape says [{experts}, {rank}] but lora_A has shape {a_shape}")
        if b_shape is None or len(b_shape) != 2 or b_shape[1] != experts * rank:
            problems.append(f"{prefix}lora_shape says [{experts}, {rank}] but lora_B has shape {b_shape}")
    router_w, router_b = (
        _shape(state.get(prefix + "lora_router_weight")),
        _shape(state.get(prefix + "lora_router_bias")),
    )
    if experts > 1 and (router_w is None or router_w[0] != experts or router_b != (experts,)):
        problems.append(
            f"{prefix}lora_shape says {experts} experts but the router has shapes {router_w} / {router_b}"
        )
    if experts <= 1 and (router_w is not None or router_b is not None):
        problems.append(f"{prefix}lora_shape says {experts} experts but the checkpoint holds a router")
    mass = _shape(state.get(prefix + "lora_routing_mass"))
    if mass is not None and mass != (experts,):
        problems.append(f"{prefix}lora_shape says {experts} experts but lora_routing_mass has shape {mass}")
    return problems, (experts, rank)


def validate_checkpoint_layout(checkpoint: Mapping[str, Any], state_key: str = "state_dict") -> None:
    """Raise ``CheckpointLayoutError`` unless every adapter layer's layout is present and consistent.

    ``checkpoint`` is a loaded Lightning checkpoint (or a dict holding a state_dict under
    ``state_key``). A checkpoint without MoE-LoRA tensors passes. When the checkpoint also holds the
    per-block layout (``layermoe_layout``), each layer's ``lora_shape`` must agree with its block.
    """
    state = checkpoint.get(state_key)
    if not isinstance(state, Mapping):
        return
    # lora_shape as well: a layer with 0 experts has no lora_A
    prefixes = sorted(
        {k[: -len(suffix)] for k in state for suffix in ("lora_A", "lora_shape") if k.endswith("." + suffix)}
    )
    if not prefixes:
        return
    problems: list[str] = []
    per_block: dict[int, set[tuple[int, int]]] = {}
    for prefix in prefixes:
        found, shape = _layer_problems(prefix, state)
        problems.extend(found)
        block = _block_of(prefix)
        if shape is not None and block is not None:
            per_block.setdefault(block, set()).add(shape)
    for block, shapes in sorted(per_block.items()):
        if len(shapes) > 1:
            problems.append(f"block {block} has layers with different [experts, rank]: {sorted(shapes)}")
    saved_layout = checkpoint.get(LAYOUT_KEY)
    if saved_layout is not None:
        problems.extend(_compare_with_saved_layout(saved_layout, per_block))
    if problems:
        raise CheckpointLayoutError(
            "The checkpoint's MoE-LoRA layout is missing or corrupt, so the adapters cannot be rebuilt at"
            f" the size they were saved with:\n  {listed_lines(problems, _MAX_LISTED)}\n"
            "Resume from another checkpoint (e.g. an earlier step=*.ckpt), or re-save this one from a"
            " model that loaded it (every MoELoRALinear stores its [experts, rank] in 'lora_shape')."
        )


def _block_of(prefix: str) -> int | None:
    parts = split_block_name(prefix.rstrip("."))
    return None if parts is None else parts[1]


def _compare_with_saved_layout(saved: Any, per_block: dict[int, set[tuple[int, int]]]) -> list[str]:
    try:
        layout = normalize_layout(saved)
    except ValueError as err:
        return [f"{LAYOUT_KEY} is malformed: {err}"]
    problems = []
    for block, spec in layout.items():
        expected = (spec["experts"], spec["rank"])
        shapes = per_block.get(block)
        if shapes is not None and shapes != {expected}:
            problems.append(
                f"{LAYOUT_KEY} says block {block} is [{expected[0]}, {expected[1]}] but its layers'"
                f" lora_shape say {sorted(shapes)}"
            )
    return problems
