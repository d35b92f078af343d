"""Reload a module whose adapters were added by ``LayerInfluenceCallback(inject=...)``.

Why a helper: ``LightningModule.load_from_checkpoint`` runs no callbacks, so the adapters that ``inject=``
added in ``setup`` would be missing and the adapter (and renamed base) weights would not load. The
checkpoint holds the injection config in the callback's state; this adds the adapters right after the
module's own ``configure_model`` and before the weights load, and the adapter layers resize themselves to
the rewired layout recorded in the weights (``lora_shape``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from lightning.pytorch import LightningModule

from layermoe.checkpointing.integrity import read_verified_checkpoint

M = TypeVar("M", bound=LightningModule)


def injected_config(checkpoint: dict[str, Any]) -> dict[str, Any] | None:
    """The ``inject=`` config stored by a ``LayerInfluenceCallback`` in a loaded checkpoint dict, if any."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if str(key).startswith("LayerInfluenceCallback") and isinstance(state, dict) and state.get("inject"):
            return dict(state["inject"])
    return None


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
    config = injected_config(checkpoint)
    if config is None:
        return module_cls.load_from_checkpoint(checkpoint_path, **kwargs)

    from layermoe.adapters import MoELoRAConfig, inject, moe_layers

    moe_config = MoELoRAConfig.from_dict(config)

    class _Injecting(module_cls):  # type: ignore[valid-type, misc]
        def configure_model(self) -> None:
            super().configure_model()
            if not moe_layers(self):
                inject(self, moe_config)

    _Injecting.__name__ = module_cls.__name__
    _Injecting.__qualname__ = module_cls.__qualname__
    module = _Injecting.load_from_checkpoint(checkpoint_path, **kwargs)
    module.__class__ = module_cls
    return module
