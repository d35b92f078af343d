"""The growth sweep (issue 34 item 5, ``allocation_sweep.py --phase grow``): --quick end to end in process
(its lr refusal, the curve's uniform runs reused, the runs' records, the table against a recomputation from
the files, resuming), its plan (schedule, arms, budgets, seeds by the power rule) and the claim that lets it
reuse the curve's uniform runs: the validation cadence does not change training."""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
from scipy.stats import t as student_t

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import allocation_sweep  # noqa: E402
import capacity_curve  # noqa: E402
import growth_sweep  # noqa: E402
import sweep_report  # noqa: E402

from tests.test_benchmark_capacity_curve import in_process  # noqa: E402


def _paired(arm_runs: dict[int, dict], base_runs: dict[int, dict]) -> str:
    """Mean and 95% t half-width of the per-seed relative differences, computed here from the files."""
    diffs = [
        (arm_runs[s]["final"]["loss_sample"] - base_runs[s]["final"]["loss_sample"])
        / base_runs[s]["final"]["loss_sample"]
        for s in sorted(set(arm_runs) & set(base_runs))
    ]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    half = student_t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return f"{100 * mean:+.2f}% ± {100 * half:.2f}"


def test_quick_grow_sweep_reuses_the_curve_records_runs_tabulates_and_resumes(tmp_path, monkeypatch, capsys):
    started: list[list] = []
    monkeypatch.setattr(allocation_sweep, "run_pending", in_process(started))
    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    curve, results, workdir = tmp_path / "curve", tmp_path / "grow", tmp_path / "work"
    common = ["--quick", "--workdir", str(workdir)]
    grow = ["--phase", "grow", "--results", str(results), "--curve-results", str(curve), *common]

    # no curve yet: refused before anything runs, naming the curve runs it needs
    assert allocation_sweep.main(grow) == 2
    err = capsys.readouterr().err
    assert "not chosen yet" in err and "facts__mid__uniform+lr=0.003__seed0" in err
    assert started == [] and not results.exists()
    # --table shows what has finished and names the cells still waiting on the curve
    assert allocation_sweep.main([*grow, "--table"]) == 0 and started == []
    assert "lr not chosen by the capacity curve yet: facts/mid" in capsys.readouterr().out

    assert (
        allocation_sweep.main(["--phase", "curve", "--budgets", "mid", "--results", str(curve), *common]) == 0
    )
    curve_runs = allocation_sweep.load_results_of(curve)
    chosen = min((r for r in curve_runs if r["seed"] == 0), key=lambda r: r["validation"]["loss_sample"])
    started.clear()
    capsys.readouterr()

    assert allocation_sweep.main(grow) == 0
    out = capsys.readouterr().out
    quick = growth_sweep.GROW_QUICK
    lr_arm = capacity_curve.lr_arm
    planned = [("facts", "mid", lr_arm(chosen["lr"], arm), seed) for seed in (0, 1) for arm in quick["arms"]]
    # the uniform runs are the curve's (same configuration): copied, not run
    assert [run for batch in started for run in batch] == [
        r for r in planned if not r[2].startswith("uniform+")
    ]
    loaded = {(r["arm"], r["seed"]): r for r in allocation_sweep.load_results_of(results)}
    assert set(loaded) == {(run[2], run[3]) for run in planned}
    for seed in (0, 1):
        name = allocation_sweep.run_name(("facts", "mid", lr_arm(chosen["lr"]), seed))
        source = json.loads((curve / f"{name}.json").read_text())
        assert loaded[lr_arm(chosen["lr"]), seed] == {**source, "reused_from": str(curve / f"{name}.json")}

    def arm(name: str, seed: int) -> dict:
        return loaded[lr_arm(chosen["lr"], name), seed]

    budget = arm("uniform", 0)["trainable_params"]
    rounds = growth_sweep.growth_schedule(6)
    round_steps = {rounds["warmup"] + i * rounds["every"] for i in range(rounds["max_rewires"])}
    for (name, seed), r in loaded.items():
        assert r["lr"] == chosen["lr"] and r["steps"] == 6 and r["final"]["rows"] == 18
        assert math.isfinite(r["final"]["loss_sample"]) and math.isfinite(r["final"]["loss_token"])
        assert 0.0 <= r["final"]["exact_match"] <= 1.0 and r["validation"]["rows"] == 8
        if r.get("reused_from"):
            continue
        assert [step for step, _ in r["val_history"]] == [1, 2, 3, 4, 5, 6]  # every tenth of the run (>= 1)
        checks = [(step, params) for step, params, event in r["params_history"] if event == "validation"]
        assert [step for step, _ in checks] == [1, 2, 3, 4, 5, 6]
        assert r["params_history"][0][:1] == [0] and r["params_history"][0][2] == "start"
        assert r["wall_time_s"] > 0 and r["callback"]["seed"] == seed
        if "-grow" in name:
            start, end = r["params_history"][0][1], r["params_history"][-1][1]
            assert start < budget and start < end <= budget  # grown, never above the budget
            changes = [step for step, _, event in r["params_history"] if event == "changed"]
            assert changes and set(changes) <= round_steps  # parameters change only at growth rounds
            assert len(r["rewires"]) == len(round_steps)
        else:  # rank moves: experts fixed, the budget's parameters throughout
            assert {p for _, p, _ in r["params_history"]} <= {budget}
            after = r["rewires"][0]["layout_after"]
            assert {v["experts"] for v in after.values()} == {1}

    # the table's numbers, recomputed from the files
    assert "8 of 8 planned runs (2 uniform runs reused from the capacity curve)" in out
    uniform = {s: arm("uniform", s) for s in (0, 1)}
    for name in quick["arms"]:
        runs = {s: arm(name, s) for s in (0, 1)}
        losses = [runs[s]["final"]["loss_sample"] for s in (0, 1)]
        row = next(line for line in out.splitlines() if f"| {name} |" in line)
        assert f"{statistics.fmean(losses):.4f} ± {statistics.stdev(losses):.4f}" in row
        if name != "uniform":
            assert _paired(runs, uniform) in row
        reached = []
        for s in (0, 1):
            target = uniform[s]["val_history"][-1][1]
            reached.append(next((step for step, loss in runs[s]["val_history"] if loss <= target), None))
        hit = [x for x in reached if x is not None]
        expected = (f"{sum(hit) / len(hit):.0f}" if hit else "never") + f" ({len(hit)} of 2)"
        assert f"| {expected} |" in row
    assert (results / "table.md").read_text().strip() in out
    assert (results / "figures" / "grow.png").stat().st_size > 0

    started.clear()
    assert allocation_sweep.main(grow) == 0 and started == []  # resumes: nothing left
    assert allocation_sweep.main([*grow, "--table"]) == 0 and started == []


def test_validation_cadence_leaves_training_unchanged(tmp_path, monkeypatch) -> None:
    """Why the curve's uniform runs (validation at half and end) stand for the grow phase's (every tenth):
    validating more often changes no trained weight, bit for bit."""
    from layermoe.cli import LayerMoECLI

    monkeypatch.setattr(sys, "argv", sys.argv[:1])
    weights = []
    for every in (3, 1):
        work = tmp_path / str(every)
        files = capacity_curve.write_task_files("facts", work / "data", quick=True)
        args = ["--config", str(allocation_sweep.CONFIGS / "base.yaml")]
        args += ["--config", str(allocation_sweep.TASK_CONFIGS["facts"])]
        args += ["--config", str(allocation_sweep.CONFIGS / "budgets" / "mid.yaml")]
        args += ["--config", str(allocation_sweep.QUICK_GENERATIVE_CONFIG)]
        args += ["--data.train_file", files["train"], "--data.test_file", files["test"]]
        args += ["--data.val_file", files["validation"], "--trainer.val_check_interval", str(every)]
        args += ["--seed_everything", "1", "--data.seed", "1", "--trainer.default_root_dir", str(work)]
        args += ["--trainer.logger.init_args.save_dir", str(work)]
        cli = LayerMoECLI(args=args, run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        weights.append({n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad})
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for name, tensor in weights[0].items():
        assert weights[1][name].equal(tensor), name


def test_growth_schedule_rounds_at_10_25_40_percent() -> None:
    schedule = growth_sweep.growth_schedule(150)
    steps = [schedule["warmup"] + i * schedule["every"] for i in range(schedule["max_rewires"])]
    assert steps == [15, 37, 59]  # 10%, 24.7%, 39.3% of 150
    assert growth_sweep.growth_schedule(6) == {"warmup": 1, "every": 1, "max_rewires": 3}
    assert growth_sweep.validation_interval(150) == 15 and growth_sweep.validation_interval(6) == 1


@pytest.mark.parametrize("budget", ["mid", "large", "generous"])
def test_arm_callbacks_are_valid_and_configure_what_their_names_say(budget: str) -> None:
    from layermoe.callbacks import LayerInfluenceCallback

    experts = growth_sweep.budget_adapter(budget)["experts"]
    for name in growth_sweep.ARMS:
        args = growth_sweep.arm_callback(f"{name}+lr=0.004", 7, budget, 150, allocation_sweep._COMMON)
        if name == "uniform":
            assert args is None
            continue
        callback = LayerInfluenceCallback(**args)  # passes the callback's own checks
        assert callback.rewiring.seed == 7
        if "-grow" in name:
            control = {"placebo-grow": "placebo"}.get(name, "uniform" if "uniform" in name else "none")
            assert callback.growth.control == control and callback.growth.rounds == 3
            assert callback.growth.init == ("gradient" if name == "layerif-grow-gradient" else "lora")
            # uniform's step size at uniform's lr; the optional control shows what the step size does
            assert callback.keep_scaling is (name != "uniform-grow-rescaled")
            assert (callback.schedule.warmup, callback.schedule.every) == (15, 22)
            assert callback.allocator_options["error_shrinkage"] == 1.0
        else:
            options = callback.allocator_options
            assert callback.growth is None and callback.schedule.warmup == 0.3
            assert callback.keep_scaling is True  # rank moves at uniform's step size
            assert options["rank_policy"] == "scores" and options["error_shrinkage"] == 0.0
            assert options["experts_bounds"] == [experts, experts] and options["rank_bounds"] == [1, None]
    placebo = growth_sweep.arm_callback("placebo-rewire-rank", 5, budget, 150, allocation_sweep._COMMON)
    assert placebo["scorer"] == "placebo" and placebo["scorer_options"] == {"scorer": "layerif", "seed": 5}
    assert growth_sweep.arm_callback("curvature-grow", 0, budget, 150, {})["allocator"] == "mdl"


def test_rewires_move_rank_or_whole_blocks_and_the_default_plan_fits_the_cap() -> None:
    from layermoe.callbacks import LayerInfluenceCallback

    # rank-2+ budgets: experts fixed, ranks move; rank-1 budgets (no rank can go below 1): blocks move
    bounds = {b: growth_sweep.rank_experts_bounds(b) for b in ("qv2", "mid", "tight", "half7", "small")}
    assert bounds == {"qv2": [1, 1], "mid": [1, 1], "tight": [0, 1], "half7": [0, 1], "small": [0, 1]}
    for budget in ("half7", "small"):
        for arm in ("rewire-rank", "placebo-rewire-rank"):
            args = growth_sweep.arm_callback(arm, 0, budget, 150, allocation_sweep._COMMON)
            assert args["allocator_options"]["experts_bounds"] == [0, 1]
            LayerInfluenceCallback(**args)  # passes the callback's own checks
    grow = growth_sweep.GROW
    cells = growth_sweep.grow_cells(grow["tasks"], grow["budgets"])
    # each task at its own two budgets (the capacity curve's steep part), in budget order
    assert cells == [
        ("facts", "quarter7"),
        ("facts", "half7"),
        ("translate", "half7"),
        ("translate", "small"),
    ]
    seeds, why = growth_sweep.seed_plan([], cells, grow["arms"], {}, grow["min_seeds"], grow["max_runs"])
    assert seeds == [0, 1, 2] and "minimum" in why
    lrs = dict.fromkeys(cells, 4e-3)
    runs = growth_sweep.plan_runs(cells, grow["arms"], seeds, lrs)
    assert len(runs) == len(set(runs)) == 4 * 7 * 3 <= 100
    assert not set(growth_sweep.OPTIONAL_ARMS) & set(grow["arms"])  # optional: --arms
    assert runs[0] == ("facts", "quarter7", "uniform+lr=0.004", 0)  # seed by seed: whole paired seeds first
    assert {r[3] for r in runs[: 4 * 7]} == {0}
    with pytest.raises(growth_sweep.GrowPlanError, match="no budgets for task.*skills.*--budgets"):
        growth_sweep.grow_cells(["facts", "skills"], grow["budgets"])
    with pytest.raises(SystemExit):  # argparse's error: every arm is paired with uniform
        allocation_sweep.parse(["--phase", "grow", "--arms", "layerif-grow"])
    with pytest.raises(SystemExit):  # grow arms are not the other phases'
        allocation_sweep.parse(["--phase", "primary", "--arms", "layerif-grow"])
    with pytest.raises(growth_sweep.GrowPlanError, match="over the cap of 100"):
        growth_sweep.seed_plan([], cells * 2, grow["arms"], lrs, 3, 100)


def _result(arm: str, seed: int, loss: float, lr: float = 4e-3) -> dict:
    return {
        "task": "facts",
        "budget": "mid",
        "arm": capacity_curve.lr_arm(lr, arm),
        "seed": seed,
        "final": {"loss_sample": loss},
    }


def test_seeds_follow_the_power_rule_under_the_cap() -> None:
    cells, lrs = [("facts", "mid")], {("facts", "mid"): 4e-3}
    # paired differences +2% and +6%: sd = 2.828%, n = ((1.96 + 0.84) * 2.828)^2 = 62.8 -> 63
    results = [_result("uniform", 0, 1.0), _result("uniform", 1, 2.0)]
    results += [_result("a", 0, 1.02), _result("a", 1, 2.12)]
    results += [_result("a", 2, 9.0, lr=1e-3)]  # another lr: not this cell's run
    sd = statistics.stdev([0.02, 0.06])
    need = math.ceil(((1.959964 + 0.841621) * sd / 0.01) ** 2)
    assert need == 63
    seeds, why = growth_sweep.seed_plan(results, cells, ["uniform", "a"], lrs, 3, 200)
    assert seeds == list(range(need)) and f"asks for {need}" in why and "allows" not in why
    seeds, why = growth_sweep.seed_plan(results, cells, ["uniform", "a"], lrs, 3, 20)
    assert seeds == list(range(10)) and "allows 10" in why  # 20 runs / 2 arms


def test_steps_to_reach_uniforms_final_validation_loss() -> None:
    uniform = {"val_history": [[15, 3.0], [150, 1.0]]}
    assert growth_sweep.steps_to_reach({"val_history": [[15, 2.0], [30, 1.0], [45, 0.5]]}, uniform) == 30
    assert growth_sweep.steps_to_reach({"val_history": [[15, 2.0], [150, 1.01]]}, uniform) is None
    assert growth_sweep.steps_to_reach({"val_history": [[15, 2.0]]}, None) is None


def test_generative_runs_are_compared_on_their_answer_token_loss() -> None:
    """sweep_report's paired differences read loss_sample for generative runs (no label loss there)."""
    results = [_result("uniform", 0, 2.0), _result("a", 0, 1.5)]
    results = [{**r, "arm": capacity_curve.split_arm(r["arm"])[0]} for r in results]
    assert sweep_report.relative_differences(results, "a", "uniform", "facts", "mid") == [-0.25]
    assert sweep_report.primary_loss({"final": {"label_loss": 0.3, "accuracy": 1.0}}) == 0.3


def test_runs_without_a_parameter_record_are_static_runs() -> None:
    """The curve's uniform runs made before params_history existed: their trainable parameters throughout;
    a callback run without the record has none to show."""
    static = {"callback": None, "trainable_params": 610560, "steps": 150}
    assert growth_sweep.params_history(static) == [[0, 610560, "start"], [150, 610560, "end"]]
    assert growth_sweep.params_history({**static, "callback": {"scorer": "layerif"}}) == []
    grown = {"params_history": [[0, 100, "start"], [15, 150, "changed"], [150, 200, "validation"]]}
    assert growth_sweep._params_cell([static]) == "610,560"
    assert (
        growth_sweep._params_cell([grown, {**grown, "params_history": [[0, 100, "start"]]}])
        == "100 -> 100/200"
    )


def test_half7_is_growths_even_start_at_half_of_small_and_its_growth_arms_build() -> None:
    """half7's blocks are the ones a growth start at half of ``small`` would adapt (SmolLM2: 30 blocks, all
    seven projections at rank 1 cost 10,176 per block), and a growth arm's callback builds there."""
    from layermoe.allocation.growth import evenly_spaced, plan_growth

    half, small = growth_sweep.budget_adapter("half7"), growth_sweep.budget_adapter("small")
    covered = [int(b) for b, e in half["experts"].items() if e]
    assert covered == evenly_spaced(30, 15) and len(half["experts"]) == 30
    quarter = growth_sweep.budget_adapter("quarter7")
    assert [int(b) for b, e in quarter["experts"].items() if e] == evenly_spaced(30, 8)
    assert (half["rank"], half["lora_alpha"]) == (small["rank"], small["lora_alpha"])
    smollm2 = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
    plan = plan_growth(dict.fromkeys(range(30), smollm2), 30 * 10_176, 3, initial_fraction=0.5)
    assert plan.initial_params == 15 * 10_176 == 152_640
    assert [b for b, v in plan.initial.items() if v["experts"]] == covered
    args = growth_sweep.arm_callback("layerif-grow", 0, "half7", 150, allocation_sweep._COMMON)
    assert args["growth"]["initial_fraction"] == 0.25 and "experts_bounds" not in args["allocator_options"]


def _named(task: str, budget: str, arm: str, losses: list[float]) -> list[dict]:
    """One run per seed with these final losses (arm names without their lr, as the report reads them)."""
    return [
        {"task": task, "budget": budget, "arm": arm, "seed": s, "final": {"loss_sample": loss}}
        for s, loss in enumerate(losses)
    ]


SAME_BUDGETS = {"facts": ("quarter7", "half7"), "translate": ("quarter7", "half7")}


def _sweep(
    tight: dict[str, list[float]],
    generous: dict[str, list[float]] | None,
    budgets: dict[str, tuple[str, str]] = SAME_BUDGETS,
) -> list[dict]:
    """Uniform at loss 1.0 on every seed of facts and translate at each task's (tighter, other) budget; the
    arms' losses are their ratios to it."""
    runs = []
    for task, (tight_budget, generous_budget) in budgets.items():
        for budget, arms in ((tight_budget, tight), (generous_budget, generous or {})):
            if arms:
                runs += _named(task, budget, "uniform", [1.0, 1.0, 1.0])
            for arm, losses in arms.items():
                runs += _named(task, budget, arm, losses)
    return runs


CELLS = [("facts", "quarter7"), ("translate", "quarter7"), ("facts", "half7"), ("translate", "half7")]


def test_default_choice_keeps_the_defaults_when_no_candidate_beats_uniform() -> None:
    # controls below uniform do not count: they are never a default
    runs = _sweep(
        {"layerif-grow": [1.02, 1.04, 1.06], "rewire-rank": [1.01, 0.99, 1.03], "uniform-grow": [0.9] * 3},
        {"layerif-grow": [1.0] * 3},
    )
    text = growth_sweep.default_choice(runs, CELLS)
    pooled = [0.01, -0.01, 0.03] * 2  # rewire-rank, both tasks
    assert f"- rewire-rank: {_interval_of(pooled)} over 6 paired runs" in text
    assert "- layerif-grow: +4.00%" in text and "uniform-grow" not in text
    assert text.endswith(
        "No candidate is below uniform on average at quarter7: the callback's defaults stay (growth off)."
    )


def test_default_choice_takes_the_best_candidate_unless_measurably_worse_at_the_other_budget() -> None:
    tight = {"layerif-grow": [0.95, 0.97, 0.96], "curvature-grow": [0.98, 0.99, 0.97]}
    chosen = growth_sweep.default_choice(_sweep(tight, {"layerif-grow": [1.02, 0.97, 1.01]}), CELLS)
    assert "Best at quarter7: layerif-grow (-4.00%), not measurably worse at half7" in chosen
    assert chosen.endswith("the defaults become layerif-grow's options (ARMS in benchmarks/growth_sweep.py).")
    # +5% +-0.1 at half7: the interval excludes zero
    worse = growth_sweep.default_choice(_sweep(tight, {"layerif-grow": [1.049, 1.05, 1.051]}), CELLS)
    assert "measurably worse at half7" in worse and worse.endswith(
        "the callback's defaults stay (growth off)."
    )
    pending = growth_sweep.default_choice(_sweep(tight, None), CELLS)
    assert pending.endswith("its check at half7 vs uniform: facts: not run; translate: not run: pending.")


def _interval_of(diffs: list[float]) -> str:
    mean = statistics.fmean(diffs)
    half = student_t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return f"{100 * mean:+.2f}% ± {100 * half:.2f}"


def test_default_choice_takes_each_tasks_own_tighter_and_other_budget() -> None:
    # translate's budgets are half7 and small: its half7 runs pool with facts' quarter7 runs, and the check
    # is at facts' half7 and translate's small
    own = {"facts": ("quarter7", "half7"), "translate": ("half7", "small")}
    cells = [("facts", "quarter7"), ("facts", "half7"), ("translate", "half7"), ("translate", "small")]
    runs = _sweep({"layerif-grow": [0.95, 0.97, 0.96]}, None, own)
    runs += _named("translate", "small", "uniform", [1.0, 1.0, 1.0])
    runs += _named("translate", "small", "layerif-grow", [1.049, 1.05, 1.051])
    text = growth_sweep.default_choice(runs, cells)
    assert "at facts quarter7, translate half7, pooled" in text
    assert "- layerif-grow: -4.00% ± " in text and "over 6 paired runs" in text
    assert text.endswith(
        "its check at facts half7, translate small vs uniform: facts: not run;"
        f" translate: {_interval_of([0.049, 0.05, 0.051])}: pending."
    )


def test_summary_table_gives_uniforms_loss_and_each_arms_paired_difference() -> None:
    runs = _named("facts", "quarter7", "uniform", [1.0, 2.0, 4.0])
    runs += _named("facts", "quarter7", "layerif-grow", [1.05, 2.1, 4.2])  # +5% on every seed: bold
    runs += _named("facts", "quarter7", "placebo-grow", [0.9, 2.2, 4.0])  # -10%, +10%, 0: not
    table = growth_sweep.summary_table(runs, [("facts", "quarter7")])
    header, _, row = table.splitlines()
    assert header == "| task | budget | uniform (test loss) | placebo-grow | layerif-grow |"
    uniform = f"{statistics.fmean([1.0, 2.0, 4.0]):.4f} ± {statistics.stdev([1.0, 2.0, 4.0]):.4f}"
    placebo = _interval_of([-0.1, 0.1, 0.0])
    assert row == f"| facts | quarter7 | {uniform} | {placebo} | **+5.00% ± 0.00** |"
    # with a second cell, a last row pools every pair of every cell
    runs += _named("facts", "half7", "uniform", [1.0, 1.0])
    runs += _named("facts", "half7", "layerif-grow", [1.2, 0.9])
    table = growth_sweep.summary_table(runs, [("facts", "quarter7"), ("facts", "half7")])
    pooled = table.splitlines()[-1]
    layerif = _interval_of([0.05, 0.05, 0.05, 0.2, -0.1])
    assert pooled == f"| all cells | pooled | - | {placebo} | {layerif} |"
    # the scored arm against its placebo, pooled the same way (quarter7 only: half7 has no placebo)
    note = growth_sweep.placement_note(runs, [("facts", "quarter7"), ("facts", "half7")])
    versus = _interval_of([1.05 / 0.9 - 1, 2.1 / 2.2 - 1, 4.2 / 4.0 - 1])
    assert note == (
        f"Placement (scored arm vs its placebo, paired, pooled over the cells): layerif-grow vs placebo-grow"
        f" {versus} over 3 pairs."
    )


def test_grow_table_gives_wall_times_per_machine_and_names_pairs_across_machines() -> None:
    def run(arm: str, seed: int, minutes: float, machine: str) -> dict:
        return {"task": "facts", "budget": "half7", "arm": arm, "seed": seed, "lr": 8e-3, "steps": 150,
                "final": {"loss_sample": 1.0, "loss_token": 1.0, "exact_match": 0.0}, "trainable_params": 10,
                "base_params": 1000, "callback": None, "code": "abc", "wall_time_s": 60.0 * minutes,
                "machine": machine, "precision": "32-true"}  # fmt: skip

    results = [run("uniform+lr=0.008", 0, 10, "cpu-x"), run("uniform+lr=0.008", 1, 20, "cpu-x")]
    results += [run("uniform-grow+lr=0.008", 0, 4, "cpu-y"), run("uniform-grow+lr=0.008", 1, 12, "cpu-x")]
    table = growth_sweep.build_grow_table(results, [], "2 seeds")
    rows = {
        cells[3]: cells[13]
        for line in table.splitlines()
        if len(cells := [c.strip() for c in line.split("|")]) == 16 and cells[1] == "facts"  # not the summary
    }
    assert rows["uniform"] == "15.0 (A)" and rows["uniform-grow"] == "12.0 (A) / 4.0 (B)"
    assert "Wall times by machine: (A) cpu-x; (B) cpu-y. Precision of the runs: 32-true." in table
    # uniform-grow's seed 0 ran on cpu-y, its uniform partner on cpu-x; seed 1 both on cpu-x
    assert "Paired across machines" in table and table.count("seed 0 uniform-grow") == 1
    assert "seed 1 uniform-grow" not in table
    one_machine = growth_sweep.build_grow_table(results[:2] + results[3:], [], "2 seeds")
    assert "Every paired run ran on the same machine as its uniform partner." in one_machine
