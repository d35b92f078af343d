"""Where does influence-guided capacity help? Budget x arm x task sweep (issue 27), resumable.

    python benchmarks/allocation_sweep.py --phase primary --jobs 2      # the primary grid, seed by seed
    python benchmarks/allocation_sweep.py --phase secondary --jobs 2    # controls/options at the tight budget
    python benchmarks/allocation_sweep.py --phase default --jobs 2      # the chosen defaults at the generous one
    python benchmarks/allocation_sweep.py --table                       # only rebuild table + figure
    python benchmarks/allocation_sweep.py --quick                       # tiny random model, 4 runs (~3 min)
    python benchmarks/allocation_sweep.py --phase curve --jobs 2        # capacity curve (issue 34), see below
    python benchmarks/allocation_sweep.py --phase curve --table         # only rebuild the curve's table
    python benchmarks/allocation_sweep.py --phase curve --quick         # tiny random model, 6 runs (tested)
    python benchmarks/allocation_sweep.py --phase grow --jobs 2         # growth sweep (issue 34): growth_sweep.py
    python benchmarks/allocation_sweep.py --phase grow --table          # only rebuild the growth sweep's table

The capacity curve (issue 34, ``--phase curve``, results under ``benchmarks/results/curve``): uniform
MoE-LoRA (no callback) on the generative tasks ``facts``, ``skills`` and ``translate`` (benchmarks/tasks.py,
written into each run's folder with a validation file; ``configs/experiments/allocation_sweep/generative.yaml``)
at the budgets ``CURVE["budgets"]``, each over a learning-rate grid on seed 0; the lr with the lowest
validation loss is chosen per (task, budget), then seeds 1 and 2 run at it (``benchmarks/capacity_curve.py``);
``CURVE["grid_only"]`` adds cells that run the seed-0 grid only (``--budgets`` replaces both). The
driver plans again after each round until every cell has its seeds, so one command runs it all and resumes.
Its runs' metrics: test loss over the answer tokens with the final weights (per-sample mean, the primary,
and token mean) and exact match, by ``benchmarks/peft_parity.py``'s evaluator; the same on the validation
file; Lightning's validation loss at each check.

Every run is train.py's configuration: ``configs/experiments/allocation_sweep/base.yaml`` + the task's YAML +
``budgets/<budget>.yaml`` + the arm's callback (``ARMS`` below, written to ``<workdir>/<run>/arm.yaml``;
none for ``uniform``), with ``--seed_everything <seed> --data.seed <seed>``. Each run is one subprocess that
writes one JSON under ``--results`` when it finishes; reruns skip finished runs, and the table reports
"k of N runs". All arms of a budget start from its uniform layout and reallocate with ``budget: current``
and ``experts_bounds: [0, null]`` (a block may end with no adapter; the ``default`` arm keeps the callback's
floor of one expert), so they train the same number of
parameters (at most; the allocator leaves what no block can take) for the same number of optimizer steps.

The primary metric is the mean test loss of the label token with the final weights, computed here over
the whole test file (``evaluate_label_loss``); accuracy (and MCC) are recorded with the final weights and
with the checkpoint chosen on the validation slice. The scorer arms also score a second, independent
draw of training samples at the rewire step (``second_draw``) for the score-stability figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import capacity_curve  # noqa: E402
import growth_sweep  # noqa: E402
from allocation_quality import machine_description, tiny_task_files  # noqa: E402
from capacity_curve import run_name  # noqa: E402
from quality_results import load_results, write_result  # noqa: E402
from run_queue import QueuedRun, run_queue  # noqa: E402
from sweep_report import write_report  # noqa: E402

CONFIGS = REPO / "configs" / "experiments" / "allocation_sweep"
TASK_CONFIGS = {
    "sst2": REPO / "configs" / "experiments" / "allocation_quality" / "sst2.yaml",
    "cola": REPO / "configs" / "experiments" / "allocation_quality" / "cola.yaml",
    "sarcasm": CONFIGS / "sarcasm.yaml",
    **dict.fromkeys(capacity_curve.GENERATIVE_TASKS, CONFIGS / "generative.yaml"),
}
QUICK_CONFIG = REPO / "configs" / "experiments" / "allocation_quality" / "quick_tiny.yaml"
QUICK_GENERATIVE_CONFIG = CONFIGS / "quick_generative.yaml"
BUDGETS = ["tight", "mid", "generous"]  # 0.043%, 0.45%, 4.1% of SmolLM2's parameters
#: every budget YAML, smallest first: tiny 0.017%, tight 0.043%, quarter7 0.061%, qv2 0.086%, half7 0.113%,
#: qv4 0.171%, small 0.227%, mid 0.454%, large 1.362%, generous 4.077% of SmolLM2's parameters (each file
#: says how)
ALL_BUDGETS = capacity_curve.BUDGET_ORDER
SELECTION_METRIC = {"cola": "val/mcc"}  # model selection; accuracy elsewhere (CoLA: majority class wins acc)

_COMMON = {
    "budget": "current",
    "schedule": {"warmup": 0.3},
    "num_train_samples": 128,
    "num_val_samples": 64,
    # exact per-sample gradient rows of the generous budget's adapters (4.2 GB) in one capture pass
    "capture_options": {"max_store_bytes": 5 * 2**30},
    "plot": False,
}
_LAYERIF = {"scorer": "layerif", "allocator": "power_law"}
_CURVATURE = {"scorer": "curvature_gain", "allocator": "mdl"}
#: arm -> LayerInfluenceCallback arguments (merged over _COMMON; allocator_options over experts_bounds [0, null]
#: and error_shrinkage 0).
#: "{seed}" is replaced by the run's seed (placebo: a different permutation per seed).
ARMS: dict[str, dict[str, Any] | None] = {
    "uniform": None,
    "layerif": _LAYERIF,
    "curvature": _CURVATURE,
    "placebo-layerif": {
        **_LAYERIF,
        "scorer": "placebo",
        "scorer_options": {"scorer": "layerif", "seed": "{seed}"},
    },
    "placebo-curvature": {
        **_CURVATURE,
        "scorer": "placebo",
        "scorer_options": {"scorer": "curvature_gain", "seed": "{seed}"},
    },
    "inverse-layerif": {**_LAYERIF, "scorer": "inverse", "scorer_options": {"scorer": "layerif"}},
    # MoLA: experts rising by quarters of the depth, fixed before the first step
    "pattern": {
        "scorer": "pattern",
        "allocator": "power_law",
        "allocator_options": {"shift": False},
        "schedule": {"warmup": 0},
    },
    "shrink-layerif": {**_LAYERIF, "allocator_options": {"error_shrinkage": 1.0}},
    "shrink-curvature": {**_CURVATURE, "allocator_options": {"error_shrinkage": 1.0}},
    "beta0.5-layerif": {**_LAYERIF, "allocator_options": {"beta": 0.5}},
    "beta0.25-layerif": {**_LAYERIF, "allocator_options": {"beta": 0.25}},
    # power_law on the raw scores: the lowest block keeps a share instead of being the zero point
    "noshift-layerif": {**_LAYERIF, "allocator_options": {"shift": False}},
    # mdl weighs q^beta with beta = 2 by default: 1 is the gentler skew
    "beta1-curvature": {**_CURVATURE, "allocator_options": {"beta": 1.0}},
    # LayerIF as published: from the frozen base's attention weights, before the first step
    "oneshot-layerif": {
        **_LAYERIF,
        "scope": "base",
        "capture_options": {"modules": ["self_attn"], "projection_dim": 16384},
        "schedule": {"warmup": 0},
    },
    # the callback's defaults chosen from the tight budget (issue 27): the tied no-move arms' settings with
    # the uncertainty option on and no block emptied; a no-op at tight and mid by construction (one expert
    # per block is both the budget and the floor), so it runs at the generous budget
    "default": {**_LAYERIF, "allocator_options": {"error_shrinkage": 1.0, "experts_bounds": [1, None]}},
}
PRIMARY_ARMS = ["uniform", "layerif", "curvature", "placebo-layerif", "placebo-curvature"]
SECONDARY_ARMS = [
    "inverse-layerif",
    "pattern",
    "shrink-layerif",
    "shrink-curvature",
    "beta0.5-layerif",
    "beta0.25-layerif",
    "noshift-layerif",
    "beta1-curvature",
    "oneshot-layerif",
]
SCORER_ARMS = {"layerif", "curvature", "shrink-layerif", "shrink-curvature", "beta0.5-layerif"}
_TASKS = ["sst2", "sarcasm"]  # CoLA is not learned in 120 steps on this CPU (README): sarcasm replaces it
#: the grid, part by part: the primary comparison everywhere, the secondary arms at the tight budget on one
#: task, then the defaults chosen from them at the generous budget (the issue's check)
PHASES: dict[str, dict[str, list]] = {
    "primary": {"tasks": _TASKS, "budgets": BUDGETS, "arms": PRIMARY_ARMS},
    "secondary": {"tasks": ["sst2"], "budgets": ["tight"], "arms": ["uniform", *SECONDARY_ARMS]},
    "default": {"tasks": _TASKS, "budgets": ["generous"], "arms": ["uniform", "default"]},
}
QUICK = {"tasks": ["sst2"], "budgets": ["generous"], "arms": ["uniform", "layerif"], "seeds": [0, 1]}
#: the capacity curve: uniform at each budget over the lr grid (seed 0), then the other seeds at the lr
#: chosen on validation loss; a best lr at the grid's edge grows the grid by one step, at most
#: max_extensions times per cell; the ratio is the issue's criterion (tight / the largest budget)
CURVE: dict[str, Any] = {
    # the tasks where the budget binds; skills, which does not, runs the grids its ratio needs (grid_only)
    "tasks": ["facts", "translate"],
    # every seed at these; the criterion (tight / large) and the growth sweep's budgets are among them
    "budgets": ["tight", "quarter7", "half7", "small", "large"],
    # the lr grid on seed 0 only: where facts' budget binds (q/v rank or adapted blocks), and skills' ratio
    "grid_only": {"facts": ["tiny", "qv2", "qv4", "mid"], "skills": ["tight", "quarter7", "large"]},
    "lrs": [2e-3, 4e-3, 8e-3],
    "seeds": [0, 1, 2],
    "max_extensions": 2,
    "ratio": ("tight", "large"),
}
CURVE_QUICK: dict[str, Any] = {
    **CURVE,
    "tasks": ["facts"],
    "budgets": ["tight", "mid"],
    "lrs": [3e-3, 1e-2],
    "seeds": [0, 1],
    "max_extensions": 0,
    "grid_only": {},
    "ratio": ("tight", "mid"),
}

Run = tuple[str, str, str, int]  # task, budget, arm, seed


def callback_config(arm: str, seed: int) -> dict[str, Any] | None:
    """The arm's ``LayerInfluenceCallback`` init_args (None: no callback)."""
    spec = ARMS[capacity_curve.split_arm(arm)[0]]
    if spec is None:
        return None
    args: dict[str, Any] = json.loads(json.dumps({**_COMMON, **spec}).replace('"{seed}"', str(seed)))
    # the arms as they ran: blocks may be emptied, and no shrinkage unless the arm asks for it (the callback's
    # default became error_shrinkage 1 after the sweep, from its results)
    base = {"experts_bounds": [0, None], "error_shrinkage": 0.0}
    args["allocator_options"] = {**base, **spec.get("allocator_options", {})}
    return args


def plan_runs(tasks: list[str], budgets: list[str], arms: list[str], seeds: list[int]) -> list[Run]:
    """Seed by seed (then budget, task, arm): an interrupted sweep has whole paired seeds to compare."""
    return [(t, b, a, s) for s in seeds for b in budgets for t in tasks for a in arms]


# ---------------------------------------------------------------------------------------------- one run
def evaluate_label_loss(module: Any, loader: Any) -> dict[str, float]:
    """Mean label-token loss, accuracy and MCC over every row of ``loader`` with the module's weights now."""
    import torch
    from torchmetrics.functional.classification import binary_matthews_corrcoef, multiclass_matthews_corrcoef

    from layermoe.adapters import collect_router_losses
    from layermoe.lightning_modules.losses import label_loss

    was_training = module.training
    module.eval()
    losses, predictions, labels = [], [], []
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            logits = module.label_logits(batch)
            collect_router_losses(module.model)
            losses.append(label_loss(logits, batch["labels"]).float().cpu())
            scores = logits.gather(1, batch["candidate_token_ids"].to(logits.device))
            predictions.append(scores.argmax(dim=1).cpu())
            labels.append(batch["class_label"].cpu())
    module.train(was_training)
    loss, pred, label = torch.cat(losses), torch.cat(predictions), torch.cat(labels)
    classes = int(max(int(label.max()), int(pred.max())) + 1)
    mcc = (
        binary_matthews_corrcoef(pred, label)
        if classes <= 2
        else multiclass_matthews_corrcoef(pred, label, num_classes=classes)
    )
    return {
        "label_loss": float(loss.mean()),
        "accuracy": float((pred == label).float().mean()),
        "mcc": float(mcc),
        "rows": int(label.numel()),
    }


def second_draw(callback: Any, offset: int = 1000) -> list[dict[int, float]]:
    """Make ``callback`` score a second, independent draw of training samples (seed + ``offset``) each time
    it scores, and return the list those scores land in. The allocation uses the first draw only.

    Wraps the callback's ``rewiring.score``: the stability measurement needs both draws at the very same
    weights and step, which no public hook offers (benchmark-only; the library never does this)."""
    draws: list[dict[int, float]] = []
    rewiring = callback.rewiring
    original = rewiring.score

    def score_twice(trainer: Any, pl_module: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(trainer, pl_module, *args, **kwargs)
        rewiring.seed += offset
        try:
            draws.append(dict(original(trainer, pl_module, *args, **kwargs)[0]))
        finally:
            rewiring.seed -= offset
        return result

    rewiring.score = score_twice
    return draws


def configured_steps(quick: bool, max_steps: int | None) -> int:
    """A generative run's optimizer steps: the override, else the quick or the task config's."""
    if max_steps is not None:
        return max_steps
    config = QUICK_GENERATIVE_CONFIG if quick else TASK_CONFIGS[capacity_curve.GENERATIVE_TASKS[0]]
    return int(yaml.safe_load(config.read_text())["trainer"]["max_steps"])


def run_one(
    run: Run, out: Path, workdir: Path, quick: bool, max_steps: int | None = None, phase: str | None = None
) -> None:
    """One run in this process, its result written to ``out`` (``phase="grow"``: the growth sweep's arms,
    schedule and validation cadence, ``growth_sweep.py``)."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from layermoe.adapters import layout
    from layermoe.callbacks import LayerInfluenceCallback
    from layermoe.cli import LayerMoECLI

    task, budget, arm, seed = run
    generative = task in capacity_curve.GENERATIVE_TASKS
    lr = capacity_curve.split_arm(arm)[1]
    sys.argv = sys.argv[:1]  # LightningCLI reads sys.argv too
    workdir.mkdir(parents=True, exist_ok=True)
    args = ["--config", str(CONFIGS / "base.yaml"), "--config", str(TASK_CONFIGS[task])]
    args += ["--config", str(CONFIGS / "budgets" / f"{budget}.yaml")]
    grow = phase == "grow"
    if grow:
        steps = configured_steps(quick, max_steps)
        callback = growth_sweep.arm_callback(arm, seed, budget, steps, _COMMON)
    else:
        callback = callback_config(arm, seed)
    if callback is not None:
        arm_file = workdir / "arm.yaml"
        entry = {"class_path": "layermoe.callbacks.LayerInfluenceCallback", "init_args": callback}
        arm_file.write_text(yaml.safe_dump({"trainer": {"callbacks": [entry]}}, sort_keys=False))
        args += ["--config", str(arm_file)]
    if generative:
        args += ["--config", str(QUICK_GENERATIVE_CONFIG)] if quick else []
        files = capacity_curve.write_task_files(task, workdir / "data", quick)
        args += ["--data.train_file", files["train"], "--data.test_file", files["test"]]
        args += ["--data.val_file", files["validation"]]
    elif quick:
        args += ["--config", str(QUICK_CONFIG)]
        files = tiny_task_files(workdir / "data", seed=0)
        args += ["--data.train_file", files["train"], "--data.test_file", files["test"]]
    if grow:  # after every config file: the quick one sets its own cadence
        args += ["--trainer.val_check_interval", str(growth_sweep.validation_interval(steps))]
    if lr is not None:
        args += ["--model.lr", repr(lr)]
    if max_steps is not None:  # a smoke run: the warm-up shrinks with it (the configs' is 10 steps)
        args += ["--trainer.max_steps", str(max_steps), "--model.warmup_steps", str(max(1, max_steps // 10))]
    args += ["--seed_everything", str(seed), "--data.seed", str(seed)]
    args += ["--trainer.default_root_dir", str(workdir), "--trainer.logger.init_args.save_dir", str(workdir)]
    cli = LayerMoECLI(args=args, run=False)
    trainer, module = cli.trainer, cli.model
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    influence = [c for c in trainer.callbacks if isinstance(c, LayerInfluenceCallback)]
    if quick:
        for c in influence:  # the tiny smoke run only checks the plumbing
            c.num_train_samples, c.num_val_samples = 16, 16
    draws = second_draw(influence[0]) if influence and arm in SCORER_ARMS else None
    val_history = ValidationHistory()
    trainer.callbacks.append(val_history)
    params_history = AdapterParamsHistory()  # after the influence callback: sees a round in its own step
    trainer.callbacks.append(params_history)
    selection = None
    if not generative:  # generative runs are judged by their final weights only (no accuracy to select on)
        selection = ModelCheckpoint(
            dirpath=str(workdir / "best"),
            monitor=SELECTION_METRIC.get(task, "val/acc"),
            mode="max",
            save_top_k=1,
        )
        trainer.callbacks.append(selection)
    start = time.perf_counter()
    trainer.fit(module, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    cli.datamodule.setup("test")
    extra: dict[str, Any] = {}
    if generative:
        final, extra["validation"] = evaluate_generative(module, cli.datamodule)
        selected = None
    else:
        final = evaluate_label_loss(module, cli.datamodule.test_dataloader())
        selected = select_checkpoint(trainer, module, cli.datamodule, selection, final)
    history = json.loads(json.dumps(influence[0].history, default=str)) if influence else []
    result: dict[str, Any] = {
        "task": task,
        "budget": budget,
        "arm": arm,
        "seed": seed,
        "quick": quick,
        "steps": int(trainer.global_step),
        "final": final,
        **extra,
        "selected": selected,
        "lr": float(module.hparams.lr),
        "val_history": val_history.losses,
        "params_history": params_history.counts,
        "max_steps_override": max_steps,
        "trainable_params": int(sum(p.numel() for p in module.parameters() if p.requires_grad)),
        "base_params": int(sum(p.numel() for n, p in module.model.named_parameters() if "lora_" not in n)),
        "final_layout": {str(k): v for k, v in layout(module.model).items()},
        "rewires": history,
        "second_draw_scores": [{str(k): v for k, v in d.items()} for d in draws] if draws else None,
        "callback": callback,
        "fit_seconds": fit_seconds,
        "wall_time_s": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
        "precision": str(trainer.precision),
        "machine": machine_description(),
        "code": code_version(),
        "parallel_runs": int(os.environ.get("LAYERMOE_PARALLEL_RUNS", "1")),
    }
    write_result(out, result)


def select_checkpoint(
    trainer: Any, module: Any, datamodule: Any, selection: Any, final: dict[str, float]
) -> dict[str, Any]:
    """Test accuracy and MCC with the checkpoint chosen on the validation slice (the final weights' when
    that is the one chosen)."""
    best_path = selection.best_model_path
    best_step = int(m.group(1)) if (m := re.search(r"step=(\d+)", Path(best_path).name)) else None
    if best_step is not None and best_step != trainer.global_step:
        metrics = trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)[0]
        selected = {
            "accuracy": float(metrics["test/acc"]),
            "mcc": float(metrics.get("test/mcc", float("nan"))),
        }
    else:  # the selected checkpoint is the final weights
        selected = {"accuracy": final["accuracy"], "mcc": final["mcc"]}
    return {**selected, "step": best_step}


def evaluate_generative(module: Any, datamodule: Any) -> tuple[dict[str, float], dict[str, float]]:
    """Test and validation metrics with the weights now, by the parity benchmark's evaluator (the one
    that checks both systems there): answer-token loss per sample and per token, exact match."""
    from peft_parity import evaluate, project_examples

    pad_id = datamodule.prepare_tokenizer().pad_token_id
    batch_size = datamodule.hparams.get("eval_batch_size") or datamodule.hparams["batch_size"]
    out = []
    for stage in ("test", "val"):
        examples = project_examples(datamodule, stage)
        out.append({**evaluate(module.model, examples, pad_id, batch_size, None), "rows": len(examples)})
    module.train()
    return out[0], out[1]


def adapter_params(model: Any) -> int:
    """Trainable parameters of the MoE-LoRA layers (experts and routers; the frozen base excluded)."""
    from layermoe.adapters import named_moe_layers

    layers = named_moe_layers(model).values()
    return sum(p.numel() for layer in layers for p in layer.parameters() if p.requires_grad)


class AdapterParamsHistory(Callback):
    """Trainable adapter parameters over the fit: ``[step, params, event]`` at the start, after every
    optimizer step that changed them (a growth round, a rewire) and at each validation check."""

    def __init__(self) -> None:
        self.counts: list[tuple[int, int, str]] = []

    def _record(self, trainer: Any, pl_module: Any, event: str) -> None:
        params = adapter_params(pl_module.model)
        if event != "changed" or not self.counts or self.counts[-1][1] != params:
            self.counts.append((int(trainer.global_step), params, event))

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._record(trainer, pl_module, "start")

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self._record(trainer, pl_module, "changed")

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._record(trainer, pl_module, "validation")


class ValidationHistory(Callback):
    """Lightning's validation loss (per-sample mean over the answer tokens) at each check, by step."""

    def __init__(self) -> None:
        self.losses: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and "val/loss" in trainer.callback_metrics:
            self.losses.append((int(trainer.global_step), float(trainer.callback_metrics["val/loss"])))


def code_version() -> str:
    """The commit the run's code came from (+ "-dirty" when the library, benchmarks or configs differ
    from it): a sweep spans sessions, and a table should say which code each of its runs used."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (
        "-dirty"
        if git("status", "--porcelain", "--", "layermoe", "benchmarks", "configs", ":!benchmarks/results")
        else ""
    )


# ---------------------------------------------------------------------------------------------- driver
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--phase",
        choices=[*PHASES, "curve", "grow", "all"],
        default=None,
        help="which part of the grid (default: primary; --table: all but curve and grow); curve: the"
        " capacity curve; grow: the growth sweep (growth_sweep.py)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny random model, 1 budget x 2 arms x 2 seeds (~1 min)"
    )
    parser.add_argument("--tasks", nargs="+", choices=list(TASK_CONFIGS))
    parser.add_argument("--budgets", nargs="+", choices=ALL_BUDGETS)
    parser.add_argument("--arms", nargs="+", choices=list(dict.fromkeys([*ARMS, *growth_sweep.ARMS])))
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--lrs", nargs="+", type=float, help="curve: the lr grid (default CURVE['lrs'])")
    parser.add_argument(
        "--max-lr-extensions",
        type=int,
        default=None,
        help="curve: grid steps added when the best lr is at an edge",
    )
    parser.add_argument("--results", help="results folder (default benchmarks/results/<phase>[-quick])")
    parser.add_argument(
        "--curve-results",
        help="grow: the capacity curve's results, read for uniform's lr and its runs"
        " (default benchmarks/results/curve[-quick])",
    )
    parser.add_argument("--workdir", default=str(REPO / "runs" / "allocation_sweep"))
    parser.add_argument("--table", action="store_true", help="only rebuild the report from finished runs")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="override the step count, warm-up a tenth of it (smoke runs; give them their own --results)",
    )
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at once, each with cpu_count // jobs threads"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per run (default cpu_count // jobs)"
    )
    parser.add_argument(
        "--run-one", nargs=4, metavar=("TASK", "BUDGET", "ARM", "SEED"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.phase is None:
        args.phase = "all" if args.table else "primary"
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.phase == "curve" and args.arms:
        parser.error("--phase curve runs the uniform arm only (at each lr of its grid); drop --arms")
    if args.lrs is not None and (len(set(args.lrs)) != len(args.lrs) or min(args.lrs) <= 0):
        parser.error(f"--lrs must be distinct positive learning rates, got {args.lrs}")
    if (
        args.phase in ("curve", "grow")
        and args.tasks
        and set(args.tasks) - set(capacity_curve.GENERATIVE_TASKS)
    ):
        parser.error(
            f"--phase {args.phase} runs generative tasks only: {list(capacity_curve.GENERATIVE_TASKS)}"
        )
    if args.phase == "grow" and args.arms and set(args.arms) - set(growth_sweep.ARMS):
        parser.error(f"--phase grow arms are {list(growth_sweep.ARMS)}, got {args.arms}")
    if args.phase == "grow" and args.arms and "uniform" not in args.arms:
        parser.error(
            "--phase grow --arms must include uniform: every arm is compared with it, paired by seed"
        )
    if args.phase != "grow" and args.arms and set(args.arms) - set(ARMS):
        parser.error(f"--phase {args.phase}: arms {sorted(set(args.arms) - set(ARMS))} are --phase grow's")
    return args


def planned_runs(args: argparse.Namespace) -> list[Run]:
    """The runs of ``--phase`` (every phase for "all"); a --tasks/--budgets/--arms/--seeds given replaces
    the phase's own list."""
    parts = [QUICK] if args.quick else list(PHASES.values()) if args.phase == "all" else [PHASES[args.phase]]
    planned: dict[Run, None] = {}
    for part in parts:
        pick = {
            key: getattr(args, key) or part.get(key, [0, 1, 2])
            for key in ("tasks", "budgets", "arms", "seeds")
        }
        planned.update(dict.fromkeys(plan_runs(pick["tasks"], pick["budgets"], pick["arms"], pick["seeds"])))
    return list(planned)


def results_dir(args: argparse.Namespace) -> Path:
    if args.results:
        return Path(args.results)
    name = args.phase if args.phase in ("curve", "grow") else "sweep"
    return REPO / "benchmarks" / "results" / (f"{name}-quick" if args.quick else name)


def curve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The curve's plan: CURVE (CURVE_QUICK with --quick), with --tasks/--budgets/--seeds/--lrs/
    --max-lr-extensions replacing its own."""
    settings = dict(CURVE_QUICK if args.quick else CURVE)
    for key, value in (
        ("tasks", args.tasks),
        ("budgets", args.budgets),
        ("seeds", args.seeds),
        ("lrs", args.lrs),
    ):
        if value:
            settings[key] = list(value)
    # named budgets are the whole plan; named tasks keep their own grid-only cells
    grid_only = {} if args.budgets else settings.get("grid_only", {})
    settings["grid_only"] = {t: list(b) for t, b in grid_only.items() if not args.tasks or t in args.tasks}
    if args.max_lr_extensions is not None:
        settings["max_extensions"] = args.max_lr_extensions
    settings["budgets"] = sorted(settings["budgets"], key=ALL_BUDGETS.index)
    return settings


def curve_plans(args: argparse.Namespace, folder: Path) -> list[capacity_curve.CellPlan]:
    settings = curve_settings(args)
    return capacity_curve.plan_curve(
        load_results_of(folder),
        settings["tasks"],
        settings["budgets"],
        settings["lrs"],
        settings["seeds"],
        settings["max_extensions"],
        settings["grid_only"],
    )


def run_curve(args: argparse.Namespace, folder: Path) -> str:
    """Plan, run what the plan needs now, plan again (a finished grid chooses its lr, and its other seeds
    become runnable) until nothing is left or --max-runs is spent; then the table."""
    settings = curve_settings(args)
    budget = args.max_runs
    while not args.table:
        todo = [run for plan in curve_plans(args, folder) for run in plan.todo]
        # grids before seeds: every cell's lr is chosen as early as the queue allows
        todo.sort(key=lambda run: (run[3] != settings["seeds"][0], run[3]))
        if budget is not None:
            todo = todo[: max(0, budget)]
            budget -= len(todo)
        if not todo:
            break
        print(f"curve: {len(todo)} runs to start in this round", flush=True)
        run_pending(args, folder, todo)
    plans = curve_plans(args, folder)
    return capacity_curve.write_curve_report(
        load_results_of(folder), folder, plans, settings["seeds"], tuple(settings["ratio"])
    )


def curve_results_dir(args: argparse.Namespace) -> Path:
    """Where the grow phase reads the capacity curve's runs (uniform's lr and the runs it reuses)."""
    if args.curve_results:
        return Path(args.curve_results)
    return REPO / "benchmarks" / "results" / ("curve-quick" if args.quick else "curve")


def grow_plan(args: argparse.Namespace, folder: Path) -> tuple[list[Run], str]:
    """The grow phase's runs as far as known now (seeds by the power rule) and why that many seeds;
    ``GrowPlanError`` before anything runs when a cell's lr is not chosen (with ``--table``, the cells
    whose lr is chosen, and the others named as waiting on the curve)."""
    settings = dict(growth_sweep.GROW_QUICK if args.quick else growth_sweep.GROW)
    for key in ("tasks", "arms"):
        settings[key] = list(getattr(args, key) or settings[key])
    budgets = {t: args.budgets for t in settings["tasks"]} if args.budgets else settings["budgets"]
    cells = growth_sweep.grow_cells(settings["tasks"], budgets)
    curve_folder = curve_results_dir(args)
    curve = CURVE_QUICK if args.quick else CURVE  # the curve's own grid and seeds, not this phase's
    lrs = growth_sweep.chosen_lrs(load_results_of(curve_folder), cells, curve, curve_folder, args.table)
    waiting = [f"{t}/{b}" for t, b in cells if (t, b) not in lrs]
    if args.seeds:
        seeds, why = list(args.seeds), f"{len(args.seeds)} seeds (--seeds)"
    else:
        seeds, why = growth_sweep.seed_plan(
            load_results_of(folder), cells, settings["arms"], lrs, settings["min_seeds"], settings["max_runs"]
        )
    planned = growth_sweep.plan_runs(cells, settings["arms"], seeds, lrs)
    if waiting:
        why += f"; not shown, their lr not chosen by the capacity curve yet: {', '.join(waiting)}"
    return planned, why


def run_grow(args: argparse.Namespace, folder: Path) -> str:
    """Plan, reuse the curve's matching uniform runs, run the rest, plan again (the power rule may ask for
    more seeds once paired runs exist) until nothing is left or --max-runs is spent; then the table."""
    budget = args.max_runs
    steps = configured_steps(args.quick, args.max_steps)
    while not args.table:
        planned, _ = grow_plan(args, folder)
        todo = [r for r in planned if not (folder / f"{run_name(r)}.json").exists()]
        todo = growth_sweep.reuse_uniform_runs(
            todo, curve_results_dir(args), folder, steps, args.quick, args.max_steps
        )
        print(f"grow: {len(planned) - len(todo)} of {len(planned)} planned runs done or reused", flush=True)
        if budget is not None:
            todo = todo[: max(0, budget)]
            budget -= len(todo)
        if not todo:
            break
        run_pending(args, folder, todo)
    planned, why = grow_plan(args, folder)
    return growth_sweep.write_grow_report(load_results_of(folder), folder, planned, why)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    folder = results_dir(args)
    if args.run_one:
        task, budget, arm, seed = args.run_one
        run = (task, budget, arm, int(seed))
        name = run_name(run)
        workdir = Path(args.workdir) / folder.name / name
        run_one(run, folder / f"{name}.json", workdir, args.quick, args.max_steps, args.phase)
        return 0
    if args.phase == "curve":
        print(run_curve(args, folder))
        return 0
    if args.phase == "grow":
        try:
            print(run_grow(args, folder))
        except growth_sweep.GrowPlanError as err:
            print(err, file=sys.stderr)
            return 2
        return 0
    planned = planned_runs(args)
    if not args.table:
        todo = [r for r in planned if not (folder / f"{run_name(r)}.json").exists()]
        print(f"{len(planned) - len(todo)} of {len(planned)} planned runs already finished", flush=True)
        run_pending(args, folder, todo[: args.max_runs] if args.max_runs is not None else todo)
    print(write_report(load_results_of(folder), folder, planned))
    return 0


def load_results_of(folder: Path) -> list[dict[str, Any]]:
    return [r for r in load_results(folder) if "budget" in r]


def run_pending(args: argparse.Namespace, folder: Path, todo: list[Run]) -> None:
    """Each run in its own subprocess with its own log, up to ``--jobs`` at once."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LAYERMOE_PARALLEL_RUNS": str(args.jobs)}
    env["OMP_NUM_THREADS"] = str(threads)
    runs = []
    for run in todo:
        name = run_name(run)
        command = [sys.executable, __file__, "--run-one", run[0], run[1], run[2], str(run[3])]
        command += ["--results", str(folder), "--workdir", args.workdir] + (["--quick"] if args.quick else [])
        command += [] if args.max_steps is None else ["--max-steps", str(args.max_steps)]
        command += ["--phase", args.phase] if args.phase == "grow" else []
        log = Path(args.workdir) / folder.name / f"{name}.log"
        runs.append(QueuedRun(name, command, folder / f"{name}.json", log))
    run_queue(runs, args.jobs, env)


if __name__ == "__main__":
    raise SystemExit(main())
