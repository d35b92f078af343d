"""Layouts on a live model: `layout` reads the plain-data per-block capacity of an adapted model and
`apply_layout` resizes every layer to one, all-or-nothing: every layer's new tensors are planned before
any layer changes. The format itself (`Layout`, `normalize_layout`) lives in :mod:`layermoe.layout`.
experts = 0 is a block without adapter (its layers stay wrapped, with no parameters); rank >= 1 always.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from layermoe.layout import Layout, normalize_layout

from .batched_resize import plan_group
from .inject import moe_layers, named_moe_layers, split_block_name
from .resize import ResizeReport, install_state, plan_resize, single_thread, state_map
from .surgery import layer_generator


def layout(model: nn.Module) -> Layout:
    """Current experts and rank of every adapted block; errors if a block's modules disagree."""
    out: Layout = {}
    for block, layers in moe_layers(model).items():
        shapes = {(layer.experts, layer.rank) for layer in layers.values()}
        if len(shapes) != 1:
            raise ValueError(f"block {block} has modules with different (experts, rank): {sorted(shapes)}")
        experts, rank = shapes.pop()
        out[block] = {"experts": experts, "rank": rank}
    return out


def _mass_for(routing_mass: Mapping[Any, torch.Tensor] | None, name: str, block: int) -> torch.Tensor | None:
    if routing_mass is None:
        return None
    if name in routing_mass:
        return routing_mass[name]
    return routing_mass.get(block)


def apply_layout(
    model: nn.Module,
    new_layout: Mapping[Any, Any],
    routing_mass: Mapping[Any, torch.Tensor] | None = None,
    probes: Mapping[str, torch.Tensor] | None = None,
    batched: bool = True,
) -> list[ResizeReport]:
    """Resize every adapted block to `new_layout`; returns one report per changed layer.

    routing_mass: optional per-layer (full module name) or per-block (int) expert masses overriding the
    layers' running averages. probes: optional layer inputs by full module name, to measure each
    layer's output change. Blocks absent from the layout are left as they are; a layout naming a block
    without adapters is an error. All layers are planned before any is changed. batched: plan layers
    with the same shapes and resize together (stacked tensor ops, the same result as planning each
    layer alone, which `batched=False` and any `probes` do).
    """
    target = normalize_layout(new_layout)
    layers = named_moe_layers(model)
    by_block: dict[int, list[str]] = {}
    for name in layers:
        parts = split_block_name(name)
        if parts is not None:
            by_block.setdefault(parts[1], []).append(name)
    unknown = sorted(set(target) - set(by_block))
    if unknown:
        raise ValueError(
            f"layout names blocks {unknown} that have no MoE-LoRA layers (adapted: {sorted(by_block)})"
        )
    plans = []
    with single_thread():
        plans = _plan_all(target, by_block, layers, routing_mass, probes, batched)
    for layer, state, _ in plans:
        install_state(layer, state)
    return [report for _, _, report in plans]


def _plan_all(
    target: Layout,
    by_block: dict[int, list[str]],
    layers: dict[str, Any],
    routing_mass: Mapping[Any, torch.Tensor] | None,
    probes: Mapping[str, torch.Tensor] | None,
    batched: bool,
) -> list[tuple[Any, Any, ResizeReport]]:
    if probes is not None or not batched:
        return _plan_each(target, by_block, layers, routing_mass, probes)
    # Layers with the same shapes and the same resize are planned together (one QR/SVD per group and
    # step); each layer's generator is seeded in the order plan_resize would seed it, so the result is
    # the per-layer plan's.
    groups: dict[tuple, list[tuple[str, Any, torch.Tensor | None, torch.Generator]]] = {}
    planned: dict[str, tuple[Any, Any, ResizeReport]] = {}
    for block, spec in target.items():
        for name in by_block[block]:
            layer = layers[name]
            if (layer.experts, layer.rank) == (spec["experts"], spec["rank"]):
                continue
            mass = _mass_for(routing_mass, name, block)
            if min(layer.experts, layer.rank, spec["experts"], spec["rank"]) < 1:
                # resizes to or from zero capacity are planned per layer (same generator order)
                state, report = plan_resize(layer, spec["experts"], spec["rank"], mass, None, name)
                planned[name] = (layer, state, report)
                continue
            generator = layer_generator(layer.lora_A.device)
            key = (
                layer.experts,
                layer.rank,
                spec["experts"],
                spec["rank"],
                layer.in_features,
                layer.out_features,
                layer.top_k,
                layer.lora_alpha,
                layer.lora_A.device,
                layer.lora_A.dtype,
            )
            groups.setdefault(key, []).append((name, layer, mass, generator))
    for (_, _, experts, rank, *_), members in groups.items():
        group_layers, masses, generators = ([m[i] for m in members] for i in (1, 2, 3))
        outcome = plan_group(group_layers, masses, generators, experts, rank)
        for i, (name, layer, _, _) in enumerate(members):
            state = outcome.states[i]
            report = ResizeReport(name, layer.experts, layer.rank, experts, rank)
            report.operations = list(outcome.operations)
            report.exact = outcome.exact[i]
            report.discarded_energy = outcome.discarded_energy[i]
            report.discarded_norm = outcome.discarded_norm[i]
            report.state_map = state_map(state, name)
            planned[name] = (layer, state, report)
    order = [name for block in target for name in by_block[block]]
    return [planned[name] for name in order if name in planned]


def _plan_each(
    target: Layout,
    by_block: dict[int, list[str]],
    layers: dict[str, Any],
    routing_mass: Mapping[Any, torch.Tensor] | None,
    probes: Mapping[str, torch.Tensor] | None,
) -> list[tuple[Any, Any, ResizeReport]]:
    plans = []
    for block, spec in target.items():
        for name in by_block[block]:
            layer = layers[name]
            if (layer.experts, layer.rank) == (spec["experts"], spec["rank"]):
                continue
            probe = None if probes is None else probes.get(name)
            state, report = plan_resize(
                layer, spec["experts"], spec["rank"], _mass_for(routing_mass, name, block), probe, name
            )
            plans.append((layer, state, report))
    return plans
