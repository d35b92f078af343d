"""Which ``MoELoRAFineTuner`` settings may differ from a checkpoint's, and applying the ones that may.

Why: ``--ckpt_path`` with ``--model.lr 0.1`` used to resume silently with the checkpoint's settings
(LightningCLI overlaid them; the restored optimizer and scheduler kept the old learning rate), and a
changed model or adapter config either crashed on shapes or loaded onto the wrong base. Now:

- optimizer and schedule settings (``OPTIMIZER_SETTINGS``) are applied from the resumed step on: the LR
  is the new ``lr`` times the new schedule's multiplier at that step, as if the run had been configured
  so from the start;
- settings that do not change the trained state (``FREE_SETTINGS``) are taken as given;
- every other setting (the base model, adapter config, task, classes, dtype, quantization, seed of a
  tiny model) must match the checkpoint's; otherwise loading stops before training with the list of
  differences. The base model is compared by weight fingerprint, so a moved model folder still resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

OPTIMIZER_SETTINGS = ("lr", "weight_decay", "betas", "warmup_steps", "scheduler", "min_lr_ratio")
FREE_SETTINGS = (
    "print_layout",
    "print_metrics",
    "gradient_checkpointing",
    "save_base_weights",
    "exact_resume",
    # The loss reduction holds no state: a resumed run trains with the value given (older checkpoints
    # predate the field).
    "loss_aggregation",
)
BASE_SETTINGS = ("model", "model_seed", "dtype", "quantization")


class CheckpointSettingsError(ValueError):
    """The module's settings differ from the checkpoint's in a way that cannot be applied on resume."""


def _normalized(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_normalized(v) for v in value]
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _normalized(v) for k, v in value.items()}
    return value


def _dotted_differences(prefix: str, saved: Any, current: Any) -> list[str]:
    saved, current = _normalized(saved), _normalized(current)
    if isinstance(saved, dict) and isinstance(current, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(current)):
            out += _dotted_differences(f"{prefix}.{key}", saved.get(key), current.get(key))
        return out
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r}, now {current!r}"]


def settings_differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    saved_base: Mapping[str, Any] | None,
    current_fingerprint: str | None,
) -> tuple[list[str], list[str]]:
    """(refused, applied) lists of ``model.<field>: checkpoint X, now Y`` lines."""
    refused: list[str] = []
    applied: list[str] = []
    same_base = (
        saved_base is not None
        and current_fingerprint is not None
        and saved_base.get("fingerprint") == current_fingerprint
    )
    for key in sorted(set(saved) | set(current)):
        if key.startswith("_") or key in FREE_SETTINGS:
            continue
        lines = _dotted_differences(f"model.{key}", saved.get(key), current.get(key))
        if key in OPTIMIZER_SETTINGS:
            applied += lines
        elif key in BASE_SETTINGS and same_base:
            continue  # the same weights from another place (a moved or re-prepared folder)
        else:
            refused += lines
    if saved_base is not None and current_fingerprint is not None and not same_base:
        refused.append(
            f"base model weights: checkpoint fingerprint {str(saved_base.get('fingerprint'))[:12]} (from"
            f" {saved_base.get('source')!r}), now {current_fingerprint[:12]}"
        )
    return refused, applied


def refuse_changed_settings(refused: list[str], source: str = "the checkpoint") -> None:
    if refused:
        listed = "\n  ".join(refused)
        raise CheckpointSettingsError(
            f"The module's settings differ from those {source} was trained with, and these cannot change on"
            f" resume:\n  {listed}\nUse the checkpoint's values (they are in its 'hyper_parameters'; for"
            " train.py put them back in the config or drop the overrides), or start a new run without"
            " --ckpt_path. Optimizer settings (lr, weight_decay, betas, warmup_steps, scheduler,"
            " min_lr_ratio) may change: they apply from the resumed step on."
        )


def apply_optimizer_settings(
    optimizers: list[torch.optim.Optimizer], schedulers: list[Any], hparams: Mapping[str, Any]
) -> list[float]:
    """Put ``lr``, ``weight_decay`` and ``betas`` into restored optimizers and re-evaluate the schedule.

    The schedulers' multiplier functions come from this run's ``configure_optimizers`` (they are not in
    checkpoints); their restored ``base_lrs`` are replaced by ``hparams["lr"]``. Returns the new LRs.
    """
    lrs: list[float] = []
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["initial_lr"] = float(hparams["lr"])
            group["weight_decay"] = float(hparams["weight_decay"])
            if "betas" in group:
                group["betas"] = tuple(float(b) for b in hparams["betas"])
            group["lr"] = float(hparams["lr"])
    for scheduler in schedulers:
        if not hasattr(scheduler, "lr_lambdas"):
            continue
        scheduler.base_lrs = [float(hparams["lr"]) for _ in scheduler.base_lrs]
        values = [
            base * fn(scheduler.last_epoch)
            for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
        ]
        for group, value in zip(scheduler.optimizer.param_groups, values, strict=True):
            group["lr"] = value
        scheduler._last_lr = list(values)  # what get_last_lr() reports (no public setter)
        lrs += values
    return lrs
