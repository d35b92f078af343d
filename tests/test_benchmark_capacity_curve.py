"""The capacity curve (issue 34): --phase curve --quick end to end (in process), its lr selection against
the runs' own validation losses, its grid growth, its validation files and its ratio."""

from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import allocation_sweep  # noqa: E402
import capacity_curve  # noqa: E402
import tasks  # noqa: E402


def in_process(started: list[list]) -> object:
    """run_pending without subprocesses (the queue itself is covered by the sweep's test): seconds. Also
    the growth sweep's test's."""

    def run_pending(args, folder, todo):
        started.append(list(todo))
        for run in todo:
            name = allocation_sweep.run_name(run)
            workdir = Path(args.workdir) / name
            allocation_sweep.run_one(
                run, folder / f"{name}.json", workdir, args.quick, args.max_steps, args.phase
            )

    return run_pending


def test_quick_curve_chooses_lr_on_validation_runs_seeds_resumes_and_tabulates(tmp_path, monkeypatch, capsys):
    started: list[list] = []
    monkeypatch.setattr(allocation_sweep, "run_pending", in_process(started))
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    results, workdir = tmp_path / "results", tmp_path / "work"
    argv = ["--phase", "curve", "--quick", "--results", str(results), "--workdir", str(workdir)]
    assert allocation_sweep.main(argv) == 0
    out = capsys.readouterr().out
    quick = allocation_sweep.CURVE_QUICK
    # round 1: the grid on seed 0; round 2: the other seed at the chosen lr
    assert [len(r) for r in started] == [len(quick["budgets"]) * len(quick["lrs"]), len(quick["budgets"])]
    assert {run[3] for run in started[0]} == {0} and {run[3] for run in started[1]} == {1}
    loaded = allocation_sweep.load_results_of(results)
    assert len(loaded) == 6 and "6 of 6 runs" in out
    for budget in quick["budgets"]:
        grid = [r for r in loaded if r["budget"] == budget and r["seed"] == 0]
        assert sorted(r["lr"] for r in grid) == sorted(quick["lrs"])
        best = min(grid, key=lambda r: r["validation"]["loss_sample"])  # never the test loss
        seeds = [r for r in loaded if r["budget"] == budget and r["arm"] == best["arm"]]
        assert sorted(r["seed"] for r in seeds) == [0, 1]
        assert all(r["lr"] == best["lr"] for r in seeds)
        for r in grid + seeds:
            assert r["steps"] == 6 and r["final"]["rows"] == 18 and r["validation"]["rows"] == 8
            assert 0.0 <= r["final"]["exact_match"] <= 1.0 and r["selected"] is None
            # the evaluator's validation loss is Lightning's own at the last check (same weights)
            assert r["val_history"][-1][0] == 6
            assert r["validation"]["loss_sample"] == pytest.approx(r["val_history"][-1][1], rel=1e-5)
        mean = statistics.fmean(r["final"]["loss_sample"] for r in seeds)
        sd = statistics.stdev(r["final"]["loss_sample"] for r in seeds)
        assert f"| facts | {budget} | " in out and f"{mean:.4f} ± {sd:.4f}" in out
        assert f"{best['validation']['loss_sample']:.4f}" in out
    low = [r for r in loaded if r["budget"] == "tight" and r["seed"] == 1][0]
    high = [r for r in loaded if r["budget"] == "mid" and r["seed"] == 1][0]
    ratio_seed1 = low["final"]["loss_sample"] / high["final"]["loss_sample"]
    assert f"1: {ratio_seed1:.2f}" in out and "does not meet (yet)" in out  # 2 seeds only
    assert (results / "table.md").read_text().strip() in out
    assert (results / "figures" / "curve.png").stat().st_size > 0

    started.clear()
    assert allocation_sweep.main(argv) == 0
    assert started == []  # nothing left to run
    assert allocation_sweep.main([*argv, "--table"]) == 0 and started == []


def _result(budget: str, lr: float, seed: int, val: float, test: float = 1.0) -> dict:
    return {
        "task": "facts",
        "budget": budget,
        "arm": capacity_curve.lr_arm(lr),
        "seed": seed,
        "validation": {"loss_sample": val},
        "final": {"loss_sample": test},
    }


def test_cell_plan_grid_then_seeds_at_the_lowest_validation_loss() -> None:
    def plan(results, extensions=1):
        return capacity_curve.plan_cell(results, "facts", "mid", [2e-3, 4e-3, 8e-3], [0, 1, 2], extensions)

    first = plan([])
    assert first.todo == [("facts", "mid", f"uniform+lr={lr:g}", 0) for lr in (2e-3, 4e-3, 8e-3)]
    # test loss would pick 2e-3; validation picks 4e-3
    grid = [
        _result("mid", 2e-3, 0, 0.9, 0.1),
        _result("mid", 4e-3, 0, 0.5, 0.9),
        _result("mid", 8e-3, 0, 0.7),
    ]
    chosen = plan(grid)
    assert chosen.chosen == 4e-3 and not chosen.at_edge
    # another arm's run at a grid lr is not the uniform grid's: it neither fills nor picks a point
    other = {**_result("mid", 8e-3, 0, 0.1), "arm": capacity_curve.lr_arm(8e-3, "scored")}
    assert plan([*grid[:2], other]).todo == [("facts", "mid", "uniform+lr=0.008", 0)]
    assert plan([*grid, other]).chosen == 4e-3
    assert chosen.todo == [("facts", "mid", "uniform+lr=0.004", s) for s in (1, 2)]
    assert plan([*grid, _result("mid", 4e-3, 2, 0.5)]).todo == [("facts", "mid", "uniform+lr=0.004", 1)]
    # best at the low edge: one step of the grid's spacing below, then choose (interior or edge)
    low = [_result("mid", 2e-3, 0, 0.4), _result("mid", 4e-3, 0, 0.5), _result("mid", 8e-3, 0, 0.7)]
    grown = plan(low)
    assert grown.grid == [1e-3, 2e-3, 4e-3, 8e-3] and grown.todo == [("facts", "mid", "uniform+lr=0.001", 0)]
    assert grown.chosen is None
    interior = plan([*low, _result("mid", 1e-3, 0, 0.45)])
    assert interior.chosen == 2e-3 and not interior.at_edge
    edge = plan([*low, _result("mid", 1e-3, 0, 0.3)])
    assert edge.chosen == 1e-3 and edge.at_edge  # one extension allowed: the table flags it
    assert plan(low, extensions=0).chosen == 2e-3 and plan(low, extensions=0).at_edge
    assert capacity_curve.expected_runs([grown, interior], [0, 1, 2]) == (4 + 2) * 2
    # counted: the grid on seed 0 and the chosen lr's seeds; not a run at an lr outside the grid
    extra = [_result("mid", 4e-3, 1, 0.5), _result("mid", 1.6e-2, 0, 0.1)]
    assert capacity_curve.finished_runs([*grid, *extra], [chosen], [0, 1, 2]) == 4


def test_loss_ratio_is_the_issues_criterion_per_seed() -> None:
    # the other lr of each cell, worse on validation (its test loss would change every ratio)
    results = [_result("tight", 2e-3, 0, 9.0, 0.1), _result("large", 4e-3, 0, 9.0, 9.0)]
    for seed, (tight, large) in enumerate(((1.4, 1.0), (2.8, 2.0), (1.3, 1.0))):
        results += [_result("tight", 4e-3, seed, 0.0, tight), _result("large", 2e-3, seed, 0.0, large)]
    plans = capacity_curve.plan_curve(results, ["facts"], ["tight", "large"], [2e-3, 4e-3], [0, 1, 2], 0)
    # both at an edge of a 2-value grid, with no extensions allowed
    assert [p.chosen for p in plans] == [4e-3, 2e-3]
    text = capacity_curve.loss_ratio(results, plans, "facts", "tight", "large")
    # means: (1.4 + 2.8 + 1.3) / 3 / ((1 + 2 + 1) / 3) = 5.5 / 4
    assert f"= {5.5 / 4:.2f} (means" in text and "0: 1.40, 1: 1.40, 2: 1.30" in text and "-> meets" in text
    results[-2]["final"]["loss_sample"] = 1.29
    plans = capacity_curve.plan_curve(results, ["facts"], ["tight", "large"], [2e-3, 4e-3], [0, 1, 2], 0)
    assert "does not meet" in capacity_curve.loss_ratio(results, plans, "facts", "tight", "large")


_FINAL = {"loss_sample": 1.0, "loss_token": 1.0, "exact_match": 0.0}


def test_grid_only_cells_run_the_selection_seeds_grid_and_no_other_seed() -> None:
    grid = [_result("tiny", 2e-3, 0, 0.9), _result("tiny", 4e-3, 0, 0.5), _result("tiny", 8e-3, 0, 0.7)]
    args = ([2e-3, 4e-3, 8e-3], [0, 1, 2], 1)
    plans = capacity_curve.plan_curve(
        grid, ["facts"], ["tight"], *args, {"facts": ["tiny"], "skills": ["mid"]}
    )
    tiny, tight, skills = plans  # in task order, then budget order; a grid-only task needs no budgets
    assert (skills.task, skills.budget, skills.grid_only, len(skills.todo)) == ("skills", "mid", True, 3)
    plans = plans[:2]
    assert (tiny.budget, tiny.grid_only, tiny.chosen, tiny.todo) == ("tiny", True, 4e-3, [])
    assert tight.todo == [("facts", "tight", f"uniform+lr={lr:g}", 0) for lr in (2e-3, 4e-3, 8e-3)]
    assert capacity_curve.expected_runs(plans, [0, 1, 2]) == 3 + (3 + 2)
    assert capacity_curve.finished_runs(grid, plans, [0, 1, 2]) == 3
    table = capacity_curve.build_curve_table(
        [
            {**r, "trainable_params": 10, "base_params": 1000, "wall_time_s": 60.0, "final": _FINAL}
            for r in grid
        ],
        plans,
        [0, 1, 2],
        ("tight", "large"),
    )
    assert "| facts | tiny (grid only) |" in table and "3 of 8 runs" in table
    # named budgets are the whole plan: no grid-only cells beside them
    settings = allocation_sweep.curve_settings(
        allocation_sweep.parse(["--phase", "curve", "--budgets", "mid"])
    )
    assert settings["grid_only"] == {} and settings["budgets"] == ["mid"]
    settings = allocation_sweep.curve_settings(
        allocation_sweep.parse(["--phase", "curve", "--tasks", "facts"])
    )
    assert settings["grid_only"] == {"facts": ["tiny", "qv2", "qv4", "mid"]}  # skills' go with skills
    settings = allocation_sweep.curve_settings(allocation_sweep.parse(["--phase", "curve"]))
    assert settings["tasks"] == ["facts", "translate"] and set(settings["grid_only"]) == {"facts", "skills"}


def test_curve_points_are_each_budgets_chosen_lr_runs_by_size() -> None:
    results = []
    for budget, params, losses in (("mid", 600, (1.0, 1.2, 0.8)), ("tight", 50, (3.0, 2.0, 2.5))):
        runs = [_result(budget, 2e-3, 0, 1.0, 9.0)]  # worse on validation: not a point
        runs += [_result(budget, 4e-3, seed, 0.5, loss) for seed, loss in enumerate(losses)]
        results += [{**r, "trainable_params": params} for r in runs]
    plans = capacity_curve.plan_curve(results, ["facts"], ["mid", "tight"], [2e-3, 4e-3], [0, 1, 2], 0)
    points = capacity_curve.curve_points(results, plans, "facts")
    assert [(b, n, sorted(v), edge) for b, n, v, edge in points] == [
        ("tight", 50, [2.0, 2.5, 3.0], True),  # 4e-3 is the 2-value grid's edge, no extension allowed
        ("mid", 600, [0.8, 1.0, 1.2], True),
    ]


def _facts_by_template(rows: list[dict], templates: list[str]) -> dict[tuple[str, str], str]:
    """(template, name) -> value, parsed back out of the prompts."""
    found = {}
    for row in rows:
        for template in templates:
            pattern = "^" + re.escape(template).replace(re.escape("{name}"), "(.+)") + "$"
            if m := re.match(pattern, row["prompt"]):
                found[template, m.group(1)] = row["response"]
    return found


def test_facts_validation_asks_the_trained_facts_in_the_unused_phrasing() -> None:
    task = tasks.facts_rows(seed=0)
    val = capacity_curve.validation_rows("facts", 0, 96)
    assert len(val) == 96
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in task.train + task.test}
    facts: dict[str, str] = {}
    for attribute in list(tasks.ATTRIBUTES)[:3]:
        train_phrasings, test_phrasing = tasks.ATTRIBUTES[attribute]
        trained = _facts_by_template(task.train, list(train_phrasings[:2]))
        tested = _facts_by_template(task.test, [test_phrasing])
        for (_, name), value in trained.items():
            facts[attribute, name] = value
        for (_, name), value in tested.items():
            assert facts[attribute, name] == value
        for (_, name), value in _facts_by_template(val, [train_phrasings[2]]).items():
            assert facts[attribute, name] == value  # the trained fact, asked another way
    assert len(facts) == 180


@pytest.mark.parametrize("name", ["skills", "translate"])
def test_validation_inputs_are_neither_trained_nor_tested(tmp_path, name) -> None:
    task = tasks.GENERATORS[name](seed=0)
    val = capacity_curve.validation_rows(name, 0, 96)
    assert len(val) == 96 and len({r["prompt"] for r in val}) == 96
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in task.train + task.test}
    files = capacity_curve.write_task_files(name, tmp_path, quick=False)
    again = capacity_curve.write_task_files(name, tmp_path / "again", quick=False)
    for split in ("train", "validation", "test"):
        assert Path(files[split]).read_text() == Path(again[split]).read_text()  # the same files every time


def test_curve_options_replace_the_plan_and_bad_ones_are_refused(capsys) -> None:
    args = allocation_sweep.parse(["--phase", "curve", "--budgets", "mid", "tiny", "--lrs", "1e-3", "3e-3"])
    settings = allocation_sweep.curve_settings(args)
    assert settings["budgets"] == ["tiny", "mid"] and settings["lrs"] == [1e-3, 3e-3]
    assert settings["tasks"] == ["facts", "translate"] and settings["seeds"] == [0, 1, 2]
    for bad in (["--arms", "layerif"], ["--lrs", "0.01", "0.01"], ["--tasks", "sst2"]):
        with pytest.raises(SystemExit):
            allocation_sweep.parse(["--phase", "curve", *bad])
    assert "--phase curve" in capsys.readouterr().err
