"""The rewire transaction: resize, re-wrap for DDP, rebuild the optimizers, carry their state.

All-or-nothing: the module tree, the optimizers, the schedulers and the DDP wrapper are recorded first
and put back if any step fails, on every rank together (a failure on one rank is shared through a
collective before anyone re-wraps or continues, so no rank is left waiting in a DDP constructor).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn

from layermoe.adapters import apply_layout, named_moe_layers
from layermoe.callbacks.distributed import any_rank, is_ddp, rewrap
from layermoe.callbacks.errors import RewireError
from layermoe.callbacks.optimizer_carry import (
    CarryReport,
    carry_state,
    check_coverage,
    restore_optimizers,
    restore_schedulers,
    snapshot_optimizers,
)
from layermoe.callbacks.transaction import ModuleSnapshot
from layermoe.lightning_compat import is_compiled, optimizers_to_device


@dataclass
class RewireResult:
    reports: list[Any]
    carry: CarryReport
    time_surgery_s: float
    time_total_s: float


def _merged_state_map(reports: list[Any]) -> dict[str, Any]:
    """One ``{full parameter name: ParamMap | None}`` over all resize reports (names relative to the module)."""
    merged: dict[str, Any] = {}
    for report in reports:
        merged.update(getattr(report, "state_map", None) or {})
    return merged


def shared_routing_mass(strategy: Any, pl_module: nn.Module) -> dict[str, torch.Tensor] | None:
    """Per-layer routing mass averaged over ranks (``None`` on one process).

    The running routing mass decides which expert a resize splits or drops; each rank updates it from
    its own batches, so without this the ranks could pick different experts and diverge.
    """
    if strategy.world_size <= 1:
        return None
    layers = sorted(named_moe_layers(pl_module).items())
    masses = [layer.lora_routing_mass.detach().to(torch.float64).reshape(-1) for _, layer in layers]
    flat = strategy.reduce(torch.cat(masses), reduce_op="mean")
    out, start = {}, 0
    for (name, _), mass in zip(layers, masses, strict=True):
        out[name] = flat[start : start + mass.numel()].to(torch.float32)
        start += mass.numel()
    return out


#: ``surgery(module, layout, routing_mass) -> reports``: what resizes the module (``apply_layout`` by default)
Surgery = Callable[[nn.Module, dict[int, dict[str, int]], Any], list[Any]]


def layout_surgery(keep_scaling: bool = False) -> Surgery:
    """``apply_layout`` as a :data:`Surgery` (``keep_scaling``: rank changes keep ``lora_alpha / rank``)."""

    def apply_layout_(
        module: nn.Module, new_layout: dict[int, dict[str, int]], routing_mass: Any
    ) -> list[Any]:
        return list(
            apply_layout(module, new_layout, routing_mass=routing_mass, keep_scaling=keep_scaling) or []
        )

    apply_layout_.__name__ = "apply_layout"  # the stage a failure names
    return apply_layout_


def rewire(
    trainer: Any,
    pl_module: nn.Module,
    new_layout: dict[int, dict[str, int]],
    seed: int = 0,
    surgery: Surgery | None = None,
) -> RewireResult:
    """Apply ``new_layout`` to ``pl_module`` mid-fit and leave training ready to continue.

    ``surgery`` resizes the module (growth passes ``grow_model``); its reports' ``state_map`` carries the
    optimizer state either way.

    The surgery draws its random numbers (new LoRA A rows, symmetry-breaking noise) from ``seed`` under
    ``isolate_rng``: the training RNG stream is untouched, and a run resumed from a checkpoint with the
    plan pending rewires exactly like the uninterrupted run.

    Raises :class:`RewireError` (cause chained) after restoring everything when any step fails.
    """
    strategy = trainer.strategy
    start = time.perf_counter()
    module_snap = ModuleSnapshot(pl_module)
    opt_snap = snapshot_optimizers(strategy, pl_module)
    old_wrapper = strategy.model
    surgery = surgery or layout_surgery()
    stage = getattr(surgery, "__name__", "the resize")  # apply_layout, or growth's grow_model
    error: BaseException | None = None
    reports: list[Any] = []
    routing_mass = shared_routing_mass(strategy, pl_module)
    try:
        with torch.no_grad(), isolate_rng():
            torch.manual_seed(seed)
            reports = surgery(pl_module, new_layout, routing_mass)
    except Exception as exc:  # noqa: BLE001 - re-raised below with context, after rollback on all ranks
        error = exc
    surgery_s = time.perf_counter() - start
    if any_rank(strategy, error is not None):
        module_snap.restore()
        raise RewireError(_message(stage, trainer, error)) from error

    carry = CarryReport()
    try:
        stage = "DDP re-wrap"
        rewrap(strategy, pl_module)
        stage = "configure_optimizers"
        strategy.setup_optimizers(trainer)
        optimizers_to_device(strategy.optimizers, strategy.root_device)
        stage = "optimizer coverage check"
        check_coverage(strategy.optimizers, pl_module, opt_snap)
        stage = "optimizer state carry-over"
        carry = carry_state(opt_snap, strategy.optimizers, pl_module, _merged_state_map(reports))
        stage = "LR scheduler restore"
        restore_schedulers(opt_snap, strategy.lr_scheduler_configs)
    except Exception as exc:  # noqa: BLE001
        error = exc
    if any_rank(strategy, error is not None):
        module_snap.restore()
        restore_optimizers(strategy, opt_snap)
        if is_ddp(strategy):
            strategy.model = old_wrapper
        raise RewireError(_message(stage, trainer, error)) from error

    if is_compiled(pl_module):
        torch._dynamo.reset()
    return RewireResult(reports, carry, surgery_s, time.perf_counter() - start)


def _message(stage: str, trainer: Any, error: BaseException | None) -> str:
    where = f"at global step {trainer.global_step}"
    if error is None:
        return f"rewire {where} failed on another rank during {stage}; model and optimizer restored"
    return (
        f"rewire {where} failed during {stage}: {type(error).__name__}: {error}. "
        "The model, optimizers and LR schedulers were restored to their state before the rewire."
    )
