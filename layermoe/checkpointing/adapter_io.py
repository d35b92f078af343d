"""Adapter-only artifacts: the MoE-LoRA tensors (safetensors) plus layout and config (JSON).

Why: a Lightning checkpoint holds the whole base model, optimizer state and loop state; for sharing a
fine-tune only the adapters matter (kilobytes to megabytes). After rewires the adapters no longer have
the shapes of the config the run started from, so the artifact carries the current layout, and loading
injects adapters with exactly that layout into a fresh base model before copying the tensors.

Folder layout: ``layermoe_adapters.safetensors`` (every ``lora_*`` parameter and buffer of every
``MoELoRALinear``, and the whole state of every ``modules_to_save`` module, keyed by full name relative
to the saved module) and ``layermoe_adapters.json`` (format version, ``MoELoRAConfig.to_dict()`` with
per-block ``experts``/``rank`` equal to the layout, the layout, the list of adapted module names and of
``modules_to_save`` by full name, and, from format version 2 on, a SHA-256 of every tensor and of the
manifest itself: flipped bytes in either file are named on load instead of loading as huge values).
From version 3 on each layer also saves its own ``lora_layer_alpha`` (it differs from the config's
``lora_alpha`` after a rank change that kept the scaling); the config keeps the layers' shared
``config_lora_alpha``. Version 1 and 2 artifacts (no checksums / no per-layer alpha) still load, their
layers with the config's alpha; NaN/inf tensors are refused on save and on load.

A layout with one expert per block can also be exported to peft's format (``save_adapters(...,
peft=True)``), through the adapter package's exporter ``layermoe.adapters.export_peft``: there is one peft
writer in the code base.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from layermoe.adapters import (
    Layout,
    MoELoRAConfig,
    MoELoRALinear,
    base_info,
    export_peft,
    inject,
    layout,
    modules_to_save,
    named_moe_layers,
    normalize_layout,
    split_block_name,
)
from layermoe.adapters.inject import SAVED_MODULE_FLAG
from layermoe.adapters.layer import alpha_value
from layermoe.layout import is_adapter_key

from ..messages import listed
from .atomic_io import atomic_save_all
from .base_identity import base_fingerprint, base_identity, describe_source
from .integrity import content_digest, non_finite_tensors

WEIGHTS_NAME = "layermoe_adapters.safetensors"
CONFIG_NAME = "layermoe_adapters.json"
FORMAT = "layermoe-adapters"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: before checksums; 2: before per-layer alphas
CHECKSUMS = "checksums"
_SAVE_AGAIN = (
    "Copy the artifact again from its source, or save it again (save_adapters) from the run's checkpoint."
)
_TENSORS = (
    "lora_A",
    "lora_B",
    "lora_router_weight",
    "lora_router_bias",
    "lora_shape",
    "lora_routing_mass",
    "lora_layer_alpha",
)
#: saved from version 3 on; a layer of an older artifact loads with the config's alpha
_OPTIONAL_TENSORS = {"lora_layer_alpha": ()}
# Hyperparameters every layer must share with the saved config to receive its tensors (the alpha each
# layer was built with: its own current one travels as the lora_layer_alpha tensor).
_LAYER_FIELDS = {
    "top_k": "top_k",
    "lora_alpha": "config_lora_alpha",
    "lora_dropout": "lora_dropout_p",
    "router_aux_loss_coef": "router_aux_loss_coef",
    "router_z_loss_coef": "router_z_loss_coef",
    "router_init_std": "router_init_std",
    "routing_mass_decay": "routing_mass_decay",
}


class AdapterArtifactError(ValueError):
    """An adapter folder is missing, corrupt, or does not fit the model it is loaded onto."""


def _layers_or_raise(model: nn.Module) -> dict[str, MoELoRALinear]:
    layers = named_moe_layers(model)
    if not layers:
        raise AdapterArtifactError(
            f"{type(model).__name__} has no MoE-LoRA layers; call layermoe.adapters.inject(model, config)"
            " (or pass the adapted model, e.g. pl_module.model) before save_adapters."
        )
    return layers


def _shared_hyperparameters(layers: Mapping[str, MoELoRALinear]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field, attr in _LAYER_FIELDS.items():
        seen = {getattr(layer, attr) for layer in layers.values()}
        if len(seen) != 1:
            raise AdapterArtifactError(
                f"MoE-LoRA layers disagree on {field} ({sorted(seen, key=repr)}); pass config= to save_adapters."
            )
        values[field] = seen.pop()
    return values


def _config_dict(
    layers: Mapping[str, MoELoRALinear], current: Layout, config: MoELoRAConfig | None, saved: list[str]
) -> dict[str, Any]:
    if config is None:
        rest_names = sorted({split_block_name(name)[2] for name in layers})  # type: ignore[index]
        config = MoELoRAConfig(target_modules=rest_names, **_shared_hyperparameters(layers))
    data = config.to_dict()
    # Full names, so that loading keeps exactly these modules trainable.
    data["modules_to_save"] = saved or None
    # The layout, not the config the run started from, decides the shapes.
    data["experts"] = {str(b): spec["experts"] for b, spec in current.items()}
    data["rank"] = {str(b): spec["rank"] for b, spec in current.items()}
    return data


PEFT_SUBFOLDER = "peft"


def save_adapters(
    model: nn.Module,
    folder: str | Path,
    config: MoELoRAConfig | None = None,
    *,
    peft: bool = False,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write the adapters of ``model`` (the adapted transformers model) to ``folder``; returns it.

    ``config`` defaults to one rebuilt from the layers (their shared hyperparameters, and the adapted
    module names as targets). Each file is written atomically. ``peft=True`` also writes a standard
    peft LoRA folder to ``folder/peft`` through ``layermoe.adapters.export_peft`` (one expert per block
    only; it raises naming a block with more, before anything is written).
    """
    layers = _layers_or_raise(model)
    current = layout(model)
    if peft:
        many = {b: spec["experts"] for b, spec in current.items() if spec["experts"] > 1}
        if many:
            raise AdapterArtifactError(
                f"peft=True needs one expert per block, but blocks {sorted(many)} have {sorted(set(many.values()))};"
                " merge them first (apply_layout(model, {block: {'experts': 1, 'rank': r}})) or save without peft."
            )
    saved = modules_to_save(model)
    config_data = _config_dict(layers, current, config, sorted(saved))
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in sorted(layers.items()):
        for attr in _TENSORS:
            value = getattr(layer, attr)
            if value is not None:
                tensors[f"{name}.{attr}"] = value.detach().to("cpu").contiguous()
    for name, module in sorted(saved.items()):
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
    bad = non_finite_tensors(tensors)
    if bad:
        raise AdapterArtifactError(
            f"Refusing to save adapters to {folder}: {len(bad)} tensors hold NaN or infinity ({listed(bad, 6)}); the"
            " training diverged. Save from an earlier checkpoint, and lower the learning rate (model.lr)."
        )
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": config_data,
        "layout": {str(b): spec for b, spec in current.items()},
        "modules": sorted(layers),
        "modules_to_save": sorted(saved),
        "dtype": str(next(iter(layers.values())).adapter_placement()[1]).removeprefix("torch."),
        "base": base_identity(model, base_model_name_or_path),
    }
    manifest[CHECKSUMS] = {
        "algorithm": "sha256",
        "tensors": {key: content_digest(value) for key, value in tensors.items()},
        "manifest": content_digest(json.loads(json.dumps(manifest))),  # as it will read back
    }
    folder = Path(folder)
    text = json.dumps(manifest, indent=2, sort_keys=True)
    # both files staged before either replaces its predecessor: never new tensors with an old manifest
    atomic_save_all(
        [
            (tensors, folder / WEIGHTS_NAME, lambda obj, f: f.write(_safetensors_bytes(obj))),
            (text, folder / CONFIG_NAME, lambda obj, f: f.write(obj.encode())),
        ]
    )
    if peft:
        export_peft(model, folder / PEFT_SUBFOLDER, base_model_name_or_path)
    return folder


def _safetensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return save(tensors, metadata={"format": "pt", "producer": FORMAT})


def read_adapter_manifest(folder: str | Path) -> dict[str, Any]:
    """The validated JSON side of an adapter folder (config, layout with int keys, module names)."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise AdapterArtifactError(
            f"{folder} is not a layermoe adapter folder: it needs {CONFIG_NAME} and {WEIGHTS_NAME}"
            " (written by layermoe.checkpointing.save_adapters)."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterArtifactError(f"{path} is not valid JSON ({err}); the artifact is corrupt.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AdapterArtifactError(
            f"{path} has no 'format': {FORMAT!r}; it was not written by save_adapters."
        )
    if manifest.get("version") not in READABLE_VERSIONS:
        raise AdapterArtifactError(
            f"{path} has format version {manifest.get('version')!r}; this layermoe reads"
            f" {', '.join(map(str, READABLE_VERSIONS))}."
        )
    # the digest of the text as read; compared after the field checks, whose messages say more
    digest = content_digest({k: v for k, v in manifest.items() if k != CHECKSUMS})
    for key in ("config", "layout", "modules"):
        if key not in manifest:
            raise AdapterArtifactError(f"{path} lacks the {key!r} field; the artifact is corrupt.")
    try:
        manifest["layout"] = normalize_layout(manifest["layout"])
        manifest["config"] = MoELoRAConfig.from_dict(manifest["config"])
    except (ValueError, TypeError) as err:
        raise AdapterArtifactError(f"{path}: {err}") from err
    for name in manifest["modules"]:
        parts = split_block_name(name) if isinstance(name, str) else None
        if parts is None or parts[1] not in manifest["layout"]:
            raise AdapterArtifactError(f"{path}: module {name!r} is not in a block of the saved layout.")
    saved = manifest.setdefault("modules_to_save", [])  # absent in artifacts written before the field
    if not isinstance(saved, list) or not all(isinstance(n, str) and n for n in saved):
        raise AdapterArtifactError(
            f"{path}: 'modules_to_save' must be a list of module names, got {saved!r}."
        )
    if manifest["version"] >= 2:
        checksums = manifest.get(CHECKSUMS)
        if not isinstance(checksums, dict) or not isinstance(checksums.get("tensors"), dict):
            raise AdapterArtifactError(
                f"{path} lacks its {CHECKSUMS!r}; the artifact is corrupt. {_SAVE_AGAIN}"
            )
        if digest != checksums.get("manifest"):
            raise AdapterArtifactError(
                f"{path} does not match its checksum: its text changed after it was written (disk or copy"
                f" error, or an edit). {_SAVE_AGAIN}"
            )
    return manifest


def _check_tensor_content(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
    """The tensors are the ones saved (version 2 checksums) and hold no NaN/inf (every version)."""
    saved = manifest.get(CHECKSUMS, {}).get("tensors")
    if saved is not None:
        changed = sorted(k for k, v in tensors.items() if k in saved and content_digest(v) != saved[k])
        changed += sorted(set(saved) ^ set(tensors))
        if changed:
            raise AdapterArtifactError(
                f"{path} is corrupt: {len(changed)} tensors do not match their checksums ({listed(changed, 6)}); its"
                f" bytes changed after it was written (disk or copy error). {_SAVE_AGAIN}"
            )
    bad = non_finite_tensors(tensors)
    if bad:
        raise AdapterArtifactError(
            f"{path}: {len(bad)} tensors hold NaN or infinity ({listed(bad, 6)}); the artifact was saved from a"
            f" diverged run or is damaged. {_SAVE_AGAIN}"
        )


def _check_tensors(manifest: dict[str, Any], tensors: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Every saved tensor fits the layout and the base layer it will sit on, before anything changes."""
    expected_keys: set[str] = set()
    for name in manifest["modules"]:
        spec = manifest["layout"][split_block_name(name)[1]]  # type: ignore[index]
        experts, rank = spec["experts"], spec["rank"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterArtifactError(
                f"the adapters were saved for module {name!r}, which {type(model).__name__} does not have;"
                " load them onto the same base architecture (and the same object level, e.g. the HF model)."
            ) from None
        info = base_info(module.base_layer if isinstance(module, MoELoRALinear) else module)
        shapes = {"lora_shape": (2,), "lora_routing_mass": (experts,)}
        if experts > 0:  # a block without adapter saves only its shape
            shapes.update(
                {"lora_A": (experts * rank, info.in_features), "lora_B": (info.out_features, experts * rank)}
            )
        if experts > 1:
            shapes.update({"lora_router_weight": (experts, info.in_features), "lora_router_bias": (experts,)})
        optional = {f"{name}.{attr}" for attr in _OPTIONAL_TENSORS} if manifest["version"] < 3 else set()
        for attr, shape in {**shapes, **_OPTIONAL_TENSORS}.items():
            key = f"{name}.{attr}"
            expected_keys.add(key)
            if key in optional and key not in tensors:
                continue
            if key not in tensors:
                raise AdapterArtifactError(f"{WEIGHTS_NAME} lacks {key}; the artifact is corrupt.")
            if tuple(tensors[key].shape) != shape:
                raise AdapterArtifactError(
                    f"{key} has shape {tuple(tensors[key].shape)} but the layout ({experts} experts, rank"
                    f" {rank}) and the base layer need {shape}; the artifact does not fit this model."
                )
        alpha_key = f"{name}.lora_layer_alpha"
        if alpha_key in tensors and alpha_value(tensors[alpha_key]) is None:
            raise AdapterArtifactError(
                f"{alpha_key} is {tensors[alpha_key].tolist()!r}, not a finite number > 0; the artifact is corrupt."
            )
        if tensors[f"{name}.lora_shape"].tolist() != [experts, rank]:
            raise AdapterArtifactError(
                f"{name}.lora_shape is {tensors[f'{name}.lora_shape'].tolist()} but the saved layout says"
                f" [{experts}, {rank}]; the artifact is corrupt."
            )
    for name in manifest["modules_to_save"]:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise AdapterArtifactError(
                f"the adapters were saved with the trainable module {name!r} (modules_to_save), which"
                f" {type(model).__name__} does not have; load them onto the same architecture."
            ) from None
        for key, value in module.state_dict().items():
            full = f"{name}.{key}"
            expected_keys.add(full)
            if full not in tensors:
                raise AdapterArtifactError(f"{WEIGHTS_NAME} lacks {full}; the artifact is corrupt.")
            if tensors[full].shape != value.shape:
                raise AdapterArtifactError(
                    f"{full} has shape {tuple(tensors[full].shape)} but the model's module needs"
                    f" {tuple(value.shape)}; the artifact does not fit this model."
                )
    extra = sorted(set(tensors) - expected_keys)
    if extra:
        raise AdapterArtifactError(f"{WEIGHTS_NAME} holds tensors no saved module owns: {listed(extra, 5)}.")


def _check_existing_layers(
    layers: dict[str, MoELoRALinear], saved: list[str], manifest: dict[str, Any]
) -> None:
    if saved != sorted(manifest["modules_to_save"]):
        raise AdapterArtifactError(
            f"the model already has MoE-LoRA layers with modules_to_save {saved}, but the adapters were saved"
            f" with {sorted(manifest['modules_to_save'])}; load them onto the base model instead."
        )
    if sorted(layers) != sorted(manifest["modules"]):
        raise AdapterArtifactError(
            "the model already has MoE-LoRA layers, but not on the saved modules (only saved:"
            f" [{listed(sorted(set(manifest['modules']) - set(layers)), 3)}], only in model:"
            f" [{listed(sorted(set(layers) - set(manifest['modules'])), 3)}]); load onto the base model instead."
        )
    config: MoELoRAConfig = manifest["config"]
    for field, attr in _LAYER_FIELDS.items():
        for name, layer in layers.items():
            if getattr(layer, attr) != getattr(config, field):
                raise AdapterArtifactError(
                    f"{name} has {field}={getattr(layer, attr)!r} but the adapters were trained with"
                    f" {field}={getattr(config, field)!r}; load them onto the base model without adapters."
                )


def _check_base(manifest: dict[str, Any], model: nn.Module, folder: Path) -> None:
    saved = manifest.get("base")
    if not isinstance(saved, dict) or "fingerprint" not in saved:
        return  # written before base fingerprints existed
    current = base_fingerprint(model, manifest["modules_to_save"])
    if current != saved["fingerprint"]:
        raise AdapterArtifactError(
            f"the adapters in {folder} were trained on another base model: saved from"
            f" {describe_source(saved.get('source'))} with weight fingerprint {saved['fingerprint'][:12]},"
            f" but this model's fingerprint is {current[:12]} (another model, size, dtype or seed). Load"
            " them onto the base they were trained on, or pass allow_other_base=True to load them anyway."
        )


def load_adapters(model: nn.Module, folder: str | Path, *, allow_other_base: bool = False) -> Layout:
    """Put the adapters saved in ``folder`` onto ``model`` in place; returns the loaded layout.

    ``model`` is the base model (adapters are injected with the saved config and layout, everything
    else frozen) or a model already adapted on the same modules with the same hyperparameters (layers
    are resized to the saved layout). The base's weight fingerprint must match the one saved with the
    adapters unless ``allow_other_base=True``. All-or-nothing: on any error the model is left as it was.
    """
    manifest = read_adapter_manifest(folder)
    try:
        tensors = load_file(Path(folder) / WEIGHTS_NAME)
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise AdapterArtifactError(
            f"{Path(folder) / WEIGHTS_NAME} cannot be read ({err}); it is corrupt."
        ) from err
    _check_tensors(manifest, tensors, model)
    _check_tensor_content(manifest, tensors, Path(folder) / WEIGHTS_NAME)
    existing = named_moe_layers(model)
    if existing:
        _check_existing_layers(existing, sorted(modules_to_save(model)), manifest)
    if not allow_other_base:
        _check_base(manifest, model, Path(folder))
    originals = {name: model.get_submodule(name) for name in manifest["modules"]}
    snapshot = {
        name: {k: v.detach().clone() for k, v in layer.state_dict().items() if is_adapter_key(k)}
        for name, layer in existing.items()
    }
    saved_names = manifest["modules_to_save"]
    saved_before = {name: model.get_submodule(name).state_dict() for name in saved_names}
    saved_before = {n: {k: v.detach().clone() for k, v in state.items()} for n, state in saved_before.items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        if not existing:
            config_data = manifest["config"].to_dict()
            config_data["target_modules"] = "|".join(re.escape(n) for n in manifest["modules"])
            inject(model, MoELoRAConfig.from_dict(config_data))
            if sorted(named_moe_layers(model)) != sorted(manifest["modules"]):
                raise AdapterArtifactError(
                    "injecting the saved config did not wrap exactly the saved modules."
                )
        layers = named_moe_layers(model)
        for name, layer in layers.items():
            own = {
                key[len(name) + 1 :]: value for key, value in tensors.items() if key.startswith(name + ".")
            }
            own = {k: v for k, v in own.items() if "." not in k}
            missing, unexpected = layer.load_state_dict(own, strict=False)
            lora_missing = [k for k in missing if is_adapter_key(k)]
            if lora_missing or unexpected:
                raise AdapterArtifactError(f"{name}: missing {lora_missing}, unexpected {unexpected}.")
        for name in saved_names:
            module = model.get_submodule(name)
            module.load_state_dict({k: tensors[f"{name}.{k}"] for k in module.state_dict()})
    except BaseException:
        _rollback(model, originals, snapshot, flags, had_adapters=bool(existing))
        for name, state in saved_before.items():
            module = model.get_submodule(name)
            module.load_state_dict(state)
            if not existing and hasattr(module, SAVED_MODULE_FLAG):
                delattr(module, SAVED_MODULE_FLAG)
        raise
    return layout(model)


def _rollback(
    model: nn.Module,
    originals: dict[str, nn.Module],
    snapshot: dict[str, dict[str, torch.Tensor]],
    flags: dict[str, bool],
    had_adapters: bool,
) -> None:
    for name, module in originals.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module)
    if had_adapters:
        for name, state in snapshot.items():
            model.get_submodule(name).load_state_dict(state, strict=False)  # lora_shape resizes back first
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])
