"""``LayerInfluenceCallback(inject=...)``: the config check, adding the adapters in ``setup``, and reloading.

Why a helper: ``LightningModule.load_from_checkpoint`` runs no callbacks, so the adapters that ``inject=``
added in ``setup`` would be missing and the adapter (and renamed base) weights would not load. The
checkpoint holds the injection config in the callback's state; this adds the adapters right after the
module's own ``configure_model`` and before the weights load, and the adapter layers resize themselves to
the rewired layout recorded in the weights (``lora_shape``). The config is found under ``INJECT_KEY``
(written by the callback's ``on_save_checkpoint``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from layermoe.adapters import MoELoRAConfig, inject, moe_layers
from layermoe.callbacks.errors import CallbackConfigError
from layermoe.callbacks.state import INJECT_KEY
from layermoe.checkpointing.integrity import CheckpointIntegrityError, read_verified_checkpoint

M = TypeVar("M", bound=LightningModule)


def checked_inject_config(config: Any) -> dict[str, Any] | None:
    """``inject=`` as a plain ``MoELoRAConfig`` dict (None: the module brings its own adapters)."""
    if config is None:
        return None
    if isinstance(config, MoELoRAConfig):
        return config.to_dict()
    if not isinstance(config, Mapping):
        raise CallbackConfigError(
            f"inject={config!r}: give a MoELoRAConfig dict, e.g. {{'experts': 4, 'rank': 8}}"
        )
    try:
        return MoELoRAConfig.from_dict(dict(config)).to_dict()
    except (TypeError, ValueError) as exc:
        raise CallbackConfigError(f"inject: {exc}") from exc


def inject_adapters(pl_module: LightningModule, config: dict[str, Any]) -> None:
    """Add the adapters of ``inject=`` (the callback's ``setup``, on a module that has none)."""
    try:
        inject(pl_module, MoELoRAConfig.from_dict(config))
    except ValueError as exc:
        raise CallbackConfigError(
            f"inject={config!r} could not adapt {type(pl_module).__name__}: {exc}. The model must "
            "exist when the callback's setup runs (build it in __init__, not in configure_model)"
        ) from exc
    # load_from_checkpoint runs no callbacks: say how to reload before anyone tries
    name = type(pl_module).__name__
    rank_zero_info(
        f"LayerInfluenceCallback added MoE-LoRA adapters to {name}; reload its checkpoints with "
        f"layermoe.callbacks.load_adapted_checkpoint({name}, path) ({name}.load_from_checkpoint runs no "
        "callbacks and fails on the adapter keys)"
    )


def injected_config(checkpoint: dict[str, Any], source: str | Path = "checkpoint") -> MoELoRAConfig | None:
    """The ``inject=`` config stored by a ``LayerInfluenceCallback`` in a loaded checkpoint dict, if any.

    Raises:
        CheckpointIntegrityError: the stored value is not a ``MoELoRAConfig`` dict (names the key and
            ``source``, the file).
    """
    if checkpoint.get(INJECT_KEY) is not None:
        return _stored_inject(checkpoint[INJECT_KEY], INJECT_KEY, source)
    # checkpoints written before INJECT_KEY existed keep it only in the callback's state, whose key is
    # Lightning's state_key (class name plus scorer and allocator)
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("LayerInfluenceCallback") and isinstance(state, dict) and state.get("inject"):
            return _stored_inject(state["inject"], f"callbacks[{key!r}]['inject']", source)
    return None


def _stored_inject(value: Any, where: str, source: str | Path) -> MoELoRAConfig:
    try:
        if not isinstance(value, Mapping):
            raise TypeError(f"a {type(value).__name__}, not a dict")
        return MoELoRAConfig.from_dict(dict(value))
    except (TypeError, ValueError) as exc:
        raise CheckpointIntegrityError(
            f"{source}: {where} is not a MoELoRAConfig dict ({exc}); the file was edited or damaged. "
            "Restore it from another copy, or load the weights without the adapters config."
        ) from exc


def load_adapted_checkpoint(module_cls: type[M], checkpoint_path: str | Path, **kwargs: Any) -> M:
    """``module_cls.load_from_checkpoint`` that first re-adds adapters injected by the callback.

    Args:
        module_cls: the LightningModule class the checkpoint was trained with.
        checkpoint_path: a ``.ckpt`` written by a ``Trainer`` that ran ``LayerInfluenceCallback(inject=...)``.
        **kwargs: passed to ``load_from_checkpoint`` (``map_location``, ``strict``, hparam overrides).

    Checkpoints whose module builds its own adapters load exactly as with ``load_from_checkpoint``. An
    empty, truncated or damaged file, a checksum mismatch or non-finite weights raise
    ``CheckpointIntegrityError`` naming the file (the checks ``--ckpt_path`` runs), before any module is built.
    """
    checkpoint = read_verified_checkpoint(checkpoint_path)
    moe_config = injected_config(checkpoint, checkpoint_path)
    if moe_config is None:
        return module_cls.load_from_checkpoint(checkpoint_path, **kwargs)

    class _Injecting(module_cls):  # type: ignore[valid-type, misc]
        def configure_model(self) -> None:
            super().configure_model()
            if not moe_layers(self):
                inject(self, moe_config)

    _Injecting.__name__ = module_cls.__name__
    _Injecting.__qualname__ = module_cls.__qualname__
    module = _Injecting.load_from_checkpoint(checkpoint_path, **kwargs)
    # _Injecting adds only the configure_model above (no state): the loaded module becomes a plain
    # module_cls again, so it pickles (ddp_spawn, torch.save), and type checks and later fits see the user's class
    module.__class__ = module_cls
    return module
