"""What a rewire tells the user: logger metrics, a PNG figure, a compact console table (rank zero).

Kept separate so the callback's control flow stays readable and so a logger without image support, or
an environment without matplotlib, only loses the picture, never the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from layermoe.allocation.shrink import shrink_toward_mean
from layermoe.plotting import save_rewire_figure


def shrunk_scores(entry: dict[str, Any]) -> dict[int, float] | None:
    """The scores the allocator used: shrunk toward their mean by ``error_shrinkage`` standard errors
    (``layermoe.allocation.shrink``); None without errors or shrinkage (the raw scores were used)."""
    errors, strength = entry.get("score_errors"), entry.get("error_shrinkage") or 0
    if not errors or not strength:
        return None
    blocks = sorted(entry["scores"])
    raw = np.array([float(entry["scores"][b]) for b in blocks], dtype=np.float64)
    values = shrink_toward_mean(blocks, raw, errors, float(strength))
    return {b: float(v) for b, v in zip(blocks, values, strict=True)}


def rewire_metrics(prefix: str, entry: dict[str, Any]) -> dict[str, float]:
    """Flat ``{name: float}`` for ``logger.log_metrics`` from one history entry."""
    out: dict[str, float] = {f"{prefix}/rewire_index": float(entry["index"])}
    for b, s in entry["scores"].items():
        out[f"{prefix}/score/block_{b}"] = float(s)
    for b, e in (entry.get("score_errors") or {}).items():
        out[f"{prefix}/score_error/block_{b}"] = float(e)
    for b, s in (shrunk_scores(entry) or {}).items():
        out[f"{prefix}/score_shrunk/block_{b}"] = s
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
        "growth_round",
        "trainable_adapter_params",
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
    path = figure_dir(trainer) / f"rewire_{entry['index']:02d}_step{entry['step']}.png"
    title = (
        f"{_what(entry)} at step {entry['step']} (params {entry['params_before']} -> {entry['params_after']})"
    )
    try:
        fig = save_rewire_figure(
            path,
            entry["layout_before"],
            entry["layout_after"],
            entry["scores"],
            title,
            errors=entry.get("score_errors"),
            shrunk=shrunk_scores(entry),
        )
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


def _aligned_pairs(pairs: list[tuple[str, str]], sep: str) -> list[str]:
    """``left sep right`` for each pair, lefts right-aligned and rights left-aligned, so the separators
    line up and every cell has the same width (two-digit ranks or experts included)."""
    wl = max((len(a) for a, _ in pairs), default=0)
    wr = max((len(b) for _, b in pairs), default=0)
    return [f"{a:>{wl}}{sep}{b:<{wr}}" if b else f"{a:>{wl}}" + " " * (len(sep) + wr) for a, b in pairs]


def _table_rows(header: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns, each as wide as its widest cell, two spaces apart."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return ["  ".join(f"{cell:>{w}}" for cell, w in zip(row, widths, strict=True)) for row in [header, *rows]]


def _count(value: object) -> str:
    """A parameter count as the data lines print row counts (26,414); anything else (None) as is."""
    return f"{value:,}" if isinstance(value, int) else str(value)


def console_table(entry: dict[str, Any]) -> str:
    """Per-block score (raw; the shrunk score the allocator used when ``error_shrinkage`` was on; relative
    to the mean |score| with its standard error) and experts x rank before -> after, then totals,
    timings and the disturbance. Columns align whatever the widths of the numbers."""
    before, after, scores = entry["layout_before"], entry["layout_after"], entry["scores"]
    errors = entry.get("score_errors") or {}
    shrunk = shrunk_scores(entry)
    scale = score_scale(scores)
    blocks = sorted(set(before) | set(after))
    empty = {"experts": 0, "rank": 0}
    moves = _aligned_pairs(
        [
            (
                f"{before.get(b, empty)['experts']}x{before.get(b, empty)['rank']}",
                f"{after.get(b, empty)['experts']}x{after.get(b, empty)['rank']}",
            )
            for b in blocks
        ],
        " -> ",
    )
    relative = _aligned_pairs(
        [
            (f"{scores.get(b, float('nan')) / scale:.3f}", f"{errors[b] / scale:.3f}" if b in errors else "")
            for b in blocks
        ],
        " +- ",
    )
    header = (
        ["block", "score"] + (["shrunk"] if shrunk else []) + ["score/mean|score| +- SE", "experts x rank"]
    )
    rows = [
        [str(b), f"{scores.get(b, float('nan')):.4g}"]
        + ([f"{shrunk[b]:.4g}" if b in shrunk else ""] if shrunk else [])
        + [relative[i], moves[i]]
        for i, b in enumerate(blocks)
    ]
    lines = [
        f"LayerInfluenceCallback: {_what(entry)} at step {entry['step']} (epoch {entry['epoch']})",
        *_table_rows(header, rows),
    ]
    if shrunk:
        lines.append(
            f"shrunk = the score the allocator used: moved toward the mean by {entry['error_shrinkage']:g} SE "
            "(error_shrinkage); ties go to the higher raw score"
        )
    lines.append(
        f"params {_count(entry['params_before'])} -> {_count(entry['params_after'])} (budget"
        f" {_count(entry['budget'])} {entry.get('budget_unit') or 'params'}); "
        f"scoring {entry['time_scoring_s']:.2f}s, rewire {entry['time_rewire_s']:.2f}s "
        f"(surgery {entry['time_surgery_s']:.3f}s)"
    )
    if entry.get("val_loss_before") is not None:
        lines.append(
            f"val loss on the scoring samples {entry['val_loss_before']:.5f} -> {entry['val_loss_after']:.5f} "
            f"(relative change {entry['disturbance']:+.3%})"
        )
    lines.extend(_rank_moves_lines(entry.get("rank_moves")))
    if before == after and entry.get("mode") == "grow":
        lines.append(
            "nothing added: no block's next unit fits this round's allowance (it carries to the next)"
        )
    elif before == after:
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


def _what(entry: dict[str, Any]) -> str:
    """``rewire i`` or, in growth mode, ``growth round k of N (control, init)``."""
    if entry.get("mode") != "grow":
        return f"rewire {entry['index']}"
    return (
        f"growth round {entry['growth_round'] + 1} of {entry['growth_rounds']} (control {entry['growth_control']},"
        f" init {entry['growth_init']})"
    )


def print_table(entry: dict[str, Any]) -> None:
    rank_zero_info(console_table(entry))


def publish(trainer: Any, prefix: str, entry: dict[str, Any], *, plot: bool, verbose: bool) -> None:
    """Log one history entry, draw it (``plot``) and print its table (``verbose``)."""
    log_rewire(trainer, prefix, entry)
    if plot:
        try:
            save_and_log_figure(trainer, prefix, entry)
        except Exception as exc:  # noqa: BLE001 - a figure must never break training
            rank_zero_warn(f"LayerInfluenceCallback: could not save the rewire figure: {exc}")
    if verbose:
        print_table(entry)


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
