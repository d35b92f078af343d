"""The identity of a frozen base model: a fingerprint of its weights, stored with adapters and checked on load.

Why: adapter-only checkpoints and adapter folders rebuild the base from a name or a config. A different
base (another model folder, another seed or size of a tiny model, another dtype) takes the adapters
without complaint and produces a silently different model. The fingerprint hashes every non-adapter
parameter and buffer's name, dtype and shape plus an evenly spaced sample of at most ``SAMPLE`` values
of each, so it is cheap (a few milliseconds for SmolLM2) and tells apart any two bases that differ in
architecture, dtype or weights (bases that differ in only a few unsampled values are not told apart).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from layermoe.adapters import modules_to_save
from layermoe.layout import is_adapter_key

SAMPLE = 1024
BASE_KEY = "layermoe_base"


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)
    stride = max(1, flat.numel() // SAMPLE)
    return flat[::stride][:SAMPLE].to("cpu").contiguous()


def base_fingerprint(model: nn.Module, trained_modules: Iterable[str] = ()) -> str:
    """SHA-256 over the names, dtypes, shapes and sampled values of ``model``'s frozen tensors: every
    tensor except adapters and those under ``trained_modules`` (``modules_to_save``, e.g. a new head)."""
    digest = hashlib.sha256()
    skipped = tuple(f"{name}." for name in trained_modules)
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        if is_adapter_key(name) or name.startswith(skipped) or tensor.device.type == "meta":
            continue
        # A wrapped layer keeps its base under ``base_layer``: adapted and plain bases hash alike.
        plain = name.replace(".base_layer.", ".")
        digest.update(f"{plain}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        sample = _sample(tensor)
        if sample.numel():
            digest.update(sample.view(torch.uint8).numpy())
    return digest.hexdigest()


def base_identity(model: nn.Module, source: Any = None) -> dict[str, Any]:
    """Plain data naming the base: where it came from (``source`` or the HF config's name) and the
    fingerprint of its frozen weights (trained ``modules_to_save`` excluded)."""
    if source is None:
        config = getattr(model, "config", None)
        source = getattr(config, "_name_or_path", None) or None
    return {"source": source, "fingerprint": base_fingerprint(model, modules_to_save(model))}


def describe_source(source: Any) -> str:
    return "an unnamed model" if source in (None, "") else repr(source)
