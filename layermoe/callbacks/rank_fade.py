"""Gentle rank shrink: fade the directions a shrink will drop to zero over F optimizer steps, then drop them.

Cutting a rank at once truncates each expert's delta (its weakest singular directions go in one step),
which moves the model's output. With ``rank_fade_steps = F > 0`` a plan that lowers a block's rank is
applied in two parts:

1. at the rewire: every other change (experts, rank growth) as usual; the shrinking blocks keep their
   rank, and each expert's factors are rotated into the singular basis of its delta (exact), so the
   trailing rank slots hold the directions to drop. Their optimizer state is reset (the coordinates
   changed).
2. after each of the next F optimizer steps, the B columns of those slots are multiplied by
   (F - k) / (F - k + 1) (k = steps done): their contribution falls linearly to exactly zero at step F,
   while training adapts the rest of the adapter to their loss.
3. right after step F the layout's ranks are applied: the dropped slots contribute nothing, so the
   truncation discards nothing and the loss does not move (up to float rounding).

During the fade the parameter count is above the budget by the slots being faded; no new scoring is
started until the shrink is done. The fade's progress is in the callback's checkpointed state, so a
resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from layermoe.adapters import moe_layers, scale_trailing_slots, singular_basis_factors
from layermoe.layout import Layout


def shrinking_blocks(before: Layout, target: Layout) -> dict[int, dict[str, int]]:
    """Blocks whose rank goes down while they keep experts: ``{block: {experts, from_rank, to_rank}}``."""
    out = {}
    for block, spec in target.items():
        old = before.get(block)
        if old and old["experts"] > 0 and spec["experts"] > 0 and spec["rank"] < old["rank"]:
            out[block] = {"experts": spec["experts"], "from_rank": old["rank"], "to_rank": spec["rank"]}
    return out


def ranks_kept(target: Layout, shrinking: dict[int, dict[str, int]]) -> Layout:
    """The target layout with the shrinking blocks still at their old rank (part 1 of a gentle shrink)."""
    return {
        b: {"experts": spec["experts"], "rank": shrinking[b]["from_rank"] if b in shrinking else spec["rank"]}
        for b, spec in target.items()
    }


def ranks_only(before: Layout, shrinking: dict[int, dict[str, int]]) -> Layout:
    """Only the rank moves, applied to the current layout (to measure what they alone do)."""
    return {b: {"experts": before[b]["experts"], "rank": spec["to_rank"]} for b, spec in shrinking.items()}


Rotation = tuple[nn.Module, torch.Tensor, torch.Tensor]  # a layer and its rotated (lora_A, lora_B)


def fade_rotations(pl_module: nn.Module, shrinking: dict[int, dict[str, int]]) -> list[Rotation]:
    """The shrinking blocks' experts in their singular basis, computed without changing the model (a failure
    here leaves every layer as it was; under DDP the ranks agree before any applies: ``Rewiring.apply``)."""
    layers = moe_layers(pl_module)
    rotations = []
    for block in shrinking:
        for layer in layers[block].values():
            factors = singular_basis_factors(layer)
            if factors is not None:
                rotations.append((layer, *factors))
    return rotations


def start_fade(optimizers: list[Any], rotations: list[Rotation]) -> None:
    """Write the rotated factors (:func:`fade_rotations`); forget their optimizer state (new coordinates)."""
    with torch.no_grad():
        for layer, A, B in rotations:
            layer.lora_A.copy_(A)
            layer.lora_B.copy_(B)
            for optimizer in optimizers:
                for param in (layer.lora_A, layer.lora_B):
                    optimizer.state.pop(param, None)


def fade_step(pl_module: nn.Module, fade: dict[str, Any]) -> bool:
    """Count one optimizer step and scale the fading slots; True when they reached zero."""
    fade["done"] += 1
    remaining = fade["steps"] - fade["done"]
    factor = remaining / (remaining + 1)
    layers = moe_layers(pl_module)
    for block, spec in fade["blocks"].items():
        for layer in layers[block].values():
            scale_trailing_slots(layer, spec["to_rank"], factor)
    return remaining <= 0


def new_fade(
    shrinking: dict[int, dict[str, int]], steps: int, target: Layout, history_index: int
) -> dict[str, Any]:
    """The callback's ``fade`` state for a shrink that starts now (plain data: it is checkpointed)."""
    return {"blocks": shrinking, "steps": steps, "done": 0, "target": target, "history_index": history_index}
