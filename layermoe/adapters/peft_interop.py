"""Exchange adapters with peft: export one-expert blocks as a standard LoRA folder, import LoRA into experts.

Export writes what `PeftModel.save_pretrained` writes (adapter_config.json + adapter_model.safetensors,
keys `base_model.model.<module>.lora_A.weight`), with per-module ranks in `rank_pattern`, so
`PeftModel.from_pretrained(base, folder)` reproduces our outputs; a layer whose own alpha differs from
the config's (a rank change that kept its scaling) is written to `alpha_pattern`. Import copies a LoRA's
(A, B) into every expert of the matching layer, whose own alpha becomes what gives it the LoRA's scaling
(``lora_alpha`` / r, or / sqrt(r) under rsLoRA, with ``alpha_pattern`` and ``rank_pattern`` read per
module), so B is copied unchanged and an export -> import round trip keeps every alpha. Import resets
the router to uniform gates and breaks the symmetry between the identical experts with a zero-sum
perturbation of their A rows, which leaves the output unchanged under dense routing.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import base_info, is_supported_base
from .config import MoELoRAConfig
from .inject import SAVED_MODULE_FLAG, inject, modules_to_save, named_moe_layers, split_block_name
from .layer import MoELoRALinear, lora_init_A
from .layout import apply_layout, layout
from .resize import ResizeReport
from .surgery import SPLIT_PERTURBATION

_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


def export_peft(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of a model with one expert per block as a peft LoRA adapter folder.

    Blocks with 0 experts are left out (not in `target_modules` / `rank_pattern`).

    Raises ValueError naming the first block with more than one expert (merge them first with
    `apply_layout(model, {b: {"experts": 1, "rank": r}})`).
    """
    from peft import LoraConfig

    layers = named_moe_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no MoE-LoRA layers; call inject first")
    # a block without adapter is simply not a peft target (and not in rank_pattern)
    layers = {name: layer for name, layer in layers.items() if layer.has_adapter}
    if not layers:
        raise ValueError("export_peft: every block has 0 experts; there is no adapter to export")
    for block, spec in layout(model).items():
        if spec["experts"] > 1:
            raise ValueError(
                f"export_peft: block {block} has {spec['experts']} experts; peft LoRA has one. "
                f"Merge first: apply_layout(model, {{{block}: {{'experts': 1, 'rank': {spec['rank']}}}}})"
            )
    fan_in_fan_out = {layer.info.fan_in_fan_out for layer in layers.values()}
    if len(fan_in_fan_out) != 1:
        raise ValueError(
            "export_peft: the model mixes Conv1D and Linear targets; peft needs one fan_in_fan_out"
        )
    saved = modules_to_save(model)
    dropouts = {layer.lora_dropout_p for layer in layers.values()}
    ranks = Counter(layer.rank for layer in layers.values())
    # the config's alpha where the layers share one (those whose own alpha moved go to alpha_pattern)
    configured = Counter(layer.config_lora_alpha for layer in layers.values())
    default_rank, default_alpha = ranks.most_common(1)[0][0], configured.most_common(1)[0][0]
    config = LoraConfig(
        r=default_rank,
        lora_alpha=default_alpha,
        target_modules=sorted(layers),
        rank_pattern={re.escape(n): layer.rank for n, layer in layers.items() if layer.rank != default_rank},
        alpha_pattern={
            re.escape(n): layer.lora_alpha for n, layer in layers.items() if layer.lora_alpha != default_alpha
        },
        lora_dropout=max(dropouts),
        fan_in_fan_out=fan_in_fan_out.pop(),
        bias="none",
        modules_to_save=sorted(saved) or None,
    )
    config.base_model_name_or_path = base_model_name_or_path
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().cpu().contiguous()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().cpu().contiguous()
    for name, module in saved.items():  # peft stores a saved module's whole state under its plain name
        for key, value in module.state_dict().items():
            tensors[f"{_PREFIX}{name}.{key}"] = value.detach().cpu().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    # peft's rule (utils.other.get_pattern_key): first key k with re.match(rf"(.*\.)?({k})$", name)
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_peft(
    source: str | Path,
) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    folder = Path(source)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"load_peft: {config_path} not found; give a peft adapter folder")
    config = json.loads(config_path.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"load_peft: adapter is {config.get('peft_type')}, only LORA is supported")
    if config.get("use_dora"):
        raise ValueError("load_peft: DoRA adapters are not supported (use_dora=true)")
    weights_path = folder / "adapter_model.safetensors"
    if weights_path.is_file():
        raw = load_file(str(weights_path))
    elif (folder / "adapter_model.bin").is_file():
        raw = torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"load_peft: no adapter_model.safetensors or adapter_model.bin in {folder}")
    factors: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        match = _KEY.match(key)
        if match is None:
            others[key.removeprefix(_PREFIX)] = tensor
            continue
        factors.setdefault(match.group("module"), {})[match.group("which")] = tensor
    return config, factors, others


def _saved_module_states(
    model: nn.Module, config: dict[str, Any], others: dict[str, torch.Tensor]
) -> dict[str, dict[str, torch.Tensor]]:
    """The peft ``modules_to_save`` tensors by module of ``model``; every other non-LoRA tensor is an error."""
    entries = config.get("modules_to_save") or []
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if not name or not any(name == e or name.endswith("." + e) for e in entries):
            continue
        if any(name.startswith(kept + ".") for kept in states):
            continue
        own = {key[len(name) + 1 :]: value for key, value in others.items() if key.startswith(name + ".")}
        if own:
            expected = module.state_dict()
            if set(own) != set(expected) or any(own[k].shape != expected[k].shape for k in own):
                raise ValueError(
                    f"load_peft: the saved module {name!r} (modules_to_save) does not fit this model's module"
                )
            states[name] = own
    leftover = sorted(k for k in others if not any(k.startswith(n + ".") for n in states))
    if leftover:
        raise ValueError(
            f"load_peft: unsupported tensor {leftover[0]!r} (only lora_A/lora_B weights and the modules_to_save "
            "of the adapter config are imported)"
        )
    return states


def load_peft(model: nn.Module, source: str | Path, seed: int | None = 0) -> list[ResizeReport]:
    """Initialize every expert of the matching layers from a peft LoRA adapter folder, in place.

    Each block's rank becomes the largest LoRA rank among its modules (smaller LoRAs are zero-padded:
    the extra B columns are zero). All experts get the LoRA's delta, the router is reset to uniform
    gates, and a zero-sum perturbation of the experts' A rows breaks their symmetry (exact under dense
    routing). Each covered layer's own alpha becomes what gives it the LoRA's scaling (its
    ``alpha_pattern`` entry included), so B is copied as it is. Blocks with 0 experts that it covers get
    one. Layers the adapter does not cover keep their parameters. The adapter's ``modules_to_save`` are
    copied into the model's modules of those names, which stay trainable. Returns the resize reports.

    A model without MoE-LoRA layers (a bare base, as ``peft.PeftModel.from_pretrained`` takes it) is first
    injected with one expert on exactly the adapter's modules, with its ``lora_alpha`` and ``lora_dropout``;
    its outputs then equal peft's. Everything is validated before the model changes.
    """
    config, factors, others = _read_peft(source)
    saved_states = _saved_module_states(model, config, others)
    layers = named_moe_layers(model)
    bare = not layers
    dims = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
    if bare:
        dims = _base_dims(model, factors)
    alpha, r_default = float(config.get("lora_alpha", 8)), int(config.get("r", 8))
    rslora = bool(config.get("use_rslora", False))
    plan: dict[str, tuple[torch.Tensor, torch.Tensor, float, float]] = {}
    block_rank: dict[int, int] = {}
    for module, pair in factors.items():
        if set(pair) != {"A", "B"}:
            raise ValueError(f"load_peft: module {module!r} lacks lora_{'A' if 'A' not in pair else 'B'}")
        if module not in dims:
            raise ValueError(
                f"load_peft: adapter module {module!r} is not a linear layer of this model"
                if bare
                else f"load_peft: adapter module {module!r} is not an MoE-LoRA layer of this model; "
                "inject with target_modules covering it"
            )
        A, B = pair["A"], pair["B"]
        d_in, d_out = dims[module]
        rank = A.shape[0]
        if A.shape != (rank, d_in) or B.shape != (d_out, rank):
            raise ValueError(
                f"load_peft: {module} lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit "
                f"d_in={d_in}, d_out={d_out}"
            )
        expected_rank = int(_pattern_value(config.get("rank_pattern") or {}, module, r_default))
        if expected_rank != rank:
            raise ValueError(f"load_peft: {module} has rank {rank} but the config says {expected_rank}")
        module_alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha))
        if not (math.isfinite(module_alpha) and module_alpha > 0):
            raise ValueError(
                f"load_peft: {module} has lora_alpha {module_alpha!r} (lora_alpha / alpha_pattern of the "
                "adapter config); it must be a finite number > 0"
            )
        # the LoRA's scaling is module_alpha / denominator
        plan[module] = (A, B, module_alpha, math.sqrt(rank) if rslora else rank)
        block = split_block_name(module)[1]
        block_rank[block] = max(block_rank.get(block, 1), rank)
    if bare and not plan:
        raise ValueError(f"load_peft: {source} holds no lora_A/lora_B weights to inject")
    if bare:
        inject(
            model,
            MoELoRAConfig(
                target_modules=sorted(plan),
                experts=1,
                rank=max(block_rank.values()),
                lora_alpha=alpha,
                lora_dropout=float(config.get("lora_dropout") or 0.0),
            ),
        )
        layers = named_moe_layers(model)
    current = layout(model)
    # a block without adapter that the LoRA covers gets one expert to hold it
    new_layout = {b: {"experts": max(current[b]["experts"], 1), "rank": r} for b, r in block_rank.items()}
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    reports = apply_layout(model, new_layout)
    with torch.no_grad():
        for module, (A, B, module_alpha, denominator) in plan.items():
            _fill_experts(layers[module], A, B, module_alpha * (layers[module].rank / denominator), generator)
    for name, state in saved_states.items():
        saved = model.get_submodule(name)
        saved.load_state_dict(state)
        saved.requires_grad_(True)
        setattr(saved, SAVED_MODULE_FLAG, True)
    return reports


def _base_dims(model: nn.Module, factors: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of each module of a bare model that the adapter covers and inject can wrap."""
    named = dict(model.named_modules())
    dims = {}
    for name in factors:
        module = named.get(name)
        if module is not None and is_supported_base(module):
            info = base_info(module)
            dims[name] = (info.in_features, info.out_features)
    return dims


def _fill_experts(
    layer: MoELoRALinear, A: torch.Tensor, B: torch.Tensor, alpha: float, generator: torch.Generator | None
) -> None:
    E, r, rank = layer.experts, layer.rank, A.shape[0]
    # the layer's own alpha gives it the LoRA's scaling (exactly the LoRA's alpha at equal ranks), so B
    # is copied as it was trained
    layer.lora_alpha = alpha
    A32, B32 = A.to(torch.float32), B.to(torch.float32)
    d_in = layer.in_features
    new_A = lora_init_A(E * r, d_in, device=torch.device("cpu"), dtype=torch.float32).reshape(E, r, d_in)
    new_B = torch.zeros(layer.out_features, E, r)
    new_A[:, :rank] = A32
    new_B[:, :, :rank] = B32.unsqueeze(1)
    if E > 1:
        noise = torch.randn(E, rank, d_in, generator=generator)
        noise = noise - noise.mean(dim=0, keepdim=True)
        rms = A32.pow(2).mean().sqrt()
        rms = rms if rms > 0 else torch.tensor(1.0 / math.sqrt(d_in))
        new_A[:, :rank] += SPLIT_PERTURBATION * rms * noise
        layer.lora_router_weight.zero_()
        layer.lora_router_bias.zero_()
        layer.lora_routing_mass.fill_(1.0 / E)
    target = layer.lora_A
    layer.lora_A.copy_(new_A.reshape(E * r, d_in).to(device=target.device, dtype=target.dtype))
    layer.lora_B.copy_(new_B.reshape(layer.out_features, E * r).to(device=target.device, dtype=target.dtype))
