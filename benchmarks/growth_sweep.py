"""The growth sweep (issue 34, item 5): growth and rank moves against static uniform, where capacity binds.

Driven by ``benchmarks/allocation_sweep.py --phase grow`` (its runner, queue and one JSON per finished run
under ``benchmarks/results/grow``; reruns skip finished runs)::

    python benchmarks/allocation_sweep.py --phase curve --jobs 2          # first: uniform's lr per cell
    python benchmarks/allocation_sweep.py --phase grow --jobs 2           # the sweep, seed by seed
    python benchmarks/allocation_sweep.py --phase grow --table            # only rebuild table + figure
    python benchmarks/allocation_sweep.py --phase grow --budgets mid large --tasks facts   # narrow it
    python benchmarks/allocation_sweep.py --phase curve --quick --budgets mid   # tiny random model...
    python benchmarks/allocation_sweep.py --phase grow --quick                  # ...then its grow sweep (tested)

This file holds what is particular to the grow phase: its arms, schedule, learning rates, seeds, the reuse
of the curve's uniform runs, and the table and figure.

**Tasks and budgets.** The generative tasks where the budget binds, ``facts`` and ``translate`` (written per
run as the curve phase writes them; ``skills`` does not bind), each at its own two budgets on the steep
part of its capacity curve, ``GROW["budgets"]`` (``--budgets`` overrides; its comment gives the curve's
reason). At a budget of rank-1 experts (tiny, tight, quarter7, half7, small) growth starts on evenly
spaced blocks only (its share is below rank 1 everywhere) and the rounds choose which blocks to adapt, and
the rewire arms may empty and adapt blocks.

**Learning rate.** Every arm of a (task, budget) runs at uniform's learning rate chosen by the capacity
curve (``capacity_curve.plan_cell`` on the curve's results: lowest validation loss on the selection seed);
a cell whose lr is not chosen yet is refused before anything runs, naming the curve runs it still needs
(``--table`` shows the cells that have one and names the others).
Run names carry the lr (``layerif-grow+lr=0.004``).

**Arms** (``ARMS``; every one with the callback's scoring sample seeded by the run's seed):

- ``uniform``: no callback, the full budget from step 0. The curve's uniform runs at the chosen lr are
  these runs when the configuration matches (``reusable``: same steps, lr, precision, quick flag, no step
  override); they are copied here with ``reused_from`` set instead of run again. The grow phase validates
  every tenth of the run (the curve at the half and the end); the validation cadence does not change
  training (``tests/test_benchmark_growth_sweep.py`` checks the weights bit for bit).
- ``uniform-grow`` / ``placebo-grow`` / ``layerif-grow`` / ``curvature-grow``: growth mode
  (``LayerInfluenceCallback(growth=...)``: an even start at ``initial_fraction`` of the budget, capacity
  only added, B = 0) with the increments spread evenly (control ``uniform``), placed on permuted scores
  (control ``placebo``, LayerIF's scores), or placed by LayerIF + ``power_law`` or curvature gain + ``mdl``
  (as in the issue-27 sweep). Scores are shrunk by one standard error (``error_shrinkage: 1``, the
  callback's default: "the scores and their errors"). LoRA init for new A rows. The controls score too
  (their scores unused), so every growth arm pays the same scoring passes in its wall time.
- ``rewire-rank`` / ``placebo-rewire-rank``: today's rewire once at 30% of the steps, LayerIF +
  ``power_law`` without shrinkage (``error_shrinkage: 0``), experts fixed at the budget's count and ranks
  free (``rank_policy: scores``, ``experts_bounds`` = the budget's experts, ``rank_bounds: [1, null]``: no
  block is emptied); the placebo permutes the scores across blocks with the run's seed. At a budget of
  rank-1 experts (tiny, tight, quarter7, half7, small) no rank can move below 1, so there the rewire may
  also empty a block and adapt one that had none (``experts_bounds: [0, 1]``, ``rank_experts_bounds``):
  the only moves that exist at that budget.

Rank changes and step size: every non-uniform arm keeps each block's scaling (the callback's
``keep_scaling``, ``KEEP_SCALING``): the layer's ``lora_alpha`` moves with its rank, so the even start (a
lower rank than the budget's), every rank unit added and every rank moved by a rewire train at the
scaling uniform trains at, and uniform's lr means the same step size there. Two optional arms
(``OPTIONAL_ARMS``, run when named in ``--arms``; one of them beside the 7 makes 96 runs at 3 seeds, within
the cap): ``uniform-grow-rescaled`` is ``uniform-grow`` without kept scaling (beside it, what the step size
alone does); ``layerif-grow-gradient`` is ``layerif-grow`` with the new A rows from the growing modules'
weight-gradient directions (``growth.init: gradient``) instead of LoRA's random init.

**Growth schedule**: ``ROUNDS_AT`` = rounds after 10%, 25% and 40% of the optimizer steps (150 steps:
15, 37, 59; the schedule's ``warmup`` and ``every`` in steps). The first round comes after the lr
warm-up (10 steps), so the scores see a trained adapter rather than its initialisation; the last leaves
60% of the run to train the last increment (the issue-27 sweep's single rewire at 30% left 70%); even
spacing is what ``RewireSchedule`` (``warmup + i * every``) expresses.

**Seeds** (``seed_plan``): paired (every arm of a cell runs the same seeds), at least ``min_seeds``
(3); more when the power rule of the issue-27 sweep (``sweep_report.seeds_for_power``: the seeds that find a
1% paired difference at 80% power, from the measured spread of each arm's paired differences to
uniform) asks for more and the cap of ``max_runs`` runs (100, reused runs counted) allows them. The
default grid is 28 runs a seed, so the cap allows 3 seeds: the table's power note then says what 3 seeds
detect. The driver plans again after each batch, so one command runs it all and resumes.

**Metrics per run**: test loss over the answer tokens with the final weights (per-sample mean, the
primary, and token mean) and exact match, by ``benchmarks/peft_parity.py``'s evaluator (the curve's);
the same on the validation file; wall time; trainable adapter parameters at the start, after every
change (each growth round or rewire) and at each validation check (``params_history``); Lightning's
validation loss at each check (``val_history``). The table adds "steps to reach uniform's final loss":
the first validation check whose loss is at most the paired uniform run's final validation loss.
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import capacity_curve
import yaml
from quality_results import machine_letters, machine_of, machines_note, wall_times
from sweep_report import (
    CONTROLS,
    _format_interval,
    _interval,
    _mean_sd,
    generous_check,
    mean_interval,
    power_note,
    primary_loss,
    relative_differences,
    seeds_for_power,
)

REPO = Path(__file__).resolve().parents[1]
BUDGET_CONFIGS = REPO / "configs" / "experiments" / "allocation_sweep" / "budgets"

Run = tuple[str, str, str, int]  # task, budget, arm, seed (as in allocation_sweep)
Cell = tuple[str, str]  # task, budget

ROUNDS_AT = (0.10, 0.25, 0.40)  # growth rounds, as fractions of the optimizer steps (docstring)
VALIDATIONS = 10  # validation checks per run: every tenth of the steps
#: the callback's keep_scaling: every rank change (the growth start included) keeps the block's configured
#: scaling, so every arm trains at uniform's step size per direction at uniform's lr (docstring)
KEEP_SCALING = True
_GROWTH = {
    "rounds": len(ROUNDS_AT),
    "initial_fraction": 0.25,
    "init": "lora",
    "router_ratio": 1.0,
}
_LAYERIF = {"scorer": "layerif", "allocator": "power_law", "keep_scaling": KEEP_SCALING}
_RANK_MOVES = {
    "rank_policy": "scores",
    "experts_bounds": "{experts}",
    "rank_bounds": [1, None],
    "error_shrinkage": 0.0,
}
#: arm -> LayerInfluenceCallback arguments over allocation_sweep's common ones; "{seed}" is the run's
#: seed, "{experts}" the rewire's experts_bounds at the budget (``rank_experts_bounds``); growth arms get
#: their schedule from ``growth_schedule``.
ARMS: dict[str, dict[str, Any] | None] = {
    "uniform": None,
    "uniform-grow": {**_LAYERIF, "growth": {**_GROWTH, "control": "uniform"}},
    "placebo-grow": {**_LAYERIF, "growth": {**_GROWTH, "control": "placebo"}},
    "layerif-grow": {**_LAYERIF, "growth": {**_GROWTH, "control": "none"}},
    "curvature-grow": {
        "scorer": "curvature_gain",
        "allocator": "mdl",
        "keep_scaling": KEEP_SCALING,
        "growth": {**_GROWTH, "control": "none"},
    },
    "rewire-rank": {**_LAYERIF, "allocator_options": _RANK_MOVES},
    "placebo-rewire-rank": {
        **_LAYERIF,
        "scorer": "placebo",
        "scorer_options": {"scorer": "layerif", "seed": "{seed}"},
        "allocator_options": _RANK_MOVES,
    },
    # optional (--arms), not in GROW: uniform-grow whose rank changes rescale the step size (lora_alpha / r),
    # beside uniform-grow it shows what the step size alone does
    "uniform-grow-rescaled": {**_LAYERIF, "keep_scaling": False, "growth": {**_GROWTH, "control": "uniform"}},
    # optional (--arms), not in GROW: layerif-grow whose new A rows are the blocks' weight-gradient directions
    "layerif-grow-gradient": {**_LAYERIF, "growth": {**_GROWTH, "control": "none", "init": "gradient"}},
}
#: arms run only when named in --arms (the 7 others x 2 tasks x 2 budgets x 3 seeds are 84 runs of the 100)
OPTIONAL_ARMS = ("uniform-grow-rescaled", "layerif-grow-gradient")
#: each scored arm's control with the same increments or moves at random blocks
PLACEBO_OF = {"layerif-grow": "placebo-grow", "rewire-rank": "placebo-rewire-rank"}

GROW: dict[str, Any] = {
    # The generative tasks where the budget binds (the capacity curve's criterion, test loss at tight /
    # at large >= 1.3 on each seed): facts (1.67, 1.99, 1.79 on seeds 0-2) and translate (2.17, 2.62,
    # 3.40); skills does not (1.14 on seed 0), so the sweep leaves it out.
    "tasks": ["facts", "translate"],
    # Per task, two budgets on the steep part of its capacity curve (benchmarks/results/curve/table.md;
    # test loss at each budget's best lr, mean over seeds 0-2 unless said). Facts falls from 1.58 (tight)
    # through 1.19 (quarter7: all 7 projections on 8 of 30 blocks) to 0.97 (half7: on 15 blocks) and
    # little further (small, every block: 0.85; large 0.87; mid 0.91 on seed 0), while q/v rank buys
    # little (qv2 1.55, qv4 1.52; seed 0): quarter7 and half7. Translate is flat there (quarter7 1.44,
    # half7 1.37) and falls above (small 1.19, large 0.68): half7 and small. At these rank-1 budgets
    # growth starts on evenly spaced blocks and its rounds choose which blocks to adapt, and the rewire
    # arms move whole blocks. ``--budgets`` gives every task the same budgets instead.
    "budgets": {"facts": ["quarter7", "half7"], "translate": ["half7", "small"]},
    "arms": [arm for arm in ARMS if arm not in OPTIONAL_ARMS],
    "min_seeds": 3,
    "max_runs": 100,
}
GROW_QUICK: dict[str, Any] = {
    **GROW,
    "tasks": ["facts"],
    "budgets": {"facts": ["mid"]},
    "arms": ["uniform", "uniform-grow", "layerif-grow", "rewire-rank"],
    "min_seeds": 2,
    "max_runs": 8,
}


class GrowPlanError(ValueError):
    """The grow phase cannot be planned as asked (nothing has been run or written)."""


# ---------------------------------------------------------------------------------------------- arms
def budget_adapter(budget: str) -> dict[str, Any]:
    """The budget's uniform layout (``model.adapter`` of its YAML): experts and rank per block."""
    return yaml.safe_load((BUDGET_CONFIGS / f"{budget}.yaml").read_text())["model"]["adapter"]


def growth_schedule(steps: int) -> dict[str, int]:
    """``RewireSchedule`` arguments for rounds at ``ROUNDS_AT`` of ``steps`` optimizer steps (evenly spaced,
    so a warm-up and a period; each at least one step)."""
    warmup = max(1, round(ROUNDS_AT[0] * steps))
    every = max(1, round((ROUNDS_AT[1] - ROUNDS_AT[0]) * steps))
    return {"warmup": warmup, "every": every, "max_rewires": len(ROUNDS_AT)}


def validation_interval(steps: int) -> int:
    return max(1, steps // VALIDATIONS)


def arm_callback(
    arm: str, seed: int, budget: str, steps: int, common: dict[str, Any]
) -> dict[str, Any] | None:
    """The grow-phase arm's ``LayerInfluenceCallback`` init_args (None: no callback)."""
    spec = ARMS[capacity_curve.split_arm(arm)[0]]
    if spec is None:
        return None
    text = json.dumps({**common, "seed": "{seed}", **spec}).replace('"{seed}"', str(seed))
    if '"{experts}"' in text:  # the rewire arms
        text = text.replace('"{experts}"', json.dumps(rank_experts_bounds(budget)))
    args: dict[str, Any] = json.loads(text)
    args["allocator_options"] = {"error_shrinkage": 1.0, **args.get("allocator_options", {})}
    if "growth" in spec:
        args["schedule"] = growth_schedule(steps)
    return args


def rank_experts_bounds(budget: str) -> list[int]:
    """The rewire arms' ``experts_bounds`` at ``budget``: its expert count, fixed (rank moves only), or at a
    budget of rank-1 experts, where no rank can move below 1, ``[0, 1]`` (blocks emptied and adapted)."""
    adapter = budget_adapter(budget)
    experts = adapter.get("experts", 1)
    if int(adapter.get("rank", 1)) < 2 or isinstance(experts, dict):
        return [0, max(experts.values()) if isinstance(experts, dict) else int(experts)]
    return [int(experts), int(experts)]


# ---------------------------------------------------------------------------------------------- plan
def grow_cells(tasks: Sequence[str], budgets: Mapping[str, Sequence[str]]) -> list[Cell]:
    """The (task, budget) cells, in budget order then task order; ``budgets`` maps each task to its own."""
    missing = [t for t in tasks if t not in budgets]
    if missing:
        raise GrowPlanError(
            f"--phase grow: no budgets for task(s) {', '.join(missing)} in GROW['budgets'] (it has"
            f" {', '.join(budgets)}); name them with --budgets"
        )
    cells = [(t, b) for t in tasks for b in budgets[t]]
    return sorted(cells, key=lambda c: (_budget_order(c[1]), list(tasks).index(c[0])))


def chosen_lrs(
    curve_results: Sequence[dict[str, Any]],
    cells: Sequence[Cell],
    curve: dict[str, Any],
    curve_folder: Path,
    partial: bool = False,
) -> dict[Cell, float]:
    """Uniform's lr per (task, budget), chosen by the capacity curve; GrowPlanError naming the curve runs
    still missing for any cell without one, unless ``partial`` (a table of what has finished): then only
    the cells whose lr is chosen."""
    plans = [
        capacity_curve.plan_cell(curve_results, t, b, curve["lrs"], curve["seeds"], curve["max_extensions"])
        for t, b in cells
    ]
    missing = [p for p in plans if p.chosen is None]
    if missing and not partial:
        needs = "; ".join(
            f"{p.task}/{p.budget}: " + ", ".join(capacity_curve.run_name(r) for r in p.todo) for p in missing
        )
        raise GrowPlanError(
            f"--phase grow: uniform's learning rate is not chosen yet for {len(missing)} cell(s); the capacity"
            f" curve in {curve_folder} still needs {needs}. Run `python benchmarks/allocation_sweep.py"
            " --phase curve` (same --quick) first, or narrow --tasks/--budgets to cells whose lr is chosen."
        )
    return {(p.task, p.budget): float(p.chosen) for p in plans if p.chosen is not None}


def seed_plan(
    results: Sequence[dict[str, Any]],
    cells: Sequence[Cell],
    arms: Sequence[str],
    lrs: dict[Cell, float],
    min_seeds: int,
    max_runs: int,
) -> tuple[list[int], str]:
    """Seeds 0..n-1 for every cell and arm (paired), and why n: the power rule's largest need over the arms
    with two paired seeds so far, at least ``min_seeds``, at most what ``max_runs`` allows."""
    per_seed = len(cells) * len(arms)
    cap = max_runs // per_seed if per_seed else 0
    if cap < min_seeds:
        raise GrowPlanError(
            f"--phase grow: {len(cells)} cell(s) x {len(arms)} arms x {min_seeds} seeds = {per_seed * min_seeds}"
            f" runs, over the cap of {max_runs}; narrow --tasks/--budgets/--arms"
        )
    named = [
        {**r, "arm": capacity_curve.split_arm(r["arm"])[0]}
        for r in results
        if (r["task"], r["budget"]) in lrs
        and capacity_curve.split_arm(r["arm"])[1] == lrs[r["task"], r["budget"]]
    ]
    needs = []
    for task, budget in cells:
        for arm in arms:
            diffs = relative_differences(named, arm, "uniform", task, budget)
            if arm != "uniform" and len(diffs) >= 2:
                needs.append((seeds_for_power(statistics.stdev(diffs)), f"{task}/{budget}/{arm}"))
    if not needs:
        why = f"{min_seeds} seeds (the minimum; the power rule needs two paired seeds)"
        return list(range(min_seeds)), why
    need, where = max(needs)
    n = min(max(min_seeds, need), cap)
    why = f"{n} seeds: the power rule asks for {need} ({where}, 1% at 80% power)"
    return list(range(n)), why + ("" if n >= need else f", the cap of {max_runs} runs allows {cap}")


def plan_runs(
    cells: Sequence[Cell], arms: Sequence[str], seeds: Sequence[int], lrs: dict[Cell, float]
) -> list[Run]:
    """Seed by seed, then cell (``grow_cells``' order), arm: an interrupted sweep has whole paired seeds to
    compare. Cells without an lr in ``lrs`` are left out."""
    return [
        (t, b, capacity_curve.lr_arm(lrs[t, b], a), s)
        for s in seeds
        for t, b in cells
        if (t, b) in lrs
        for a in arms
    ]


def reusable(curve_run: dict[str, Any], steps: int, quick: bool, max_steps: int | None) -> bool:
    """The curve's uniform run is the grow phase's uniform run: same steps, no step override, same quick
    flag, precision and no callback (the task files, budget and lr are in its name)."""
    return (
        curve_run.get("callback") is None
        and curve_run.get("steps") == steps
        and curve_run.get("quick") == quick
        and curve_run.get("max_steps_override") == max_steps
        and curve_run.get("precision") == "32-true"
    )


def reuse_uniform_runs(
    todo: Sequence[Run],
    curve_folder: Path,
    folder: Path,
    steps: int,
    quick: bool,
    max_steps: int | None,
) -> list[Run]:
    """Copy the curve's matching uniform runs into ``folder`` (``reused_from`` added); the runs left to do."""
    left = []
    for run in todo:
        source = curve_folder / f"{capacity_curve.run_name(run)}.json"
        if capacity_curve.split_arm(run[2])[0] == "uniform" and source.exists():
            result = json.loads(source.read_text())
            if reusable(result, steps, quick, max_steps):
                result["reused_from"] = str(
                    source.relative_to(REPO) if source.is_relative_to(REPO) else source
                )
                target = folder / source.name
                folder.mkdir(parents=True, exist_ok=True)
                tmp = target.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(result, indent=1))
                shutil.move(tmp, target)
                continue
        left.append(run)
    return left


# ---------------------------------------------------------------------------------------------- table
def steps_to_reach(run: dict[str, Any], uniform: dict[str, Any] | None) -> int | None:
    """The step of ``run``'s first validation check whose loss is at most the paired uniform run's final
    validation loss (Lightning's, at its last check); None if it never is or there is no uniform run."""
    if uniform is None or not uniform.get("val_history") or not run.get("val_history"):
        return None
    target = float(uniform["val_history"][-1][1])
    return next((int(step) for step, loss in run["val_history"] if float(loss) <= target), None)


def _arm_order(arm: str) -> tuple[int, str]:
    return list(ARMS).index(capacity_curve.split_arm(arm)[0]), arm


def _cell_arms(results: Sequence[dict[str, Any]], task: str, budget: str) -> list[str]:
    return sorted({r["arm"] for r in results if (r["task"], r["budget"]) == (task, budget)}, key=_arm_order)


def _steps_cell(runs: Sequence[dict[str, Any]], uniform: dict[int, dict[str, Any]]) -> str:
    reached = [steps_to_reach(r, uniform.get(r["seed"])) for r in runs if r["seed"] in uniform]
    hit = [s for s in reached if s is not None]
    if not reached:
        return "-"
    return (f"{statistics.fmean(hit):.0f}" if hit else "never") + f" ({len(hit)} of {len(reached)})"


def params_history(run: dict[str, Any]) -> list[list]:
    """``[step, adapter params, event]`` over the run; a run without the record (the curve's uniform runs
    from before it existed) had no callback, so its trainable parameters at its start and end."""
    if run.get("params_history"):
        return [list(entry) for entry in run["params_history"]]
    if run.get("callback") is None:
        return [[0, run["trainable_params"], "start"], [run["steps"], run["trainable_params"], "end"]]
    return []


def _params_cell(runs: Sequence[dict[str, Any]]) -> str:
    histories = [h for r in runs if (h := params_history(r))]
    start = sorted({int(h[0][1]) for h in histories})
    end = sorted({int(h[-1][1]) for h in histories})
    if not start:
        return "-"
    text = "/".join(f"{p:,}" for p in start)
    return text if start == end else text + " -> " + "/".join(f"{p:,}" for p in end)


def build_grow_table(results: Sequence[dict[str, Any]], planned: Sequence[Run], seeds_why: str) -> str:
    have = {(r["task"], r["budget"], r["arm"], r["seed"]) for r in results}
    done = sum(1 for run in planned if run in have)
    reused = sum(
        1
        for r in results
        if r.get("reused_from") and (r["task"], r["budget"], r["arm"], r["seed"]) in set(planned)
    )
    lines = [
        f"{done} of {len(planned)} planned runs ({reused} uniform runs reused from the capacity curve)"
        + ("" if done == len(planned) else " (incomplete: rerun the command to add the rest)"),
        f"Seeds: {seeds_why}.",
        "",
        "| task | budget (adapter/base) | arm | lr | seeds | test loss (per sample) | vs uniform (paired) |"
        " vs placebo (paired) | test loss (per token) | exact match | steps to uniform's final val loss |"
        " adapter params (start -> end) | wall time (min) | code |",
        "|" + " --- |" * 14,
    ]
    named = [{**r, "arm": capacity_curve.split_arm(r["arm"])[0]} for r in results]
    letters = machine_letters(results)
    cells = sorted({(r["task"], r["budget"]) for r in results}, key=lambda c: (c[0], _budget_order(c[1])))
    for task, budget in cells:
        mine = [r for r in named if (r["task"], r["budget"]) == (task, budget)]
        uniform = {r["seed"]: r for r in mine if r["arm"] == "uniform"}
        any_run = next(iter(uniform.values()), mine[0])
        ratio = f"{100 * any_run['trainable_params'] / any_run['base_params']:.3f}%"
        for arm in _cell_arms(mine, task, budget):
            runs = sorted((r for r in mine if r["arm"] == arm), key=lambda r: r["seed"])
            placebo = PLACEBO_OF.get(arm)
            cells_ = [
                task,
                f"{budget} ({ratio})",
                arm,
                "/".join(sorted({f"{r['lr']:g}" for r in runs})),
                ",".join(str(r["seed"]) for r in runs),
                _mean_sd([primary_loss(r) for r in runs]),
                ""
                if arm == "uniform"
                else _interval(relative_differences(mine, arm, "uniform", task, budget)),
                "" if placebo is None else _interval(relative_differences(mine, arm, placebo, task, budget)),
                _mean_sd([r["final"]["loss_token"] for r in runs]),
                _mean_sd([r["final"]["exact_match"] for r in runs], digits=3),
                _steps_cell(runs, uniform),
                _params_cell(runs),
                wall_times(runs, letters),
                "/".join(sorted({str(r.get("code", "?")) for r in runs})),
            ]
            lines.append("| " + " | ".join(cells_) + " |")
    lines += [
        "",
        "Cells: mean ± standard deviation over seeds; paired columns: mean ± half-width of the 95%"
        " t-interval of the per-seed relative difference in test loss (per sample, final weights). Steps:"
        " mean step of the first validation check at or below the paired uniform run's final validation"
        " loss, over the runs that reach it (k of n).",
        *machines_note(results),
        "",
        cross_machine_pairs(named),
        "",
        "Summary: paired relative difference in test loss to uniform (mean ± 95% interval over seeds;"
        " lower is better; **bold**: the interval excludes 0):",
        "",
        summary_table(named, cells),
        "",
        placement_note(named, cells),
        "",
        power_note(named, cells, _arm_order),
        "",
        default_choice(named, cells),
    ]
    return "\n".join(lines)


def summary_table(named: Sequence[dict[str, Any]], cells: Sequence[Cell]) -> str:
    """One row per (task, budget): uniform's test loss and each arm's paired relative difference to it
    (mean ± 95% interval over seeds, bold where the interval excludes 0), as docs/experiments.md shows the
    budget sweep's."""
    arms = [a for a in ARMS if a != "uniform" and any(r["arm"] == a for r in named)]
    lines = [
        "| task | budget | uniform (test loss) | " + " | ".join(arms) + " |",
        "|" + " --- |" * (3 + len(arms)),
    ]

    def cell(diffs: list[float]) -> str:
        if not diffs:
            return "-"
        mean, half = mean_interval(diffs)
        text = _format_interval(mean, half)
        return f"**{text}**" if half is not None and abs(mean) > half else text

    for task, budget in cells:
        uniform = [
            primary_loss(r) for r in named if (r["task"], r["budget"], r["arm"]) == (task, budget, "uniform")
        ]
        row = [task, budget, _mean_sd(uniform)]
        row += [cell(relative_differences(named, arm, "uniform", task, budget)) for arm in arms]
        lines.append("| " + " | ".join(row) + " |")
    if len(cells) > 1:  # every pair of every cell as one sample: the direction an arm takes across tasks
        pooled = [cell(pooled_differences(named, arm, "uniform", cells)) for arm in arms]
        lines.append("| all cells | pooled | - | " + " | ".join(pooled) + " |")
    return "\n".join(lines)


def pooled_differences(
    named: Sequence[dict[str, Any]], arm: str, baseline: str, cells: Sequence[Cell]
) -> list[float]:
    """The paired relative differences of ``arm`` to ``baseline`` in every cell, as one sample."""
    return [d for task, budget in cells for d in relative_differences(named, arm, baseline, task, budget)]


def placement_note(named: Sequence[dict[str, Any]], cells: Sequence[Cell]) -> str:
    """Each scored arm against its placebo (the same increments or moves at random blocks), pooled over
    every pair of every cell: what the scores' placement adds beyond moving capacity at all."""
    parts = []
    for arm, placebo in PLACEBO_OF.items():
        diffs = pooled_differences(named, arm, placebo, cells)
        if diffs:
            parts.append(f"{arm} vs {placebo} {_interval(diffs)} over {len(diffs)} pairs")
    body = "; ".join(parts) if parts else "needs paired runs"
    return f"Placement (scored arm vs its placebo, paired, pooled over the cells): {body}."


def default_choice(named: Sequence[dict[str, Any]], cells: Sequence[Cell]) -> str:
    """The issue's rule for the callback's defaults (as in the budget sweep), computed on this sweep: the
    option with the lowest mean paired difference to uniform at each task's tighter budget, pooled over
    tasks and seeds, among the candidate arms (no control) and uniform itself (0: the callback's defaults,
    growth off); a candidate only if it is not measurably worse than uniform at each task's other budget
    (its 95% interval's lower end above zero)."""
    by_task: dict[str, list[str]] = {}
    for task, budget in cells:
        by_task.setdefault(task, []).append(budget)
    if not by_task:
        return "Default choice: needs paired runs."
    tight = {t: min(b, key=_budget_order) for t, b in sorted(by_task.items())}
    generous = {t: max(b, key=_budget_order) for t, b in sorted(by_task.items())}
    at_tight, at_generous = _per_task(tight), _per_task(generous)
    candidates = sorted({r["arm"] for r in named if not r["arm"].startswith(CONTROLS)}, key=_arm_order)
    pooled = {arm: pooled_differences(named, arm, "uniform", list(tight.items())) for arm in candidates}
    pooled = {arm: diffs for arm, diffs in pooled.items() if diffs}
    if not pooled:
        return f"Default choice: needs paired runs at {at_tight}."
    rows = [f"- {arm}: {_interval(diffs)} over {len(diffs)} paired runs" for arm, diffs in pooled.items()]
    best_mean, best = min([(statistics.fmean(d), arm) for arm, d in pooled.items()] + [(0.0, "uniform")])
    head = (
        f"Default choice (the rule: lowest mean paired difference to uniform at {at_tight}, pooled over"
        f" tasks and seeds, uniform itself at 0; not measurably worse at {at_generous}):\n\n"
        + "\n".join(rows)
        + "\n\n"
    )
    stay = "the callback's defaults stay (growth off)."
    if best == "uniform":
        return head + f"No candidate is below uniform on average at {at_tight}: {stay}"
    checks = {task: generous_check(named, best, task, b) for task, b in generous.items()}
    check_text = f"at {at_generous} vs uniform: " + "; ".join(
        f"{t}: {text}" for t, (text, _) in checks.items()
    )
    best_at = head + f"Best at {at_tight}: {best} ({100 * best_mean:+.2f}%)"
    if any(worse is None for _, worse in checks.values()):
        return best_at + f"; its check {check_text}: pending."
    if any(worse for _, worse in checks.values()):
        return best_at + f", measurably worse {check_text}: {stay}"
    become = f"the defaults become {best}'s options (ARMS in benchmarks/growth_sweep.py)."
    return best_at + f", not measurably worse {check_text}: {become}"


def cross_machine_pairs(named: Sequence[dict[str, Any]]) -> str:
    """The footnote naming each paired run whose uniform partner ran on another machine: the same run gives
    different losses on two machines (benchmarks/machine_check.py), so such a pair's difference holds the
    machine's too."""
    uniform = {(r["task"], r["budget"], r["seed"]): machine_of(r) for r in named if r["arm"] == "uniform"}
    crossed = sorted(
        (r["task"], _budget_order(r["budget"]), r["budget"], r["seed"], _arm_order(r["arm"]), r["arm"])
        for r in named
        if r["arm"] != "uniform"
        and uniform.get((r["task"], r["budget"], r["seed"]), machine_of(r)) != machine_of(r)
    )
    if not crossed:
        return "Every paired run ran on the same machine as its uniform partner."
    listed = "; ".join(f"{task}/{budget} seed {seed} {arm}" for task, _, budget, seed, _, arm in crossed)
    return (
        f"Paired across machines (the difference holds the machine's too, see benchmarks/machine_check.py):"
        f" {listed}."
    )


def _per_task(budget_of: dict[str, str]) -> str:
    """``quarter7`` when every task has the same budget, else ``facts quarter7, translate half7``."""
    if len(set(budget_of.values())) == 1:
        return next(iter(budget_of.values()))
    return ", ".join(f"{task} {budget}" for task, budget in budget_of.items())


def _budget_order(budget: str) -> int:
    order = capacity_curve.BUDGET_ORDER
    return order.index(budget) if budget in order else len(order)


def grow_figure(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Per (task, budget): validation loss and trainable adapter parameters against the step (mean over
    seeds, per arm), and each arm's paired test-loss difference to uniform with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    named = [{**r, "arm": capacity_curve.split_arm(r["arm"])[0]} for r in results]
    cells = sorted({(r["task"], r["budget"]) for r in named}, key=lambda c: (c[0], _budget_order(c[1])))
    arms = [a for a in ARMS if any(r["arm"] == a for r in named)]
    colors = {a: plt.cm.tab10(i % 10) for i, a in enumerate(ARMS)}
    fig, axes = plt.subplots(3, len(cells), figsize=(5.5 * len(cells), 11), squeeze=False)
    for column, (task, budget) in enumerate(cells):
        mine = [r for r in named if (r["task"], r["budget"]) == (task, budget)]
        for arm in arms:
            runs = [r for r in mine if r["arm"] == arm]
            for row, key in ((0, "val_history"), (1, "params_history")):
                by_step: dict[int, list[float]] = {}
                for r in runs:
                    for entry in (r.get(key) or []) if row == 0 else params_history(r):
                        by_step.setdefault(int(entry[0]), []).append(float(entry[1]))
                if by_step:
                    steps = sorted(by_step)
                    axes[row][column].plot(
                        steps,
                        [statistics.fmean(by_step[s]) for s in steps],
                        marker=".",
                        label=arm,
                        color=colors[arm],
                        drawstyle="default" if row == 0 else "steps-post",  # parameters jump at rounds
                    )
        axes[0][column].set(
            title=f"{task} / {budget}", xlabel="step", ylabel="validation loss (mean over seeds)"
        )
        axes[1][column].set(xlabel="step", ylabel="trainable adapter parameters (mean)")
        bars = [(a, relative_differences(mine, a, "uniform", task, budget)) for a in arms if a != "uniform"]
        bars = [(a, d) for a, d in bars if d]
        for i, (arm, diffs) in enumerate(bars):
            mean, half = mean_interval([100 * d for d in diffs])
            axes[2][column].errorbar([i], [mean], yerr=[half or 0.0], fmt="o", capsize=4, color=colors[arm])
        axes[2][column].set_xticks(
            range(len(bars)), [a for a, _ in bars], rotation=30, ha="right", fontsize=8
        )
        axes[2][column].axhline(0.0, color="grey", linewidth=0.8)
        axes[2][column].set_ylabel("test loss vs uniform (%, paired, 95% CI)")
        axes[0][column].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_grow_report(
    results: Sequence[dict[str, Any]], folder: Path, planned: Sequence[Run], seeds_why: str
) -> str:
    cells = {(run[0], run[1]) for run in planned}
    arms = {run[2] for run in planned}
    mine = [r for r in results if (r["task"], r["budget"]) in cells and r["arm"] in arms]
    table = build_grow_table(mine, planned, seeds_why)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.md").write_text(table + "\n")
    if mine:
        grow_figure(mine, folder / "figures" / "grow.png")
    return table
