"""The capacity curve (issue 34): uniform MoE-LoRA's test loss against its budget on generative tasks.

Driven by ``benchmarks/allocation_sweep.py --phase curve`` (its runner, queue and per-run JSON files);
this file holds what is particular to the curve: the task files (with a validation file that is neither
trained on nor the test), the learning-rate grid and its selection, and the table.

Learning rate: every (task, budget) first runs its grid on the selection seed (the first seed); the lr
with the lowest validation loss (per-sample mean over the answer tokens, final weights) is chosen, and
the remaining seeds run at it. When the best lr is at an edge of the grid, the grid grows by one step
(the grid's own spacing) on that side, at most ``max_extensions`` times per cell, so the chosen lr is an
interior minimum or the table says it is not. Test loss never enters the choice.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tasks
from quality_results import machine_letters, machines_note, wall_times
from sweep_report import _mean_sd  # one format for every sweep table

#: every budget of configs/experiments/allocation_sweep/budgets, by adapter parameters (smallest first)
BUDGET_ORDER = ["tiny", "tight", "quarter7", "qv2", "half7", "qv4", "small", "mid", "large", "generous"]

GENERATIVE_TASKS = ("facts", "skills", "translate")
VAL_ROWS = 96  # validation rows per task (lr selection, and the callback's scoring in the later sweep)
QUICK_SIZES = {
    "facts": {"entities": 6},
    "skills": {"train_rows": 24, "test_rows": 8},
    "translate": {"train_rows": 24, "test_rows": 8},
}
QUICK_VAL_ROWS = 8
TASK_DATA_SEED = 0  # the task's rows are the same for every training seed: seeds vary init and order

Run = tuple[str, str, str, int]  # task, budget, arm, seed (the sweep runner's runs)


def run_name(run: Run) -> str:
    """A run's file and folder name (every phase of benchmarks/allocation_sweep.py)."""
    task, budget, arm, seed = run
    return f"{task}__{budget}__{arm}__seed{seed}"


# ---------------------------------------------------------------------------------------------- data
def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def validation_rows(task: str, seed: int, rows: int, **sizes: Any) -> list[dict[str, str]]:
    """Rows that measure what the test measures without being it or being trained on.

    facts: the same facts asked in the training phrasing the task leaves unused (it trains on two of
    three), so a validation row tests recall under a phrasing never trained on, like the test row, with
    a different wording. skills, translate: fresh inputs (a different generator seed) that are in
    neither the training nor the test rows (translate: new sentences of the same lexicon)."""
    picker = random.Random(seed + 1)
    if task == "facts":
        used = tasks.facts_rows(seed=seed, **sizes)
        phrasings = sizes.get("phrasings", 2)
        if phrasings >= 3:
            raise ValueError("facts validation uses the unused training phrasing: phrasings must be <= 2")
        every = tasks.facts_rows(seed=seed, **{**sizes, "phrasings": phrasings + 1})
        trained = {r["prompt"]: r["response"] for r in used.train}
        spare = [r for r in every.train if r["prompt"] not in trained]
        return picker.sample(spare, min(rows, len(spare)))
    if task in ("skills", "translate"):
        make = tasks.GENERATORS[task]
        used = make(seed=seed, **sizes)
        taken = {r["prompt"] for r in used.train + used.test}
        fresh = make(seed=seed + 1, train_rows=0, test_rows=2 * rows).test
        return [r for r in fresh if r["prompt"] not in taken][:rows]
    raise ValueError(f"task must be one of {list(GENERATIVE_TASKS)}, got {task!r}")


def write_task_files(task: str, folder: Path, quick: bool) -> dict[str, str]:
    """``folder/{train,validation,test}.jsonl`` of a generative task (benchmarks/tasks.py rows, seed
    ``TASK_DATA_SEED``; --quick: a few rows); the same files every time."""
    sizes = QUICK_SIZES[task] if quick else {}
    rows = tasks.write_task(task, folder, seed=TASK_DATA_SEED, **sizes)
    val = validation_rows(task, TASK_DATA_SEED, QUICK_VAL_ROWS if quick else VAL_ROWS, **sizes)
    _write_jsonl(folder / "validation.jsonl", val)
    (folder / "description.txt").write_text(rows.description + f"; {len(val)} validation rows\n")
    return {split: str(folder / f"{split}.jsonl") for split in ("train", "validation", "test")}


# ---------------------------------------------------------------------------------------------- lr grid
def lr_arm(lr: float, arm: str = "uniform") -> str:
    """The arm name of ``arm`` at learning rate ``lr`` (the run's file name carries it)."""
    return f"{arm}+lr={lr:g}"


def split_arm(name: str) -> tuple[str, float | None]:
    """``"uniform+lr=0.004"`` -> ("uniform", 0.004); an arm without a learning rate -> (name, None)."""
    base, sep, lr = name.partition("+lr=")
    return (base, float(lr)) if sep else (name, None)


@dataclass
class CellPlan:
    """One (task, budget): the grid as it stands, the runs it still needs, the chosen lr (when known)."""

    task: str
    budget: str
    grid: list[float]
    todo: list[Run] = field(default_factory=list)
    chosen: float | None = None
    at_edge: bool = False  # the chosen lr is the grid's edge and the grid may not grow further
    seeds: list[int] | None = None  # the seeds the cell runs at its chosen lr (None: the curve's seeds)
    grid_only: bool = False  # a cell run on the selection seed's grid only (CURVE["grid_only"])


def _val_loss(result: dict[str, Any]) -> float:
    return float(result["validation"]["loss_sample"])


def plan_cell(
    results: Sequence[dict[str, Any]],
    task: str,
    budget: str,
    lrs: Sequence[float],
    seeds: Sequence[int],
    max_extensions: int,
) -> CellPlan:
    """What one (task, budget) needs next, from the finished runs: the grid on the selection seed, then
    the other seeds at the lr with the lowest validation loss."""
    selection_seed = seeds[0]
    runs = {
        f"{lr:g}": r
        for r in results
        if r["task"] == task
        and r["budget"] == budget
        and r["seed"] == selection_seed
        and split_arm(r["arm"])[0] == "uniform"  # the grid is the uniform arm's; other arms have lrs too
        and (lr := split_arm(r["arm"])[1]) is not None  # fmt: skip
    }
    grid = sorted(lrs)
    step = grid[1] / grid[0] if len(grid) > 1 else 2.0
    plan = CellPlan(task, budget, grid, seeds=list(seeds))
    extensions = 0
    while True:
        missing = [lr for lr in plan.grid if f"{lr:g}" not in runs]
        if missing:
            plan.todo = [(task, budget, lr_arm(lr), selection_seed) for lr in missing]
            return plan
        best = min(plan.grid, key=lambda lr: _val_loss(runs[f"{lr:g}"]))
        edge = best == plan.grid[0] or best == plan.grid[-1]
        if edge and len(plan.grid) > 1 and extensions < max_extensions:
            extensions += 1
            plan.grid = [best / step, *plan.grid] if best == plan.grid[0] else [*plan.grid, best * step]
            continue
        plan.chosen, plan.at_edge = best, edge and len(plan.grid) > 1
        have = {
            r["seed"] for r in results if (r["task"], r["budget"], r["arm"]) == (task, budget, lr_arm(best))
        }
        plan.todo = [(task, budget, lr_arm(best), s) for s in seeds if s not in have]
        return plan


def plan_curve(
    results: Sequence[dict[str, Any]],
    tasks_: Sequence[str],
    budgets: Sequence[str],
    lrs: Sequence[float],
    seeds: Sequence[int],
    max_extensions: int,
    grid_only: Mapping[str, Sequence[str]] | None = None,
) -> list[CellPlan]:
    """Every (task, budget) of ``tasks_`` x ``budgets``: its grid on the selection seed ``seeds[0]``, then
    its other seeds at the chosen lr; ``grid_only`` (task -> budgets, any task) adds cells that run the
    grid on the selection seed only."""
    plans = [plan_cell(results, t, b, lrs, seeds, max_extensions) for t in tasks_ for b in budgets]
    for task, extra in (grid_only or {}).items():
        for budget in extra:
            if task not in tasks_ or budget not in budgets:
                plan = plan_cell(results, task, budget, lrs, seeds[:1], max_extensions)
                plan.grid_only = True
                plans.append(plan)
    task_order = list(dict.fromkeys([*tasks_, *(grid_only or {})]))
    order = {b: i for i, b in enumerate(BUDGET_ORDER)}
    return sorted(plans, key=lambda p: (task_order.index(p.task), order.get(p.budget, len(order))))


def _seeds_of(plan: CellPlan, seeds: Sequence[int]) -> Sequence[int]:
    return seeds if plan.seeds is None else plan.seeds


def expected_runs(plans: Sequence[CellPlan], seeds: Sequence[int]) -> int:
    """Runs the curve needs as far as known now: each cell's grid, plus its other seeds."""
    return sum(len(p.grid) + len(_seeds_of(p, seeds)) - 1 for p in plans)


def finished_runs(results: Sequence[dict[str, Any]], plans: Sequence[CellPlan], seeds: Sequence[int]) -> int:
    """Finished runs that the plans count: each grid lr on the selection seed, the chosen lr's other seeds
    (a run at an lr outside the grid, e.g. from an earlier --lrs, is not counted)."""
    needed = set()
    for p in plans:
        needed |= {(p.task, p.budget, lr_arm(lr), seeds[0]) for lr in p.grid}
        if p.chosen is not None:
            needed |= {(p.task, p.budget, lr_arm(p.chosen), s) for s in _seeds_of(p, seeds)}
    return sum(1 for r in results if (r["task"], r["budget"], r["arm"], r["seed"]) in needed)


# ---------------------------------------------------------------------------------------------- table
def _cell_runs(results: Sequence[dict[str, Any]], plan: CellPlan) -> list[dict[str, Any]]:
    if plan.chosen is None:
        return []
    arm = lr_arm(plan.chosen)
    runs = [r for r in results if (r["task"], r["budget"], r["arm"]) == (plan.task, plan.budget, arm)]
    return sorted(runs, key=lambda r: r["seed"])


def loss_ratio(
    results: Sequence[dict[str, Any]], plans: Sequence[CellPlan], task: str, tight: str, generous: str
) -> str:
    """The issue's criterion: uniform's test loss at ``tight`` over its loss at ``generous``, each at its
    chosen lr: the ratio of the seed means, and per seed (paired by seed)."""
    by_budget = {p.budget: _cell_runs(results, p) for p in plans if p.task == task}
    low, high = by_budget.get(tight, []), by_budget.get(generous, [])
    if not low or not high:
        return f"{task}: {tight}/{generous} needs both budgets' chosen-lr runs"
    loss = {
        b: {r["seed"]: r["final"]["loss_sample"] for r in runs}
        for b, runs in ((tight, low), (generous, high))
    }
    seeds = sorted(set(loss[tight]) & set(loss[generous]))
    per_seed = [loss[tight][s] / loss[generous][s] for s in seeds]
    ratio = statistics.fmean(loss[tight].values()) / statistics.fmean(loss[generous].values())
    verdict = "meets" if len(per_seed) >= 3 and min(per_seed) >= 1.3 else "does not meet (yet)"
    return (
        f"{task}: test loss at {tight} / at {generous} = {ratio:.2f} (means over seeds); per seed "
        + ", ".join(f"{s}: {v:.2f}" for s, v in zip(seeds, per_seed, strict=True))
        + f" -> {verdict} the issue's criterion (>= 1.3 on each of 3 seeds)"
    )


def build_curve_table(
    results: Sequence[dict[str, Any]],
    plans: Sequence[CellPlan],
    seeds: Sequence[int],
    ratio_budgets: tuple[str, str],
) -> str:
    done = finished_runs(results, plans, seeds)
    total = expected_runs(plans, seeds)
    unresolved = sum(1 for p in plans if p.chosen is None)
    letters = machine_letters(results)
    lines = [
        f"{done} of {total} runs"
        + (f" ({unresolved} cells still choosing their lr: the total may grow)" if unresolved else "")
        + ("" if done >= total and not unresolved else " (incomplete: rerun the command to add the rest)"),
        "",
        "| task | budget | adapter params | adapter / base | lr grid: val loss, seed "
        f"{seeds[0]} | chosen lr | seeds | test loss (per sample) | test loss (per token) | exact match |"
        " wall time (min) |",
        "|" + " --- |" * 11,
    ]
    for plan in plans:
        mine = [r for r in results if (r["task"], r["budget"]) == (plan.task, plan.budget)]
        grid_runs = {
            f"{split_arm(r['arm'])[1]:g}": r for r in mine if r["seed"] == seeds[0] and split_arm(r["arm"])[1]
        }
        grid = "; ".join(
            f"{lr:g}: {_val_loss(grid_runs[f'{lr:g}']):.4f}" if f"{lr:g}" in grid_runs else f"{lr:g}: -"
            for lr in plan.grid
        )
        chosen = "-" if plan.chosen is None else f"{plan.chosen:g}" + (" (grid edge)" if plan.at_edge else "")
        runs = _cell_runs(results, plan)
        params = mine[0]["trainable_params"] if mine else None
        base = mine[0]["base_params"] if mine else None
        cells = [
            plan.task,
            plan.budget + (" (grid only)" if plan.grid_only else ""),
            "-" if params is None else f"{params:,}",
            "-" if params is None else f"{100 * params / base:.4f}%",
            grid,
            chosen,
            ",".join(str(r["seed"]) for r in runs) or "-",
            _mean_sd([r["final"]["loss_sample"] for r in runs]),
            _mean_sd([r["final"]["loss_token"] for r in runs]),
            _mean_sd([r["final"]["exact_match"] for r in runs], digits=3),
            wall_times(mine, letters) if mine else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    tight, generous = ratio_budgets
    lines += ["", "Capacity binds (issue 34's criterion):", ""]
    lines += [
        f"- {loss_ratio(results, plans, t, tight, generous)}" for t in dict.fromkeys(p.task for p in plans)
    ]
    lines += [
        "",
        "Cells: mean ± standard deviation over seeds at the chosen lr; the lr is chosen on the validation"
        f" file (seed {seeds[0]}, lowest per-sample validation loss with the final weights), never on the"
        " test file. Wall time: mean over every run of the cell (grid included).",
        *machines_note(results),
    ]
    if any(p.grid_only for p in plans):
        lines += [
            "",
            f"(grid only): a cell run on the lr grid of seed {seeds[0]} only, to see where the budget binds;"
            " the criterion and the growth sweep use the cells with every seed.",
        ]
    if any(p.at_edge for p in plans):
        lines += [
            "",
            "(grid edge): the best lr is at an edge of the grid after its extensions; --max-lr-extensions allows more.",
        ]
    return "\n".join(lines)


def write_curve_report(
    results: Sequence[dict[str, Any]],
    folder: Path,
    plans: Sequence[CellPlan],
    seeds: Sequence[int],
    ratio_budgets: tuple[str, str],
) -> str:
    table = build_curve_table(results, plans, seeds, ratio_budgets)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.md").write_text(table + "\n")
    if results:
        curve_figure(results, plans, folder / "figures" / "curve.png")
    return table


def curve_points(
    results: Sequence[dict[str, Any]], plans: Sequence[CellPlan], task: str
) -> list[tuple[str, int, list[float], bool]]:
    """Per budget of ``task`` with a chosen lr: (budget, adapter parameters, test losses per sample of its
    seeds at that lr, whether the lr is at a grid edge), smallest budget first."""
    points = []
    for plan in plans:
        runs = _cell_runs(results, plan) if plan.task == task else []
        if runs:
            losses = [float(r["final"]["loss_sample"]) for r in runs]
            points.append((plan.budget, int(runs[0]["trainable_params"]), losses, plan.at_edge))
    return sorted(points, key=lambda p: p[1])


def curve_figure(results: Sequence[dict[str, Any]], plans: Sequence[CellPlan], path: Path) -> None:
    """Per task: test loss (per sample) against adapter parameters (log scale). Faint dots: every run of
    the lr grids; line: each budget at its chosen lr (mean over seeds, bar = min to max), named; an open
    marker where the chosen lr is still at a grid edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task_names = list(dict.fromkeys(p.task for p in plans))
    fig, axes = plt.subplots(1, len(task_names), figsize=(6 * len(task_names), 4.5), squeeze=False)
    for ax, task in zip(axes[0], task_names, strict=True):
        grid = [r for r in results if r["task"] == task and split_arm(r["arm"])[0] == "uniform"]
        ax.scatter(
            [r["trainable_params"] for r in grid],
            [r["final"]["loss_sample"] for r in grid],
            s=10,
            color="grey",
            alpha=0.35,
            label="lr grid runs",
        )
        points = curve_points(results, plans, task)
        if points:
            x = [p[1] for p in points]
            means = [statistics.fmean(p[2]) for p in points]
            low = [m - min(p[2]) for m, p in zip(means, points, strict=True)]
            high = [max(p[2]) - m for m, p in zip(means, points, strict=True)]
            ax.errorbar(x, means, yerr=[low, high], fmt="-", color="C0", capsize=3, label="chosen lr")
            for (budget, params, _, edge), mean in zip(points, means, strict=True):
                ax.plot([params], [mean], "o", color="C0", mfc="white" if edge else "C0")
                ax.annotate(budget, (params, mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(
            xscale="log",
            title=task,
            xlabel="adapter parameters",
            ylabel="test loss per sample (final weights)",
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
