"""Per-run result files and the summary table of the allocation-quality experiment.

Each (task, arm, seed) run owns one small JSON file; the table is rebuilt from whatever files exist, so an
interrupted experiment resumes by skipping finished runs and reports "k of N runs" until it is complete.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def result_path(results_dir: Path, task: str, arm: str, seed: int) -> Path:
    return results_dir / f"{task}__{arm}__seed{seed}.json"


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write atomically: a run killed mid-write must not leave a file that looks finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, sort_keys=True))
    os.replace(tmp, path)


def load_results(results_dir: Path) -> list[dict[str, Any]]:
    if not results_dir.is_dir():
        return []
    return [json.loads(p.read_text()) for p in sorted(results_dir.glob("*__*__seed*.json"))]


def _mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def _minutes(values: Sequence[float]) -> str:
    return f"{statistics.fmean(values) / 60:.1f}" if values else "-"


UNRECORDED_MACHINE = "not recorded"  # result files written before the runner recorded the machine


def machine_of(result: dict[str, Any]) -> str:
    return result.get("machine") or UNRECORDED_MACHINE


def machine_letters(results: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Each machine the runs ran on -> its label in the tables (A, B, ... in order of first appearance)."""
    machines = list(dict.fromkeys(machine_of(r) for r in results)) or [UNRECORDED_MACHINE]
    return {machine: chr(ord("A") + i) for i, machine in enumerate(machines)}


def machines_note(results: Sequence[dict[str, Any]]) -> list[str]:
    """The table's footnote naming each machine label and the precisions the runs trained in (nothing when
    every run ran on one machine): a machine with native bf16 may still have run fp32."""
    letters = machine_letters(results)
    if len(letters) < 2:
        return []
    named = "; ".join(f"({letter}) {machine}" for machine, letter in letters.items())
    precisions = ", ".join(sorted({str(r.get("precision", "not recorded")) for r in results}))
    return ["", f"Wall times by machine: {named}. Precision of the runs: {precisions}."]


def wall_times(runs: Sequence[dict[str, Any]], letters: dict[str, str]) -> str:
    """Mean wall time per machine (``letters``: machine -> its label): run times of different CPUs must
    not be averaged together."""
    if len(letters) == 1:
        return _minutes([r["wall_time_s"] for r in runs])
    cells = []
    for machine, letter in letters.items():
        times = [r["wall_time_s"] for r in runs if machine_of(r) == machine]
        if times:
            cells.append(f"{_minutes(times)} ({letter})")
    return " / ".join(cells)


def paired_difference(runs: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]], metric: str) -> str:
    """Mean ± std over seeds of (arm - baseline) for the seeds both have: seeds share the data split and
    order, so pairing removes the part of the seed spread that both arms have in common."""
    base = {r["seed"]: r["test"].get(metric) for r in baseline}
    deltas = [
        r["test"][metric] - base[r["seed"]]
        for r in runs
        if base.get(r["seed"]) is not None and r["test"].get(metric) is not None
    ]
    if not deltas:
        return "-"
    text = _mean_std(deltas)
    return text if text.startswith("-") else "+" + text


def build_table(
    results: Iterable[dict[str, Any]],
    tasks: Sequence[str],
    arms: Sequence[str],
    expected_runs: int,
    baseline: str = "uniform",
) -> str:
    """Markdown table: one row per (task, arm) with mean ± std over seeds of the test metrics, and the
    paired difference to ``baseline`` (same seeds)."""
    results = list(results)
    letters = machine_letters(results)
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for result in results:
        by_key.setdefault((result["task"], result["arm"]), []).append(result)
    lines = [
        f"{len(results)} of {expected_runs} runs"
        + (" (incomplete: rerun the command to add the rest)" if len(results) < expected_runs else ""),
        "",
        "| task | arm | seeds | test accuracy (%) | test MCC (x100) | accuracy vs "
        f"{baseline} (points, paired) | MCC vs {baseline} (paired) | trainable params | wall time (min) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in tasks:
        for arm in arms:
            runs = sorted(by_key.get((task, arm), []), key=lambda r: r["seed"])
            if not runs:
                continue
            accuracy = [r["test"]["accuracy"] for r in runs]
            mcc = [r["test"]["mcc"] for r in runs if r["test"].get("mcc") is not None]
            params = sorted({r["trainable_params"] for r in runs})
            base = by_key.get((task, baseline), [])
            delta_acc = paired_difference(runs, base, "accuracy") if arm != baseline else ""
            delta_mcc = paired_difference(runs, base, "mcc") if arm != baseline else ""
            lines.append(
                f"| {task} | {arm} | {','.join(str(r['seed']) for r in runs)} | {_mean_std(accuracy)} "
                f"| {_mean_std(mcc)} | {delta_acc} | {delta_mcc} | {'/'.join(f'{p:,}' for p in params)} "
                f"| {wall_times(runs, letters)} |"
            )
    agreement = [
        f"{task} / {arm}: {value:+.2f}"
        for task in tasks
        for arm in arms
        if (value := layout_agreement(by_key.get((task, arm), []))) is not None
    ]
    if agreement:
        lines += ["", "Layout agreement across seeds (mean pairwise Spearman correlation of the per-block "
                  "capacity, experts x rank; 1 = the same ranking of blocks): " + "; ".join(agreement) + "."]  # fmt: skip
    lines += machines_note(results)
    return "\n".join(lines)


def layout_agreement(runs: Sequence[dict[str, Any]]) -> float | None:
    """How alike the seeds' final layouts are: the mean Spearman correlation over pairs of runs of the
    per-block capacity (experts x rank). None with fewer than two runs or when a layout is constant
    (nothing to rank: the uniform arm)."""
    import torch
    from torchmetrics.functional import spearman_corrcoef

    capacities = []
    for result in runs:
        if not result.get("final_layout"):
            return None
        layout = {int(k): v for k, v in result["final_layout"].items()}
        capacity = torch.tensor([float(layout[b]["experts"] * layout[b]["rank"]) for b in sorted(layout)])
        if bool((capacity == capacity[0]).all()):
            return None
        capacities.append(capacity)
    pairs = [(a, b) for i, a in enumerate(capacities) for b in capacities[i + 1 :]]
    if not pairs:
        return None
    return statistics.fmean(float(spearman_corrcoef(a, b)) for a, b in pairs)


def layout_figure(results: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Bars of the final per-block experts and ranks of each run of one (task, arm)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(9, 4.5), sharex=True)
    width = 0.8 / max(1, len(results))
    for i, result in enumerate(results):
        layout = {int(k): v for k, v in result["final_layout"].items()}
        blocks = sorted(layout)
        offsets = [b + (i - (len(results) - 1) / 2) * width for b in blocks]
        label = f"seed {result['seed']}"
        axes[0].bar(offsets, [layout[b]["experts"] for b in blocks], width, label=label)
        axes[1].bar(offsets, [layout[b]["rank"] for b in blocks], width, label=label)
    axes[0].set_ylabel("experts")
    axes[1].set_ylabel("rank")
    axes[1].set_xlabel("block")
    axes[0].set_title(title)
    axes[0].legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"non-finite metric {value}")
    return value
