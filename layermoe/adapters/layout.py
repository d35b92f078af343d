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

from .inject import moe_layers, named_moe_layers, split_block_name
from .resize import ResizeReport, install_state, plan_resize, plan_stack, single_thread
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
    keep_scaling: bool = False,
) -> list[ResizeReport]:
    """Resize every adapted block to `new_layout`; returns one report per changed layer.

    routing_mass: optional per-layer (full module name) or per-block (int) expert masses overriding the
    layers' running averages. probes: optional layer inputs by full module name, to measure each
    layer's output change. Blocks absent from the layout are left as they are; a layout naming a block
    without adapters is an error. All layers are planned before any is changed. batched: plan layers
    with the same shapes and resize as one stack (the same result as planning each layer alone, a
    stack of one, which `batched=False` and any `probes` do). keep_scaling: a layer whose rank changes
    r -> r' gets lora_alpha x r'/r, so its scaling (and the kept directions' Adam steps) stay as they
    were (`adapters.resize`); default False: the alpha stays and the scaling becomes alpha / r'.
    """
    target = normalize_layout(new_layout)
    layers, by_block = layers_by_block(model, target)
    plans = []
    with single_thread():
        plans = _plan_all(target, by_block, layers, routing_mass, probes, batched, keep_scaling)
    for layer, state, _ in plans:
        install_state(layer, state)
    return [report for _, _, report in plans]


def layers_by_block(model: nn.Module, target: Layout) -> tuple[dict[str, Any], dict[int, list[str]]]:
    """The model's MoE-LoRA layers by full name, and their names per block; raises if `target` names a
    block without adapted layers."""
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
    return layers, by_block


def _plan_all(
    target: Layout,
    by_block: dict[int, list[str]],
    layers: dict[str, Any],
    routing_mass: Mapping[Any, torch.Tensor] | None,
    probes: Mapping[str, torch.Tensor] | None,
    batched: bool,
    keep_scaling: bool,
) -> list[tuple[Any, Any, ResizeReport]]:
    # Layers with the same shapes and the same resize are planned as one stack (one QR/SVD per stack and
    # step); each layer's generator is seeded in layer order whatever stack it joins, so a layer's
    # result is the same as when it is planned alone.
    stacks: dict[tuple, list[tuple[str, Any, torch.Tensor | None, torch.Generator]]] = {}
    planned: dict[str, tuple[Any, Any, ResizeReport]] = {}
    for block, spec in target.items():
        for name in by_block[block]:
            layer = layers[name]
            if (layer.experts, layer.rank) == (spec["experts"], spec["rank"]):
                continue
            mass = _mass_for(routing_mass, name, block)
            if probes is not None or not batched:
                probe = None if probes is None else probes.get(name)
                state, report = plan_resize(
                    layer, spec["experts"], spec["rank"], mass, probe, name, keep_scaling
                )
                planned[name] = (layer, state, report)
                continue
            device, dtype = layer.adapter_placement()
            generator = layer_generator(device)
            key = (
                layer.experts,
                layer.rank,
                spec["experts"],
                spec["rank"],
                layer.in_features,
                layer.out_features,
                layer.top_k,
                layer.lora_alpha,
                device,
                dtype,
            )
            stacks.setdefault(key, []).append((name, layer, mass, generator))
    for (_, _, experts, rank, *_), members in stacks.items():
        names, stacked, masses, generators = zip(*members, strict=True)
        plans = plan_stack(stacked, masses, generators, experts, rank, names, keep_scaling)
        for name, layer, (state, report) in zip(names, stacked, plans, strict=True):
            planned[name] = (layer, state, report)
    order = [name for block in target for name in by_block[block]]
    return [planned[name] for name in order if name in planned]
