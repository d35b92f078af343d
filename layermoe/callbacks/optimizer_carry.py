"""Rebuild the optimizers after a resize and carry their state across.

Why not keep the old optimizer: it holds references to tensors that no longer exist and knows nothing of
new ones. The user's ``configure_optimizers`` is re-run (their optimizer choice and groups stay), then:

* a parameter whose tensor is unchanged gets its old state back (same objects);
* a resized parameter with a ``ParamMap`` (``dim``, ``index`` with -1 for fresh entries, ``scale``) gets
  its old per-entry state gathered along ``dim``, zeros for fresh entries; moments are divided by the
  map's per-entry scale (``exp_avg``/``momentum_buffer`` by ``s``, ``exp_avg_sq`` by ``s**2``) because an
  entry multiplied by ``s`` at unchanged output receives gradients divided by ``s``; scalar entries such
  as ``step`` are copied;
* a parameter with no correspondence (map ``None``, or unknown) starts with empty state.

LR schedulers are rebuilt by ``configure_optimizers`` too; their ``state_dict`` (step count, base LRs)
and the old param groups' hyper-parameters (current ``lr``, ...) are restored by position, so the schedule
continues where it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from layermoe.lightning_compat import lightning_optimizers, set_optimizers
from layermoe.messages import listed

_LINEAR_IN_GRAD = {"exp_avg", "momentum_buffer"}
_QUADRATIC_IN_GRAD = {"exp_avg_sq", "max_exp_avg_sq"}


@dataclass
class OptimizerSnapshot:
    """Everything needed to put the strategy's optimizers back, and to carry their state forward."""

    optimizers: list[Optimizer]
    lightning_optimizers: list[Any]
    scheduler_configs: list[Any]
    scheduler_states: list[dict[str, Any]]
    param_groups: list[list[dict[str, Any]]]
    name_of: dict[int, str]
    tensor_of: dict[str, nn.Parameter]


@dataclass
class CarryReport:
    """How each parameter's optimizer state was obtained (parameter names)."""

    kept: list[str] = field(default_factory=list)
    mapped: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)


def snapshot_optimizers(strategy: Any, module: nn.Module) -> OptimizerSnapshot:
    """Record the strategy's optimizers, schedulers and the module's parameter names (no copies of state)."""
    named = dict(module.named_parameters())
    return OptimizerSnapshot(
        optimizers=list(strategy.optimizers),
        lightning_optimizers=lightning_optimizers(strategy),
        scheduler_configs=list(strategy.lr_scheduler_configs),
        scheduler_states=[cfg.scheduler.state_dict() for cfg in strategy.lr_scheduler_configs],
        param_groups=[
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            for opt in strategy.optimizers
        ],
        name_of={id(p): n for n, p in named.items()},
        tensor_of=named,
    )


def restore_optimizers(strategy: Any, snap: OptimizerSnapshot) -> None:
    """Put the old optimizer objects and scheduler configs back (rollback)."""
    set_optimizers(strategy, snap.optimizers, snap.lightning_optimizers)
    strategy.lr_scheduler_configs = list(snap.scheduler_configs)
    for cfg, state in zip(snap.scheduler_configs, snap.scheduler_states, strict=True):
        cfg.scheduler.load_state_dict(state)


def _gather(old: torch.Tensor, dim: int, index: torch.Tensor, new_shape: torch.Size) -> torch.Tensor:
    out = torch.zeros(new_shape, dtype=old.dtype, device=old.device)
    index = index.to(device=old.device, dtype=torch.long)
    keep = (index >= 0).nonzero().flatten()
    if keep.numel():
        out.index_copy_(dim, keep, old.index_select(dim, index[keep]))
    return out


def _state_factor(scale: Any, key: str) -> torch.Tensor | float | None:
    """Factor for optimizer-state entry ``key`` of a parameter whose values were multiplied by ``scale``.

    A parameter multiplied by ``s`` (with the module's output unchanged) receives gradients divided by
    ``s``: running first moments are divided by ``s`` and second moments by ``s**2`` so they stay
    consistent with the gradients that follow. Other entries are gathered unscaled.
    """
    if scale is None:
        return None
    power = 1 if key in _LINEAR_IN_GRAD else 2 if key in _QUADRATIC_IN_GRAD else 0
    if power == 0:
        return None
    if not torch.is_tensor(scale):
        return None if scale == 1 else float(scale) ** -power
    scale = scale.to(torch.float64)
    if bool((scale == 1).all()):
        return None
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.where(scale == 0, torch.zeros_like(scale), safe.pow(-power))


def map_param_state(
    old_state: dict[str, Any], old_param: torch.Tensor, new_param: torch.Tensor, param_map: Any
) -> dict[str, Any]:
    """Build the state of ``new_param`` from ``old_state`` through ``param_map`` (see module docstring)."""
    dim = int(param_map.dim)
    index = param_map.index
    if index.numel() != new_param.shape[dim]:
        raise ValueError(
            f"ParamMap index has {index.numel()} entries but the new parameter has {new_param.shape[dim]} along dim {dim}"
        )
    scale = getattr(param_map, "scale", None)
    new_state: dict[str, Any] = {}
    for key, value in old_state.items():
        if torch.is_tensor(value) and value.shape == old_param.shape and value.dim() > 0:
            gathered = _gather(value, dim, index, new_param.shape)
            factor = _state_factor(scale, key)
            if torch.is_tensor(factor):
                gathered = gathered * _broadcast_scale(factor, dim, new_param.dim()).to(gathered)
            elif factor is not None:
                gathered = gathered * factor
            new_state[key] = gathered
        elif torch.is_tensor(value):
            new_state[key] = value.clone()
        else:
            new_state[key] = value
    return new_state


def _broadcast_scale(scale: torch.Tensor, dim: int, ndim: int) -> torch.Tensor:
    """A per-entry scale along ``dim`` reshaped to broadcast against the parameter."""
    if scale.dim() == 0:
        return scale
    shape = [1] * ndim
    shape[dim] = scale.numel()
    return scale.reshape(shape)


def carry_state(
    snap: OptimizerSnapshot,
    new_optimizers: list[Optimizer],
    module: nn.Module,
    state_map: dict[str, Any],
) -> CarryReport:
    """Fill the new optimizers' state from the snapshot; optimizers are matched by position, params by name."""
    if len(new_optimizers) != len(snap.optimizers):
        raise ValueError(
            f"configure_optimizers returned {len(new_optimizers)} optimizers after the rewire but "
            f"{len(snap.optimizers)} before: it must return the same structure for any layout"
        )
    new_name_of = {id(p): n for n, p in module.named_parameters()}
    report = CarryReport()
    for old_opt, new_opt, old_groups in zip(snap.optimizers, new_optimizers, snap.param_groups, strict=True):
        for p in (p for g in new_opt.param_groups for p in g["params"]):
            name = new_name_of.get(id(p))
            old_p = snap.tensor_of.get(name) if name is not None else None
            if old_p is None or old_p not in old_opt.state:
                report.reset.append(name or "<unnamed>")
                continue
            if old_p is p:
                new_opt.state[p] = dict(old_opt.state[old_p])
                report.kept.append(name)
            elif state_map.get(name) is not None:
                new_opt.state[p] = map_param_state(old_opt.state[old_p], old_p, p, state_map[name])
                report.mapped.append(name)
            else:
                report.reset.append(name)
        if len(old_groups) == len(new_opt.param_groups):
            for old_g, new_g in zip(old_groups, new_opt.param_groups, strict=True):
                new_g.update(old_g)
    return report


def restore_schedulers(snap: OptimizerSnapshot, new_configs: list[Any]) -> None:
    """Continue each rebuilt LR scheduler from the old one's step (matched by position)."""
    if len(new_configs) != len(snap.scheduler_configs):
        raise ValueError(
            f"configure_optimizers returned {len(new_configs)} LR schedulers after the rewire but "
            f"{len(snap.scheduler_configs)} before: it must return the same structure for any layout"
        )
    for cfg, state in zip(new_configs, snap.scheduler_states, strict=True):
        cfg.scheduler.load_state_dict(state)


def check_coverage(optimizers: list[Optimizer], module: nn.Module, snap: OptimizerSnapshot) -> None:
    """Every trainable parameter in exactly one optimizer slot (unless it was deliberately left out before)."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    seen: dict[int, int] = {}
    for opt in optimizers:
        for g in opt.param_groups:
            for p in g["params"]:
                seen[id(p)] = seen.get(id(p), 0) + 1
    dupes = sorted(name_of.get(i, "<unnamed>") for i, c in seen.items() if c > 1)
    if dupes:
        raise ValueError(f"configure_optimizers lists these parameters more than once: {listed(dupes, 5)}")
    previously_optimized = {
        snap.name_of[id(p)]
        for opt in snap.optimizers
        for g in opt.param_groups
        for p in g["params"]
        if id(p) in snap.name_of
    }
    missing = sorted(
        n
        for n, p in module.named_parameters()
        if p.requires_grad and id(p) not in seen and (n in previously_optimized or n not in snap.tensor_of)
    )
    if missing:
        raise ValueError(
            f"after the rewire, configure_optimizers left out trainable parameters {listed(missing, 5)}: build the "
            "parameter groups from the module's current parameters (self.parameters() / named_parameters()), "
            "not from a list saved earlier"
        )
    current = set(name_of)
    stale = sorted(snap.name_of.get(i, "<unnamed>") for i in seen if i not in current)
    if stale:
        raise ValueError(
            f"configure_optimizers references parameters that are no longer in the module: {listed(stale, 5)}; build "
            "the groups from the module's current parameters"
        )
