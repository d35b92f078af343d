"""Scoring blocks that have no adapter: a temporary, function-preserving probe adapter.

Adapter-scope scores come from gradients of adapter parameters, which a block with 0 experts does not
have; without them such a block could never be scored, so never win capacity back. While scoring,
each such layer gets what a rewire would give it (one fresh expert at its rank: A LoRA-initialized, B
zero, so the model's outputs are unchanged) and loses it again afterwards. Its gradient is that of a
newly added adapter (only the B part is nonzero). The probe's A is drawn from its own seeded generator:
the training RNG is untouched, so exact resume is unaffected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .inject import named_moe_layers
from .layer import lora_init_A


@contextlib.contextmanager
def probe_empty_layers(model: nn.Module, seed: int = 0) -> Iterator[list[str]]:
    """Give every 0-expert layer one fresh expert for the duration; yields their full names."""
    empty = {name: layer for name, layer in sorted(named_moe_layers(model).items()) if not layer.has_adapter}
    generator = torch.Generator().manual_seed(seed)
    for layer in empty.values():
        device, dtype = layer.adapter_placement()
        A = lora_init_A(
            layer.rank,
            layer.in_features,
            device=torch.device("cpu"),
            dtype=torch.float32,
            generator=generator,
        )
        B = torch.zeros(layer.out_features, layer.rank)
        mass = torch.ones(1, device=device)
        layer.install(1, layer.rank, A.to(device, dtype), B.to(device, dtype), None, None, mass)
    try:
        yield list(empty)
    finally:
        for layer in empty.values():
            layer.install(
                0, layer.rank, None, None, None, None, torch.zeros(0, device=layer.lora_shape.device)
            )
