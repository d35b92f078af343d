"""Refuse to restore optimizer state onto parameters it was not saved for.

Why: Lightning restores optimizer states by position (``zip(trainer.optimizers, optimizer_states)``)
and ``torch.optim.Optimizer.load_state_dict`` matches parameters by their order only, without shape
checks. After a rewire, a model rebuilt with another layout, a different parameter order, or a plan
applied before the optimizer state loads, Adam moments silently land on the wrong tensors (same
count and shapes) or fail at the first ``step()`` far from the cause (other shapes).

``OptimizerStateGuard`` writes a manifest (parameter name and shape per optimizer and group, in
order) into every checkpoint and compares it with the live optimizers at the exact moment Lightning
loads the optimizer states, raising ``OptimizerStateMismatchError`` that names the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from ..messages import listed, listed_lines

MANIFEST_KEY = "layermoe_optimizer_manifest"
_MAX_LISTED = 8

# manifest[optimizer][group] = [[parameter name, [shape...]], ...]
Manifest = list[list[list[list[Any]]]]


class OptimizerStateMismatchError(RuntimeError):
    """The checkpoint's optimizer state does not belong to the current optimizer's parameters."""


def optimizer_manifest(module: torch.nn.Module, optimizers: Sequence[torch.optim.Optimizer]) -> Manifest:
    """Name and shape of every parameter of every optimizer group, in optimizer order (plain data)."""
    names = {id(p): name for name, p in module.named_parameters(remove_duplicate=False)}
    manifest: Manifest = []
    for optimizer in optimizers:
        groups = []
        for group in optimizer.param_groups:
            groups.append(
                [
                    [names.get(id(p), f"<parameter not in module #{i}>"), list(p.shape)]
                    for i, p in enumerate(group["params"])
                ]
            )
        manifest.append(groups)
    return manifest


def check_optimizer_states(
    module: torch.nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    optimizer_states: Sequence[Mapping[str, Any]],
    saved_manifest: Manifest | None = None,
) -> None:
    """Raise ``OptimizerStateMismatchError`` unless ``optimizer_states`` fit ``optimizers`` exactly.

    With ``saved_manifest`` (from the checkpoint), names and shapes are compared position by position,
    which also catches a reordering between tensors of equal shapes. Without it, the checks are the
    group sizes and the shapes of the per-parameter state tensors (Adam's moments, SGD's momentum).
    """
    current = optimizer_manifest(module, optimizers)
    if len(optimizer_states) != len(optimizers):
        raise OptimizerStateMismatchError(
            f"The checkpoint holds state for {len(optimizer_states)} optimizer(s) but configure_optimizers"
            f" returned {len(optimizers)}; Lightning would pair them by position. Return the same"
            " optimizers as the run that saved the checkpoint."
        )
    problems: list[str] = []
    for k, (optimizer_now, state) in enumerate(zip(current, optimizer_states, strict=True)):
        groups = state.get("param_groups", [])
        if len(groups) != len(optimizer_now):
            problems.append(
                f"optimizer {k}: checkpoint has {len(groups)} param groups, now {len(optimizer_now)}"
            )
            continue
        saved_groups = saved_manifest[k] if saved_manifest is not None and k < len(saved_manifest) else None
        for g, (group_now, group_saved) in enumerate(zip(optimizer_now, groups, strict=True)):
            ids = list(group_saved.get("params", []))
            if len(ids) != len(group_now):
                problems.append(
                    f"optimizer {k} group {g}: checkpoint has {len(ids)} parameters, now {len(group_now)}"
                    + _first_difference(saved_groups[g] if saved_groups else None, group_now)
                )
                continue
            per_param = state.get("state", {})
            for position, (param_id, (name, shape)) in enumerate(zip(ids, group_now, strict=True)):
                if saved_groups is not None:
                    saved_name, saved_shape = saved_groups[g][position]
                    if saved_name != name or list(saved_shape) != shape:
                        problems.append(
                            f"optimizer {k} group {g} position {position}: saved for {saved_name} {list(saved_shape)},"
                            f" now {name} {shape}"
                        )
                        continue
                for key, value in per_param.get(param_id, {}).items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0 and list(value.shape) != shape:
                        problems.append(
                            f"optimizer {k} group {g} position {position}: state {key!r} has shape"
                            f" {list(value.shape)}, parameter {name} has {shape}"
                        )
                        break
    if problems:
        raise OptimizerStateMismatchError(
            "The checkpoint's optimizer state does not match the current optimizer's parameters, so"
            f" Lightning would assign it to the wrong tensors:\n  {listed_lines(problems, _MAX_LISTED)}\n"
            "The model must have the same layout (the one saved with the weights) and configure_optimizers"
            " must list parameters in a fixed order when the optimizer state loads. A pending rewire"
            " must be applied after the restore (e.g. after the first resumed optimizer step), not in"
            " setup/on_fit_start."
        )


def _first_difference(saved: list[list[Any]] | None, now: list[list[Any]]) -> str:
    if saved is None:
        return ""
    saved_names = [n for n, _ in saved]
    now_names = [n for n, _ in now]
    gone = [n for n in saved_names if n not in now_names]
    new = [n for n in now_names if n not in saved_names]
    return f" (only in checkpoint: [{listed(gone, 3)}]; only now: [{listed(new, 3)}])"


class OptimizerStateGuard(Callback):
    """Saves an optimizer manifest in each checkpoint and validates optimizer states before they load.

    The check wraps ``trainer.strategy.load_optimizer_state_dict`` for the duration of one restore:
    that call comes after ``configure_optimizers`` and every ``on_fit_start`` (so it sees the
    optimizers that will really receive the state) and right before Lightning assigns it.
    """

    def __init__(self) -> None:
        self._saved_manifest: Manifest | None = None
        self._original_load: Callable[[Mapping[str, Any]], None] | None = None

    @property
    @override
    def state_key(self) -> str:
        return "layermoe.OptimizerStateGuard"

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[MANIFEST_KEY] = optimizer_manifest(pl_module, trainer.optimizers)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._saved_manifest = checkpoint.get(MANIFEST_KEY)
        strategy = trainer.strategy
        if self._original_load is not None:
            return
        original = strategy.load_optimizer_state_dict
        self._original_load = original

        def checked_load(ckpt: Mapping[str, Any]) -> None:
            check_optimizer_states(
                trainer.lightning_module,
                trainer.optimizers,
                ckpt.get("optimizer_states", []),
                self._saved_manifest,
            )
            original(ckpt)

        strategy.load_optimizer_state_dict = checked_load  # type: ignore[method-assign]

    def _unwrap(self, trainer: pl.Trainer) -> None:
        if self._original_load is not None:
            # Drop the instance attribute: the strategy's own method shows through again.
            trainer.strategy.__dict__.pop("load_optimizer_state_dict", None)
            self._original_load = None
        self._saved_manifest = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap(trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap(trainer)
