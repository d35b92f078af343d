"""Does influence-guided capacity help? Allocation-quality experiment (issue 16), resumable.

    python benchmarks/allocation_quality.py                 # full: 2 tasks x 4 arms x 3 seeds + references
    python benchmarks/allocation_quality.py --quick         # 2 arms x 1 seed, tiny random model (~1 min)
    python benchmarks/allocation_quality.py --quick --real  # 2 arms x 1 seed, SmolLM2, 60 steps
    python benchmarks/allocation_quality.py --table         # only rebuild the table from finished runs
    python benchmarks/allocation_quality.py --jobs 2        # two runs side by side, one thread each
    python benchmarks/allocation_quality.py --gpu           # the same arms at a larger scale on a GPU

Every arm is train.py's configuration: ``configs/experiments/allocation_quality/base.yaml`` + the task's
YAML + the arm's YAML (``arms/<arm>.yaml``, none for ``uniform``), with ``--seed_everything <seed>``. Each
(task, arm, seed) runs in its own subprocess and writes one JSON file under ``--results`` when it finishes;
a rerun skips runs whose file exists, and the table is built from whatever files exist ("k of N runs").
The same trainable-parameter budget and the same number of optimizer steps hold across arms by
construction: every arm starts from the uniform layout and reallocates with ``budget: current``.
Runs go seed by seed (all tasks and arms of seed 0, then the reference points, then seed 1, ...), so an
interrupted experiment has whole seeds to compare. With ``--jobs N`` up to N runs share the machine, each
with ``cpu_count // N`` threads and its output in ``<workdir>/<mode>/<run>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from quality_results import build_table, layout_figure, load_results, result_path, write_result  # noqa: E402
from run_queue import QueuedRun, run_queue  # noqa: E402

CONFIGS = REPO / "configs" / "experiments" / "allocation_quality"
MAIN_ARMS = ["uniform", "oneshot-layerif", "callback-layerif", "callback-curvature"]
REFERENCE_ARMS = ["oneshot-alpha", "plain-lora"]  # once per task, seed 0
TASKS = ["sst2", "cola"]
SEEDS = [0, 1, 2]
QUICK_ARMS = ["uniform", "callback-layerif"]
GPU_SCORING_SAMPLES = (512, 256)  # (num_train_samples, num_val_samples) of the callback under --gpu


# ---------------------------------------------------------------------------------------------- runs
def plan_runs(args: argparse.Namespace) -> list[tuple[str, str, int]]:
    if args.quick:
        return [(TASKS[0], arm, 0) for arm in QUICK_ARMS]
    runs = []
    for seed in args.seeds:
        runs += [(task, arm, seed) for task in args.tasks for arm in args.arms]
        if seed == args.seeds[0]:
            runs += [(task, arm, seed) for task in args.tasks for arm in args.references]
    return runs


def results_dir(args: argparse.Namespace) -> Path:
    if args.results:
        return Path(args.results)
    if args.gpu:
        return REPO / "benchmarks" / "results" / "gpu"
    mode = "full" if not args.quick else ("quick-real" if args.real else "quick")
    return REPO / "benchmarks" / "results" / mode


def cli_args(
    task: str, arm: str, seed: int, workdir: Path, quick: bool, real: bool, gpu: bool = False
) -> list[str]:
    args = ["--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / f"{task}.yaml")]
    arm_config = CONFIGS / "arms" / f"{arm}.yaml"
    if arm_config.exists():
        args += ["--config", str(arm_config)]
    if quick:
        args += ["--config", str(CONFIGS / ("quick_real.yaml" if real else "quick_tiny.yaml"))]
    if gpu:
        args += ["--config", str(CONFIGS / "gpu.yaml")]
    args += [
        "--seed_everything",
        str(seed),
        "--data.seed",
        str(seed),
        "--trainer.default_root_dir",
        str(workdir),
        "--trainer.logger.init_args.save_dir",
        str(workdir),
    ]
    return args


def tiny_task_files(folder: Path, rows: int = 240, seed: int = 0) -> dict[str, str]:
    """A learnable toy task for --quick: does the word list mention a fruit? (generated, no third-party text)."""
    rng = random.Random(seed)
    fruits = ["apple", "pear", "plum", "fig"]
    others = ["stone", "cloud", "river", "chair", "lamp", "road", "wall", "book"]
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", rows), ("test", rows // 3)):
        lines = []
        for _ in range(count):
            label = rng.random() < 0.5
            words = rng.sample(others, 3) + ([rng.choice(fruits)] if label else [rng.choice(others)])
            rng.shuffle(words)
            lines.append(json.dumps({"text": " ".join(words), "label": int(label)}))
        path = folder / f"{split}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths[split] = str(path)
    return paths


def run_one(
    task: str, arm: str, seed: int, out: Path, workdir: Path, quick: bool, real: bool, gpu: bool = False
) -> None:
    """Fit + test one (task, arm, seed) in this process and write its result JSON."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from layermoe.adapters import layout
    from layermoe.cli import LayerMoECLI

    sys.argv = sys.argv[:1]  # LightningCLI reads sys.argv too; the runner's own flags are not its business
    args = cli_args(task, arm, seed, workdir, quick, real, gpu)
    if quick and not real:
        files = tiny_task_files(workdir / "data", seed=seed)
        args += ["--data.train_file", files["train"], "--data.test_file", files["test"]]
    cli = LayerMoECLI(args=args, run=False)
    trainer, module = cli.trainer, cli.model
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if quick and not real:
        # The tiny smoke run only checks the plumbing: score on fewer samples so it takes about a minute.
        torch.set_num_threads(1)
        for callback in trainer.callbacks:
            if hasattr(callback, "num_train_samples"):
                callback.num_train_samples, callback.num_val_samples = 16, 16
    if gpu:
        for callback in trainer.callbacks:
            if hasattr(callback, "num_train_samples"):  # alpha_hill reads no data and ignores them
                callback.num_train_samples, callback.num_val_samples = GPU_SCORING_SAMPLES
    # Model selection on the validation slice of train (CoLA: MCC, since accuracy rewards the majority class).
    monitor = "val/mcc" if task == "cola" else "val/acc"
    checkpoint = ModelCheckpoint(dirpath=str(workdir / "best"), monitor=monitor, mode="max", save_top_k=1)
    trainer.callbacks.append(checkpoint)
    start = time.perf_counter()
    trainer.fit(module, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    best = checkpoint.best_model_path
    test_start = time.perf_counter()
    metrics = trainer.test(module, datamodule=cli.datamodule, ckpt_path=best or None, verbose=False)[0]
    test_seconds = time.perf_counter() - test_start
    final_layout = layout(module.model)
    history = []
    for callback in trainer.callbacks:
        if hasattr(callback, "history"):
            history = json.loads(json.dumps(callback.history, default=str))
    result: dict[str, Any] = {
        "task": task,
        "arm": arm,
        "seed": seed,
        "quick": quick,
        "gpu": gpu,
        "real_model": real or not quick,
        "steps": int(trainer.global_step),
        "test": {"accuracy": float(metrics["test/acc"]), "mcc": float(metrics.get("test/mcc", float("nan")))},
        "best_checkpoint": Path(best).name if best else None,
        "trainable_params": int(sum(p.numel() for p in module.parameters() if p.requires_grad)),
        "final_layout": {str(k): v for k, v in final_layout.items()},
        "rewires": history,
        "fit_seconds": fit_seconds,
        "test_seconds": test_seconds,
        "wall_time_s": fit_seconds + test_seconds,
        "torch_threads": torch.get_num_threads(),
        "precision": str(trainer.precision),
        "machine": machine_description(),
        "parallel_runs": int(os.environ.get("LAYERMOE_PARALLEL_RUNS", "1")),
    }
    write_result(out, result)


def machine_description() -> str:
    """The CPU model and whether it runs bf16 natively: run times are only comparable on one machine kind."""
    import platform

    from layermoe.precision import cpu_has_native_bf16

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{model}, {os.cpu_count()} cores, {bf16}"


# ---------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 arms x 1 seed (tiny random model unless --real)"
    )
    parser.add_argument("--real", action="store_true", help="with --quick: SmolLM2, 60 steps")
    parser.add_argument(
        "--gpu", action="store_true", help="larger scale on a CUDA GPU (configs/.../gpu.yaml)"
    )
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    parser.add_argument("--arms", nargs="+", default=MAIN_ARMS, choices=MAIN_ARMS + REFERENCE_ARMS)
    parser.add_argument("--references", nargs="*", default=REFERENCE_ARMS, choices=REFERENCE_ARMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    parser.add_argument("--results", help="results folder (default benchmarks/results/<mode>)")
    parser.add_argument("--workdir", default=str(REPO / "runs" / "allocation_quality"))
    parser.add_argument("--table", action="store_true", help="only rebuild the table and figures")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once, each with cpu_count // jobs threads (default 1)"
    )
    parser.add_argument("--run-one", nargs=3, metavar=("TASK", "ARM", "SEED"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def report(args: argparse.Namespace, planned: list[tuple[str, str, int]]) -> str:
    folder = results_dir(args)
    results = load_results(folder)
    arms = list(dict.fromkeys(arm for _, arm, _ in planned))
    tasks = list(dict.fromkeys(task for task, _, _ in planned))
    table = build_table(results, tasks, arms, expected_runs=len(planned))
    for task in tasks:
        for arm in arms:
            runs = [r for r in results if r["task"] == task and r["arm"] == arm]
            if runs:
                layout_figure(
                    runs, folder / "figures" / f"{task}__{arm}.png", f"{task} / {arm}: final layout"
                )
    (folder / "table.md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    folder = results_dir(args)
    if args.run_one:
        task, arm, seed = args.run_one[0], args.run_one[1], int(args.run_one[2])
        workdir = Path(args.workdir) / folder.name / f"{task}__{arm}__seed{seed}"
        run_one(
            task, arm, seed, result_path(folder, task, arm, seed), workdir, args.quick, args.real, args.gpu
        )
        return 0
    planned = plan_runs(args)
    if not args.table:
        todo = []
        for task, arm, seed in planned:
            path = result_path(folder, task, arm, seed)
            if path.exists():
                print(f"skip {path.name} (finished)")
            else:
                todo.append((task, arm, seed))
        run_pending(args, folder, todo[: args.max_runs] if args.max_runs is not None else todo)
    print(report(args, planned))
    return 0


def run_pending(args: argparse.Namespace, folder: Path, todo: list[tuple[str, str, int]]) -> None:
    """Each run in its own subprocess, up to ``--jobs`` at once; a failed run is reported, not fatal."""
    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LAYERMOE_PARALLEL_RUNS": str(args.jobs)}
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = str(threads)
    runs = []
    for task, arm, seed in todo:
        path = result_path(folder, task, arm, seed)
        command = [sys.executable, __file__, "--run-one", task, arm, str(seed), "--results", str(folder)]
        command += ["--workdir", args.workdir] + (["--quick"] if args.quick else [])
        command += (["--real"] if args.real else []) + (["--gpu"] if args.gpu else [])
        # interleaved output of parallel runs would be unreadable: one log each
        log = Path(args.workdir) / folder.name / f"{path.stem}.log" if args.jobs > 1 else None
        runs.append(QueuedRun(f"{task} / {arm} / seed {seed}", command, path, log))
    run_queue(runs, args.jobs, env)


if __name__ == "__main__":
    raise SystemExit(main())
