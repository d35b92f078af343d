"""Statistics, table and figure of the allocation sweep (issue 27), rebuilt from the per-run JSON files.

Comparisons are paired by (task, budget, seed): an arm's relative difference in final test loss to
uniform (``primary_loss``: the label token's for classification runs, the answer tokens' per-sample mean for
generative ones) (and to its placebo) is computed per seed, then summarized by its mean and a 95% t-interval. The
number of seeds that would detect a 1% relative difference at 80% power (two-sided 5% paired test) is
``n = ((z_0.975 + z_0.8) * sd / 0.01)^2`` with ``sd`` the measured spread of the paired differences.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from quality_results import layout_agreement

#: each scorer arm's control: the same scores permuted across blocks
PLACEBO_OF = {
    "layerif": "placebo-layerif",
    "shrink-layerif": "placebo-layerif",
    "beta0.5-layerif": "placebo-layerif",
    "beta0.25-layerif": "placebo-layerif",
    "inverse-layerif": "placebo-layerif",
    "noshift-layerif": "placebo-layerif",
    "curvature": "placebo-curvature",
    "shrink-curvature": "placebo-curvature",
    "beta1-curvature": "placebo-curvature",
}
BUDGET_ORDER = {"tight": 0, "mid": 1, "generous": 2}
DETECT = 0.01  # relative difference in test loss the seed count is planned for
Z_TWO_SIDED_95, Z_POWER_80 = 1.959964, 0.841621


def t_quantile_975(df: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def mean_interval(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and half-width of its 95% t-interval (None with fewer than two values)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, t_quantile_975(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def seeds_for_power(sd: float, detect: float = DETECT) -> int:
    """Seeds so that a paired relative difference of ``detect`` is found at 80% power, 5% two-sided."""
    return max(2, math.ceil(((Z_TWO_SIDED_95 + Z_POWER_80) * sd / detect) ** 2))


def detectable_difference(sd: float, seeds: int) -> float:
    """The paired relative difference that ``seeds`` seeds find at 80% power (5% two-sided t-test):
    ``(t_0.975 + t_0.8) * sd / sqrt(n)`` with n - 1 degrees of freedom; what a table with that many seeds
    can and cannot rule out when ``seeds_for_power`` asks for more than a session can run."""
    from scipy.stats import t

    df = seeds - 1
    return float((t.ppf(0.975, df) + t.ppf(0.8, df)) * sd / math.sqrt(seeds))


def primary_loss(result: dict[str, Any]) -> float:
    """A run's primary metric, its final test loss: the label token's (classification runs) or the answer
    tokens' averaged per sample (generative runs, which record ``loss_sample`` and no label loss)."""
    final = result["final"]
    return float(final["loss_sample"] if "loss_sample" in final else final["label_loss"])


def relative_differences(
    results: Sequence[dict[str, Any]], arm: str, baseline: str, task: str, budget: str
) -> list[float]:
    """(arm - baseline) / baseline final test loss (``primary_loss``), one per seed both have."""

    def by_seed(name: str) -> dict[int, float]:
        return {
            r["seed"]: primary_loss(r)
            for r in results
            if r["arm"] == name and r["task"] == task and r["budget"] == budget
        }

    ours, theirs = by_seed(arm), by_seed(baseline)
    return [(ours[s] - theirs[s]) / theirs[s] for s in sorted(set(ours) & set(theirs))]


def _interval(values: Sequence[float]) -> str:
    return _format_interval(*mean_interval(values)) if values else "-"


def _format_interval(mean: float, half: float | None) -> str:
    return f"{100 * mean:+.2f}%" + ("" if half is None else f" ± {100 * half:.2f}")


def _mean_sd(values: Sequence[float], scale: float = 1.0, digits: int = 4) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{scale * values[0]:.{digits}f}"
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def draw_agreement(runs: Sequence[dict[str, Any]]) -> float | None:
    """Mean Spearman correlation of per-block scores between the two independent draws of each run."""
    import torch
    from torchmetrics.functional import spearman_corrcoef

    values = []
    for r in runs:
        first = (r.get("rewires") or [{}])[0].get("scores")
        second = (r.get("second_draw_scores") or [None])[0]
        if not first or not second:
            continue
        blocks = sorted(first, key=int)
        a = torch.tensor([float(first[b]) for b in blocks])
        b = torch.tensor([float(second[str(k)]) for k in blocks])
        values.append(float(spearman_corrcoef(a, b)))
    return statistics.fmean(values) if values else None


def build_table(results: Sequence[dict[str, Any]], planned: Sequence[tuple[str, str, str, int]]) -> str:
    have = {(r["task"], r["budget"], r["arm"], r["seed"]) for r in results}
    done = sum(1 for run in planned if run in have)
    lines = [f"{done} of {len(planned)} planned runs" + ("" if done == len(planned) else " (incomplete)"), ""]
    lines.append(
        "| task | budget (adapter/base) | arm | seeds | test label loss (final) | vs uniform (paired) |"
        " vs placebo (paired) | acc final (%) | MCC final | acc selected (%) | trainable params |"
        " layout agreement | score agreement | val loss jump at rewire |"
    )
    lines.append("|" + " --- |" * 14)
    groups = _groups(results)
    for task, budget in groups:
        runs = [r for r in results if r["task"] == task and r["budget"] == budget]
        uniform = [r for r in runs if r["arm"] == "uniform"]
        ratio = f"{100 * uniform[0]['trainable_params'] / uniform[0]['base_params']:.3f}%" if uniform else "?"
        for arm in dict.fromkeys(r["arm"] for r in sorted(runs, key=lambda r: _arm_order(r["arm"]))):
            mine = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
            agreement = layout_agreement(mine)
            draws = draw_agreement(mine)
            placebo = PLACEBO_OF.get(arm)
            cells = [
                task,
                f"{budget} ({ratio})",
                arm,
                ",".join(str(r["seed"]) for r in mine),
                _mean_sd([primary_loss(r) for r in mine]),
                ""
                if arm == "uniform"
                else _interval(relative_differences(results, arm, "uniform", task, budget)),
                ""
                if placebo is None
                else _interval(relative_differences(results, arm, placebo, task, budget)),
                _mean_sd([r["final"]["accuracy"] for r in mine], 100, 2),
                _mean_sd([r["final"]["mcc"] for r in mine], 1, 3),
                _mean_sd([r["selected"]["accuracy"] for r in mine], 100, 2),
                "/".join(str(p) for p in sorted({r["trainable_params"] for r in mine})),
                "-" if agreement is None else f"{agreement:+.2f}",
                "-" if draws is None else f"{draws:+.2f}",
                _rewire_jump(mine),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", power_note(results), "", moving_cost(results), "", default_choice(results)]
    return "\n".join(lines)


def _groups(results: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """The (task, budget) cells that have results, by task then budget size."""
    return sorted(
        {(r["task"], r["budget"]) for r in results}, key=lambda g: (g[0], BUDGET_ORDER.get(g[1], 9))
    )


def _rewire_jump(runs: Sequence[dict[str, Any]]) -> str:
    """Mean relative change of the validation loss on the scoring samples across the (first) rewire:
    what moving capacity costs at once, before training recovers (emptied blocks lose what they learned)."""
    jumps = [
        r["rewires"][0]["val_loss_after"] / r["rewires"][0]["val_loss_before"] - 1
        for r in runs
        if r.get("rewires") and r["rewires"][0].get("val_loss_before")
    ]
    return _mean_sd(jumps, 100, 1) + "%" if jumps else "-"


def _arm_order(arm: str) -> tuple[int, str]:
    order = ["uniform", "layerif", "curvature", "placebo-layerif", "placebo-curvature"]
    return (order.index(arm) if arm in order else len(order), arm)


def power_note(
    results: Sequence[dict[str, Any]],
    groups: Sequence[tuple[str, str]] | None = None,
    arm_order: Callable[[str], Any] | None = None,
) -> str:
    """Per arm, the paired spread against uniform, the seeds a 1% difference would need, and the
    difference the seeds run so far would detect (both at 80% power, 5% two-sided); over the (task, budget)
    ``groups`` (default: every one with results), arms sorted by ``arm_order`` (default: this sweep's)."""
    rows = []
    for task, budget in _groups(results) if groups is None else groups:
        arms = sorted(
            {r["arm"] for r in results if r["task"] == task and r["budget"] == budget},
            key=arm_order or _arm_order,
        )
        for arm in arms:
            diffs = relative_differences(results, arm, "uniform", task, budget)
            if arm == "uniform" or len(diffs) < 2:
                continue
            sd = statistics.stdev(diffs)
            rows.append(
                f"{task}/{budget}/{arm}: sd {100 * sd:.2f}% over {len(diffs)} seeds -> n = {seeds_for_power(sd)}"
                f" for 1%; {len(diffs)} seeds detect {100 * detectable_difference(sd, len(diffs)):.1f}%"
            )
    if not rows:
        return "Power: needs two paired seeds."
    return (
        "Power (paired relative difference in test loss to uniform; seeds for 1% at 80% power,"
        " n = ((1.96 + 0.84) * sd / 0.01)^2; detectable with the seeds run: (t_0.975 + t_0.8) * sd / sqrt(n)):\n\n"
        + "\n".join(f"- {row}" for row in rows)
    )


CONTROLS = ("uniform", "placebo-", "inverse-")  # arms that test the others; never a default


def blocks_moved(result: dict[str, Any]) -> int:
    """Blocks whose final expert count or rank differs from uniform's starting layout."""
    rewires = result.get("rewires") or []
    if not rewires:
        return 0
    start, end = rewires[0]["layout_before"], result["final_layout"]
    return sum(1 for block in start if start[block] != end.get(block))


def blocks_emptied(result: dict[str, Any]) -> int:
    """Blocks that end without adapter (0 experts)."""
    return sum(1 for v in result["final_layout"].values() if v["experts"] == 0)


def moving_cost(results: Sequence[dict[str, Any]]) -> str:
    """Across every run that rewired and has its paired uniform run: how its paired test-loss difference
    goes with the blocks it emptied and with the validation-loss jump at its first rewire (Spearman)."""
    import torch
    from torchmetrics.functional import spearman_corrcoef

    uniform = {(r["task"], r["budget"], r["seed"]): primary_loss(r) for r in results if r["arm"] == "uniform"}
    rows = []
    for r in results:
        base = uniform.get((r["task"], r["budget"], r["seed"]))
        first = (r.get("rewires") or [{}])[0]
        if r["arm"] == "uniform" or base is None or not first.get("val_loss_before"):
            continue
        jump = first["val_loss_after"] / first["val_loss_before"] - 1
        rows.append(((primary_loss(r) - base) / base, blocks_emptied(r), jump, blocks_moved(r)))
    if len(rows) < 3:
        return "What moving costs: needs three rewired runs with their paired uniform run."
    diffs = torch.tensor([row[0] for row in rows], dtype=torch.float64)

    def rho(column: int) -> float:
        return float(
            spearman_corrcoef(diffs, torch.tensor([row[column] for row in rows], dtype=torch.float64))
        )

    groups = {
        "moved no block": [row[0] for row in rows if row[3] == 0],
        "moved capacity but emptied no block": [row[0] for row in rows if row[3] > 0 and row[1] == 0],
        "emptied at least one block": [row[0] for row in rows if row[1] > 0],
    }
    return (
        f"What moving costs ({len(rows)} runs that rewired, each paired with uniform at its task, budget and"
        f" seed): Spearman correlation of the paired test-loss difference with the blocks the run emptied"
        f" {rho(1):+.2f}, with the validation-loss jump at its first rewire {rho(2):+.2f}. Paired difference"
        " of the runs that "
        + "; ".join(f"{name}: {_interval(d)} over {len(d)}" for name, d in groups.items())
        + "."
    )


#: the arm that runs the callback's defaults (benchmarks/allocation_sweep.py)
DEFAULT_ARM = "default"


def default_choice(
    results: Sequence[dict[str, Any]], tight: str = "tight", generous: str = "generous"
) -> str:
    """The issue's rule for the callback's defaults, computed: the candidate arm (no control) with the lowest
    mean paired difference to uniform at the tight budget, pooled over every task and seed it ran, then its
    paired difference at the generous budget, where it must not be measurably worse (the 95% interval's
    lower end above zero); the ``default`` arm's generous check too, when it ran."""
    pooled: dict[str, list[float]] = {}
    moved: dict[str, list[int]] = {}
    for task in sorted({r["task"] for r in results}):
        for arm in {r["arm"] for r in results if r["budget"] == tight and r["task"] == task}:
            if arm.startswith(CONTROLS):
                continue
            pooled.setdefault(arm, []).extend(relative_differences(results, arm, "uniform", task, tight))
            moved.setdefault(arm, []).extend(
                blocks_moved(r) for r in results if (r["arm"], r["task"], r["budget"]) == (arm, task, tight)
            )
    ranked = sorted((statistics.fmean(d), arm) for arm, d in pooled.items() if d)
    if not ranked:
        return "Default choice: needs paired runs at the tight budget."
    rows = [
        f"- {arm}: {_interval(pooled[arm])} over {len(pooled[arm])} paired runs;"
        f" blocks moved per run {statistics.fmean(moved[arm]):.1f}"
        for _, arm in ranked
    ]
    # arms that never move a block end bit-identical to uniform: a tie, and the generous check decides
    best = [arm for mean, arm in ranked if mean - ranked[0][0] <= 1e-12]
    checks = []
    # the callback's defaults run as their own arm at the generous budget (they cannot move at the tight
    # one), so their check is reported next to the tied arms'
    checked = list(best)
    if DEFAULT_ARM not in best and any(r["arm"] == DEFAULT_ARM for r in results):
        checked.append(DEFAULT_ARM)
    for task in sorted({r["task"] for r in results if r["budget"] == generous}):
        for arm in checked:
            text, worse = generous_check(results, arm, task, generous)
            verdict = "" if worse is None else " (measurably worse)" if worse else " (not measurably worse)"
            checks.append(f"{arm} on {task}: {text}{verdict}")
    return (
        "Default choice (tight budget, paired difference to uniform pooled over tasks and seeds; lower is"
        " better):\n\n"
        + "\n".join(rows)
        + f"\n\nBest at {tight}: {', '.join(best)}{' (tied)' if len(best) > 1 else ''}."
        + f" At {generous} vs uniform: {'; '.join(checks) if checks else 'not run'}."
    )


def generous_check(
    results: Sequence[dict[str, Any]], arm: str, task: str, budget: str
) -> tuple[str, bool | None]:
    """``arm``'s paired difference to uniform on ``task`` at ``budget`` as text, and whether it is measurably
    worse (its 95% interval's lower end above zero); ("not run", None) without paired runs."""
    diffs = relative_differences(results, arm, "uniform", task, budget)
    if not diffs:
        return "not run", None
    mean, half = mean_interval(diffs)
    return _interval(diffs), half is not None and mean - half > 0


def loss_figure(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Against budget, one line per arm with 95% t-intervals: the paired relative difference in test label
    loss to uniform (the comparison: seeds move every arm's loss together, so the absolute losses' own
    intervals are wide), then test label loss and accuracy with the final weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in results})
    # one style per arm across the panels: 14+ arms outrun a 10-colour cycle, so markers and dashes differ too
    every_arm = sorted({r["arm"] for r in results}, key=_arm_order)
    styles = {
        arm: {
            "color": plt.cm.tab20((2 * i) % 20 + (2 * i // 20) % 2),  # the ten dark colours, then the light
            "marker": "osD^vPX*<>"[i % 10],
            "linestyle": "-" if i < 5 or arm == DEFAULT_ARM else ":",
        }
        for i, arm in enumerate(every_arm)
    }
    fig, axes = plt.subplots(3, len(tasks), figsize=(5.5 * len(tasks), 10), squeeze=False)
    panels = (
        ("paired", "test label loss vs uniform (%, paired)"),
        ("label_loss", "test label loss"),
        ("accuracy", "test accuracy"),
    )
    for column, task in enumerate(tasks):
        runs = [r for r in results if r["task"] == task]
        arms = sorted({r["arm"] for r in runs}, key=_arm_order)
        budgets = sorted({r["budget"] for r in runs}, key=lambda b: BUDGET_ORDER.get(b, 9))
        for index, arm in enumerate(arms):
            # arms share the budgets' x values: spread them a little so the error bars stay apart
            nudge = 1.06 ** (index - (len(arms) - 1) / 2)
            for row, (key, label) in enumerate(panels):
                xs, ys, errs = [], [], []
                for budget in budgets:
                    mine = [r for r in runs if r["arm"] == arm and r["budget"] == budget]
                    uniform = [r for r in runs if r["arm"] == "uniform" and r["budget"] == budget]
                    if not mine:
                        continue
                    ref = uniform[0] if uniform else mine[0]
                    if key == "paired":
                        values = [
                            100 * d for d in relative_differences(results, arm, "uniform", task, budget)
                        ]
                    elif key == "label_loss":
                        values = [primary_loss(r) for r in mine]
                    else:
                        values = [r["final"][key] for r in mine]
                    if not values:
                        continue
                    mean, half = mean_interval(values)
                    xs.append(100 * ref["trainable_params"] / ref["base_params"] * nudge)
                    ys.append(mean)
                    errs.append(half or 0.0)
                axis = axes[row][column]
                if xs:
                    axis.errorbar(xs, ys, yerr=errs, capsize=3, label=arm, **styles[arm])
                axis.set_xscale("log")
                axis.set_xlim(0.02, 10)  # the sweep's budgets: 0.04%, 0.45%, 4.1%
                axis.set_xlabel("adapter / base parameters (%)")
                axis.set_ylabel(label)
                axis.set_title(f"{task}: {label} (final weights)")
        axes[0][column].axhline(0.0, color="grey", linewidth=0.8)
        axes[0][column].legend(fontsize=7, loc="best", framealpha=0.7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(
    results: Sequence[dict[str, Any]], folder: Path, planned: Sequence[tuple[str, str, str, int]]
) -> str:
    tasks = {run[0] for run in planned}
    results = [r for r in results if r["task"] in tasks]  # e.g. a pilot run of a task left out of the plan
    table = build_table(results, planned)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.md").write_text(table + "\n")
    if results:
        loss_figure(results, folder / "figures" / "loss_vs_budget.png")
    return table
