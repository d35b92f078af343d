"""The allocation sweep (issue 27): --quick end to end, its evaluation against Lightning's test loop, and
its statistics against closed forms."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "benchmarks" / "allocation_sweep.py"
sys.path.insert(0, str(REPO / "benchmarks"))

import allocation_sweep  # noqa: E402
import sweep_report  # noqa: E402

from layermoe.allocation import allocate  # noqa: E402


def _run(results: Path, workdir: Path, *extra: str) -> str:
    command = [sys.executable, str(RUNNER), "--quick", "--results", str(results), "--workdir", str(workdir)]
    completed = subprocess.run(command + list(extra), capture_output=True, text=True, timeout=900, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


def test_quick_sweep_runs_pairs_seeds_skips_finished_runs_and_reports(tmp_path: Path) -> None:
    results, workdir = tmp_path / "results", tmp_path / "work"
    first = _run(results, workdir, "--jobs", "2")
    files = sorted(p.name for p in results.glob("*.json"))
    assert files == [
        f"sst2__generous__{arm}__seed{seed}.json" for arm in ("layerif", "uniform") for seed in (0, 1)
    ]
    loaded = [json.loads((results / f).read_text()) for f in files]
    runs = {(r["arm"], r["seed"]): r for r in loaded}
    for seed in (0, 1):
        uniform, rewired = runs["uniform", seed], runs["layerif", seed]
        assert uniform["steps"] == rewired["steps"] == 16
        assert rewired["trainable_params"] <= uniform["trainable_params"]
        assert len(rewired["rewires"]) == 1 and not uniform["rewires"]
        assert rewired["callback"]["allocator_options"]["experts_bounds"] == [0, None]
        # the second, independent draw scored the same blocks at the same step
        assert set(rewired["second_draw_scores"][0]) == set(rewired["rewires"][0]["scores"])
        assert rewired["second_draw_scores"][0] != rewired["rewires"][0]["scores"]
        for result in (uniform, rewired):
            assert result["final"]["rows"] == 80 and math.isfinite(result["final"]["label_loss"])
            assert 0.0 <= result["final"]["accuracy"] <= 1.0 and -1.0 <= result["final"]["mcc"] <= 1.0
            assert result["precision"] == "32-true" and result["parallel_runs"] == 2
    assert "4 of 4 planned runs" in first and "| sst2 | generous" in first
    assert (results / "figures" / "loss_vs_budget.png").stat().st_size > 0
    # the paired difference in the table is the one computed from the two files of each seed
    diffs = [
        (runs["layerif", s]["final"]["label_loss"] - runs["uniform", s]["final"]["label_loss"])
        / runs["uniform", s]["final"]["label_loss"]
        for s in (0, 1)
    ]
    assert sweep_report._interval(diffs) in first

    (results / files[0]).unlink()
    again = _run(results, workdir, "--table")
    assert "3 of 4 planned runs (incomplete)" in again
    resumed = _run(results, workdir)
    assert "3 of 4 planned runs already finished" in resumed and resumed.count("run sst2") == 1


def test_label_loss_evaluation_matches_lightnings_test_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With experts > 1 the router adds no loss outside training, so test/loss is the label-token loss."""
    pytest.importorskip("yaml")
    from lightning.pytorch import seed_everything

    from layermoe.cli import LayerMoECLI

    files = allocation_sweep.tiny_task_files(tmp_path / "data")
    args = ["--config", str(allocation_sweep.CONFIGS / "base.yaml")]
    args += ["--config", str(allocation_sweep.TASK_CONFIGS["sst2"])]
    args += ["--config", str(allocation_sweep.CONFIGS / "budgets" / "generous.yaml")]
    args += ["--config", str(allocation_sweep.QUICK_CONFIG)]
    args += ["--data.train_file", files["train"], "--data.test_file", files["test"]]
    args += ["--trainer.max_steps", "6", "--trainer.default_root_dir", str(tmp_path)]
    args += ["--trainer.logger.init_args.save_dir", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", sys.argv[:1])  # LightningCLI also reads sys.argv (pytest's here)
    seed_everything(0)
    cli = LayerMoECLI(args=args, run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.datamodule.setup("test")
    ours = allocation_sweep.evaluate_label_loss(cli.model, cli.datamodule.test_dataloader())
    lightning = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert ours["rows"] == 80
    assert ours["label_loss"] == pytest.approx(lightning["test/loss"], rel=1e-5)
    assert ours["accuracy"] == pytest.approx(lightning["test/acc"], abs=1e-6)
    assert ours["mcc"] == pytest.approx(lightning["test/mcc"], abs=1e-5)


def test_interval_and_power_match_closed_forms() -> None:
    mean, half = sweep_report.mean_interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) = 4.3027
    assert sweep_report.mean_interval([0.5]) == (0.5, None)
    # sd 2% of the loss: ((1.96 + 0.84) * 2)^2 = 31.4 -> 32 seeds; sd 0.5%: 1.96 -> at least 2
    assert sweep_report.seeds_for_power(0.02) == 32
    assert sweep_report.seeds_for_power(0.005) == 2
    # 3 seeds, sd 2%: (t(0.975, 2) + t(0.8, 2)) * 2 / sqrt(3) = (4.3027 + 1.0607) * 2 / 1.7321 = 6.193%
    assert sweep_report.detectable_difference(0.02, 3) == pytest.approx(0.06193, rel=1e-3)


def test_relative_differences_pair_by_seed() -> None:
    def result(arm: str, seed: int, loss: float) -> dict:
        return {"arm": arm, "seed": seed, "task": "t", "budget": "tight", "final": {"label_loss": loss}}

    results = [result("uniform", 0, 2.0), result("uniform", 1, 4.0), result("a", 1, 3.0), result("a", 2, 9.0)]
    assert sweep_report.relative_differences(results, "a", "uniform", "t", "tight") == [-0.25]


def test_arm_callbacks_are_valid_callback_arguments() -> None:
    from layermoe.callbacks import LayerInfluenceCallback

    for arm in allocation_sweep.ARMS:
        config = allocation_sweep.callback_config(arm, seed=3)
        if config is None:
            continue
        callback = LayerInfluenceCallback(**config)  # every arm's options pass the callback's own checks
        floor = [1, None] if arm == "default" else [0, None]  # the defaults never empty a block
        assert callback.allocator_options["experts_bounds"] == floor
    assert allocation_sweep.callback_config("placebo-layerif", 3)["scorer_options"]["seed"] == 3


def test_phases_plan_the_grid_and_table_counts_all_of_it() -> None:
    def plan(*argv: str) -> list:
        return allocation_sweep.planned_runs(allocation_sweep.parse(list(argv)))

    primary, secondary, default = plan(), plan("--phase", "secondary"), plan("--phase", "default")
    assert len(primary) == 2 * 3 * 5 * 3  # tasks x budgets x arms x seeds
    assert len(secondary) == 10 * 3 and {r[:2] for r in secondary} == {("sst2", "tight")}
    assert {r[2] for r in default} == {"uniform", "default"} and {r[1] for r in default} == {"generous"}
    everything = plan("--table")
    assert set(everything) == set(primary) | set(secondary) | set(default)
    assert len(everything) == len(set(everything)) == 90 + 27 + 6  # uniform runs are shared, not repeated
    narrowed = plan("--phase", "primary", "--tasks", "sst2", "--budgets", "generous", "--seeds", "0")
    assert narrowed == [("sst2", "generous", arm, 0) for arm in allocation_sweep.PRIMARY_ARMS]


def test_default_choice_ranks_candidates_at_tight_and_checks_generous() -> None:
    flat = {str(b): {"experts": 1, "rank": 1} for b in range(3)}
    moved = {**flat, "0": {"experts": 0, "rank": 1}, "1": {"experts": 2, "rank": 1}}

    def result(arm: str, budget: str, seed: int, loss: float, layout: dict | None = None) -> dict:
        rewires = [{"layout_before": flat}] if layout else []
        return {
            "arm": arm,
            "task": "t",
            "budget": budget,
            "seed": seed,
            "final": {"label_loss": loss},
            "rewires": rewires,
            "final_layout": layout or flat,
        }

    results = []
    for seed, base in enumerate((1.0, 2.0, 4.0)):
        results += [result("uniform", "tight", seed, base), result("uniform", "generous", seed, base)]
        results.append(result("a", "tight", seed, base * 1.10, moved))  # +10%, two blocks moved
        results.append(result("b", "tight", seed, base * (1.01 + 0.01 * seed), flat))  # +2% mean
        results.append(result("placebo-a", "tight", seed, base * 0.5, moved))  # a control: never chosen
        results.append(result("b", "generous", seed, base * (1.05 + 0.001 * seed), flat))
    text = sweep_report.default_choice(results)
    assert text.index("- b:") < text.index("- a:") and "placebo" not in text
    assert "- a: +10.00% ± 0.00 over 3 paired runs; blocks moved per run 2.0" in text
    assert "Best at tight: b." in text
    # generous: +5.1% +- a tiny interval, so the interval lies above zero
    assert "b on t: +5.10%" in text and "(measurably worse)" in text
    # an arm level with uniform at tight ties with any other such arm; both are checked at generous
    results += [result("c", "tight", s, base, flat) for s, base in enumerate((1.0, 2.0, 4.0))]
    results += [result("d", "tight", s, base, flat) for s, base in enumerate((1.0, 2.0, 4.0))]
    tied = sweep_report.default_choice(results)
    assert "Best at tight: c, d (tied)." in tied and "c on t: not run" in tied and "default on" not in tied
    # the callback's defaults, run at the generous budget only, get their check listed with the tied arms'
    results += [result("default", "generous", s, base * 0.99) for s, base in enumerate((1.0, 2.0, 4.0))]
    with_default = sweep_report.default_choice(results)
    assert "default on t: -1.00% ± 0.00 (not measurably worse)" in with_default


@pytest.mark.parametrize(
    "modules",
    [
        [(576, 576), (576, 192)],
        [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)],
    ],
    ids=["tight-q-v", "all-7"],
)
def test_the_default_arm_cannot_move_one_expert_per_block(modules) -> None:
    """Why the sweep runs the ``default`` arm at the generous budget only: from one expert per block (the
    tight and mid budgets), a floor of one expert leaves no expert to move, whatever the scores."""
    options = allocation_sweep.ARMS["default"]["allocator_options"]
    current = {b: {"experts": 1, "rank": 2} for b in range(30)}
    dims = dict.fromkeys(range(30), modules)
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = dict(enumerate(rng.lognormal(0, 2, 30)))
        errors = dict(enumerate(rng.uniform(0, 0.1, 30) * np.mean(list(scores.values()))))
        chosen = allocate(scores, "power_law", "current", current, dims, score_errors=errors, **options)
        assert chosen == current


def test_moving_cost_correlates_paired_differences_with_emptied_blocks_and_rewire_jumps() -> None:
    flat = {str(b): {"experts": 1, "rank": 1} for b in range(4)}

    def run(arm: str, seed: int, loss: float, emptied: int = 0, jump: float = 0.0) -> dict:
        final = {**flat, **{str(b): {"experts": 0, "rank": 1} for b in range(emptied)}}
        if emptied:
            final["3"] = {"experts": 1 + emptied, "rank": 1}
        rewires = (
            []
            if arm == "uniform"
            else [{"layout_before": flat, "val_loss_before": 1.0, "val_loss_after": 1.0 + jump}]
        )
        return {
            "arm": arm,
            "task": "t",
            "budget": "b",
            "seed": seed,
            "final": {"label_loss": loss},
            "rewires": rewires,
            "final_layout": final,
        }

    results = [run("uniform", s, 2.0) for s in range(4)]
    # more blocks emptied, bigger jump, worse loss: both correlations are +1; one arm moved nothing
    results += [run("a", s, 2.0 * (1 + 0.1 * s), emptied=s, jump=0.2 * s) for s in range(1, 4)]
    results += [run("b", 0, 2.0)]
    text = sweep_report.moving_cost(results)
    assert "(4 runs that rewired" in text
    assert "blocks the run emptied +1.00, with the validation-loss jump at its first rewire +1.00." in text
    # half-width: t_0.975(2) * sd / sqrt(3) = 4.303 * 0.1 / 1.732
    assert "moved no block: +0.00% over 1" in text
    assert "emptied at least one block: +20.00% ± 24.84 over 3" in text
    assert sweep_report.moving_cost(results[:5]).startswith("What moving costs: needs three")


def test_the_sweeps_default_arm_is_the_callbacks_defaults() -> None:
    """The arm whose generous-budget runs back the defaults (BENCHMARKS.md) configures exactly them."""
    import inspect

    from layermoe.allocation import allocate
    from layermoe.allocation.validation import bounds_arrays
    from layermoe.callbacks import LayerInfluenceCallback

    arm = LayerInfluenceCallback(**allocation_sweep.callback_config("default", seed=0))
    default = LayerInfluenceCallback()
    assert (arm.scorer, arm.allocator, arm.schedule) == (default.scorer, default.allocator, default.schedule)
    bounds = arm.allocator_options.pop("experts_bounds")
    assert arm.allocator_options == default.allocator_options
    # the callback passes no bounds by default, and allocate's are the arm's floor of one expert
    assert inspect.signature(allocate).parameters["experts_bounds"].default is None
    assert tuple(bounds) == inspect.signature(bounds_arrays).parameters["default"].default
