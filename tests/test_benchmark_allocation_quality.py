"""The allocation-quality runner's --quick mode: runs, per-run result files, resume-by-skip, the table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNNER = REPO / "benchmarks" / "allocation_quality.py"


def _run(results: Path, workdir: Path, *extra: str) -> str:
    command = [sys.executable, str(RUNNER), "--quick", "--results", str(results), "--workdir", str(workdir)]
    command += list(extra)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


def test_quick_mode_runs_skips_finished_runs_and_builds_the_table(tmp_path: Path) -> None:
    results, workdir = tmp_path / "results", tmp_path / "work"
    first = _run(results, workdir, "--jobs", "2")  # both runs side by side, one log file each
    files = sorted(results.glob("*.json"))
    assert [f.name for f in files] == ["sst2__callback-layerif__seed0.json", "sst2__uniform__seed0.json"]
    by_arm = {json.loads(f.read_text())["arm"]: json.loads(f.read_text()) for f in files}
    uniform, rewired = by_arm["uniform"], by_arm["callback-layerif"]
    assert uniform["steps"] == rewired["steps"] == 16
    assert 0.0 <= uniform["test"]["accuracy"] <= 1.0
    # same budget: the rewired layout never exceeds the uniform arm's trainable parameters
    assert rewired["trainable_params"] <= uniform["trainable_params"]
    assert (
        len(rewired["rewires"]) == 1 and rewired["rewires"][0]["params_after"] <= uniform["trainable_params"]
    )
    assert all(entry == {"experts": 4, "rank": 4} for entry in uniform["final_layout"].values())
    assert "2 of 2 runs" in first and "| sst2 | callback-layerif |" in first
    assert (results / "figures" / "sst2__callback-layerif.png").stat().st_size > 0
    assert all(json.loads(f.read_text())["parallel_runs"] == 2 for f in files)
    # the experiment pins its precision (base.yaml), so a CPU with native bf16 cannot switch arms to bf16
    assert {r["precision"] for r in by_arm.values()} == {"32-true"}
    assert all("cores" in r["machine"] for r in by_arm.values())
    log = (workdir / "results" / "sst2__callback-layerif__seed0.log").read_text()
    assert "Epoch" in log or "fit" in log.lower(), log[-2000:]

    # a rerun skips both finished runs and rebuilds the same table; a missing run is reported as such
    (results / "sst2__uniform__seed0.json").rename(tmp_path / "moved.json")
    table_only = subprocess.run(
        [sys.executable, str(RUNNER), "--quick", "--table", "--results", str(results)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert "1 of 2 runs (incomplete" in table_only.stdout, table_only.stdout + table_only.stderr
    (tmp_path / "moved.json").rename(results / "sst2__uniform__seed0.json")
    second = _run(results, workdir)
    assert second.count("skip ") == 2 and "run sst2" not in second


def test_gpu_mode_composes_the_larger_scale_after_the_arm() -> None:
    import yaml

    sys.path.insert(0, str(REPO / "benchmarks"))
    import allocation_quality as runner

    args = runner.parse(["--gpu"])
    assert runner.results_dir(args).name == "gpu"
    configs = runner.cli_args("sst2", "plain-lora", 1, Path("w"), quick=False, real=False, gpu=True)
    files = [Path(configs[i + 1]).name for i, a in enumerate(configs) if a == "--config"]
    assert files == ["base.yaml", "sst2.yaml", "plain-lora.yaml", "gpu.yaml"]
    overlay = yaml.safe_load((runner.CONFIGS / "gpu.yaml").read_text())
    assert overlay["trainer"]["accelerator"] == "gpu" and "adapter" not in overlay["model"]
    assert overlay["trainer"]["max_steps"] > 150 and runner.GPU_SCORING_SAMPLES == (512, 256)


def test_paired_difference_is_taken_per_seed() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from quality_results import build_table, paired_difference

    def run(arm: str, seed: int, acc: float) -> dict:
        return {"task": "t", "arm": arm, "seed": seed, "test": {"accuracy": acc, "mcc": None},
                "trainable_params": 10, "wall_time_s": 60.0}  # fmt: skip

    uniform = [run("uniform", 0, 0.80), run("uniform", 1, 0.90), run("uniform", 2, 0.70)]
    other = [run("x", 0, 0.81), run("x", 1, 0.91), run("x", 3, 0.99)]  # seed 3 has no partner
    assert paired_difference(other, uniform, "accuracy") == "+1.00 ± 0.00"
    assert paired_difference(other, uniform, "mcc") == "-"
    table = build_table(uniform + other, ["t"], ["uniform", "x"], expected_runs=6)
    assert "6 of 6 runs" in table and "| t | x | 0,1,3 | " in table and "+1.00 ± 0.00" in table


def test_wall_times_are_averaged_per_machine_only() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from quality_results import build_table

    def run(seed: int, minutes: float, machine: str | None) -> dict:
        result = {"task": "t", "arm": "uniform", "seed": seed, "test": {"accuracy": 0.5, "mcc": 0.0},
                  "trainable_params": 10, "wall_time_s": 60.0 * minutes}  # fmt: skip
        return result if machine is None else {**result, "machine": machine}

    one_machine = build_table([run(0, 10, "cpu-x"), run(1, 20, "cpu-x")], ["t"], ["uniform"], 2)
    assert one_machine.splitlines()[-1].endswith("| 15.0 |") and "by machine" not in one_machine
    mixed = build_table([run(0, 30, None), run(1, 10, "cpu-x"), run(2, 20, "cpu-x")], ["t"], ["uniform"], 3)
    assert "| 30.0 (A) / 15.0 (B) |" in mixed
    assert "Wall times by machine: (A) not recorded; (B) cpu-x. Precision of the runs: not recorded." in mixed


def test_layout_agreement_ranks_blocks_by_capacity() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from quality_results import build_table, layout_agreement

    def run(seed: int, experts: list[int], rank: int = 4) -> dict:
        layout = {str(b): {"experts": e, "rank": rank} for b, e in enumerate(experts)}
        return {"task": "t", "arm": "x", "seed": seed, "test": {"accuracy": 0.5, "mcc": 0.0},
                "trainable_params": 10, "wall_time_s": 60.0, "final_layout": layout}  # fmt: skip

    assert layout_agreement([run(0, [1, 2, 3, 4])]) is None  # one seed: nothing to compare
    assert layout_agreement([run(0, [4, 4, 4, 4]), run(1, [4, 4, 4, 4])]) is None  # uniform
    assert abs(layout_agreement([run(0, [1, 2, 3, 4]), run(1, [2, 4, 6, 8])]) - 1.0) < 1e-6
    opposite = [run(0, [1, 2, 3, 4]), run(1, [4, 3, 2, 1])]
    assert abs(layout_agreement(opposite) + 1.0) < 1e-6
    three = [run(0, [1, 2, 3, 4]), run(1, [1, 2, 3, 4]), run(2, [4, 3, 2, 1])]
    assert abs(layout_agreement(three) - (1.0 - 1.0 - 1.0) / 3) < 1e-6
    assert "t / x: -1.00" in build_table(opposite, ["t"], ["x"], expected_runs=2)
