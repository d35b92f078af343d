"""What a rewire tells the user: logger metrics, a PNG figure, a compact console table (rank zero).

Kept separate so the callback's control flow stays readable and so a logger without image support, or
an environment without matplotlib, only loses the picture, never the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def rewire_metrics(prefix: str, entry: dict[str, Any]) -> dict[str, float]:
    """Flat ``{name: float}`` for ``logger.log_metrics`` from one history entry."""
    out: dict[str, float] = {f"{prefix}/rewire_index": float(entry["index"])}
    for b, s in entry["scores"].items():
        out[f"{prefix}/score/block_{b}"] = float(s)
    for b, e in (entry.get("score_errors") or {}).items():
        out[f"{prefix}/score_error/block_{b}"] = float(e)
    for b, spec in entry["layout_after"].items():
        out[f"{prefix}/experts/block_{b}"] = float(spec["experts"])
        out[f"{prefix}/rank/block_{b}"] = float(spec["rank"])
    for b, spec in entry["layout_before"].items():
        out[f"{prefix}/experts_before/block_{b}"] = float(spec["experts"])
        out[f"{prefix}/rank_before/block_{b}"] = float(spec["rank"])
    for key in (
        "params_before",
        "params_after",
        "budget",
        "time_scoring_s",
        "time_rewire_s",
        "time_surgery_s",
        "val_loss_before",
        "val_loss_after",
        "disturbance",
    ):
        if entry.get(key) is not None:
            out[f"{prefix}/{key}"] = float(entry[key])
    for key, value in (entry.get("rank_moves") or {}).items():
        if key in ("cut_disturbance", "disturbance", "fade_steps", "removal_step") and value is not None:
            out[f"{prefix}/rank_moves/{key}"] = float(value)
    return out


def log_rewire(trainer: Any, prefix: str, entry: dict[str, Any]) -> None:
    """Send the metrics to every logger of the trainer (loggers are rank-zero only themselves)."""
    metrics = rewire_metrics(prefix, entry)
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def figure_dir(trainer: Any) -> Path:
    """``<logger.log_dir>/layermoe`` (or the trainer's ``default_root_dir`` without a logger)."""
    log_dir = None
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if log_dir:
            break
    return Path(log_dir or trainer.default_root_dir or os.getcwd()) / "layermoe"


def save_and_log_figure(trainer: Any, prefix: str, entry: dict[str, Any]) -> Path | None:
    """Write ``rewire_<i>_step<s>.png``; add it to TensorBoard loggers; warn (not fail) without matplotlib."""
    if trainer.global_rank != 0:
        return None
    try:
        from layermoe.plotting import save_rewire_figure
    except ImportError:  # pragma: no cover
        return None
    path = figure_dir(trainer) / f"rewire_{entry['index']:02d}_step{entry['step']}.png"
    title = f"rewire {entry['index']} at step {entry['step']} (params {entry['params_before']} -> {entry['params_after']})"
    try:
        fig = save_rewire_figure(path, entry["layout_before"], entry["layout_after"], entry["scores"], title)
    except ImportError as exc:
        rank_zero_warn(f"LayerInfluenceCallback: no rewire figure ({exc})")
        return None
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            experiment.add_figure(f"{prefix}/rewire", fig, global_step=trainer.global_step)
    return path


def score_scale(scores: dict[int, float]) -> float:
    """What the printed score column is divided by: the mean absolute score over the blocks (so 1.0 is
    an average block, whatever the scorer's units); 1 when every score is 0."""
    mean_abs = sum(abs(v) for v in scores.values()) / max(len(scores), 1)
    return mean_abs if mean_abs > 0 else 1.0


def console_table(entry: dict[str, Any]) -> str:
    """Per-block score (raw, and relative to the mean |score| with its standard error) and experts x rank
    before -> after, then totals, timings and the disturbance."""
    before, after, scores = entry["layout_before"], entry["layout_after"], entry["scores"]
    errors = entry.get("score_errors") or {}
    scale = score_scale(scores)
    lines = [
        f"LayerInfluenceCallback: rewire {entry['index']} at step {entry['step']} (epoch {entry['epoch']})",
        f"{'block':>5} {'score':>11} {'score/mean|score| +- SE':>24}  {'experts x rank':>16}",
    ]
    for b in sorted(set(before) | set(after)):
        old, new = before.get(b, {"experts": 0, "rank": 0}), after.get(b, {"experts": 0, "rank": 0})
        arrow = f"{old['experts']}x{old['rank']} -> {new['experts']}x{new['rank']}"
        raw = scores.get(b, float("nan"))
        relative = f"{raw / scale:.3f}" + (f" +- {errors[b] / scale:.3f}" if b in errors else "")
        lines.append(f"{b:>5} {raw:>11.4g} {relative:>24}  {arrow:>16}")
    lines.append(
        f"params {entry['params_before']} -> {entry['params_after']} (budget {entry['budget']} {entry.get('budget_unit') or 'params'}); "
        f"scoring {entry['time_scoring_s']:.2f}s, rewire {entry['time_rewire_s']:.2f}s "
        f"(surgery {entry['time_surgery_s']:.3f}s)"
    )
    if entry.get("val_loss_before") is not None:
        lines.append(
            f"val loss on the scoring samples {entry['val_loss_before']:.5f} -> {entry['val_loss_after']:.5f} "
            f"(relative change {entry['disturbance']:+.3%})"
        )
    lines.extend(_rank_moves_lines(entry.get("rank_moves")))
    if before == after:
        # the default error_shrinkage often leaves the layout as it is: say so, or it looks like a failure
        lines.append(
            "layout unchanged"
            + (
                " (scores are shrunk toward their mean by allocator_options.error_shrinkage standard errors,"
                " default 1, so differences within their error bars move nothing; 0 allocates from the raw"
                " scores)"
                if errors
                else ""
            )
        )
    return "\n".join(lines)


def print_table(entry: dict[str, Any]) -> None:
    rank_zero_info(console_table(entry))


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3%}"


def _rank_moves_lines(moves: dict[str, Any] | None) -> list[str]:
    """The disturbance of the rank moves, apart from the expert moves."""
    if not moves:
        return []
    head = f"rank moves in blocks {moves['blocks']}: cut at once alone {_percent(moves['cut_disturbance'])}"
    if not moves["fade_steps"]:
        return [head + " (applied at once)"]
    if moves.get("removal_step") is None:
        return [head + f"; fading over {moves['fade_steps']} steps instead (not in the change above)"]
    return [
        head + f"; faded over {moves['fade_steps']} steps, removed at step {moves['removal_step']}: "
        f"change at removal {_percent(moves['disturbance'])}"
    ]
