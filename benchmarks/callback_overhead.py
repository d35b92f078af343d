"""LayerInfluenceCallback overhead on SmolLM2-135M + SST-2 (batch 8), measured inside one run.

One fit with the callback (one rewire at ``--rewire-at`` of the run). The callback's hooks are timed
directly, so the training step time and the callback time come from the same run on the same machine:

- overhead of this run = time in the callback's hooks / wall time of the fit;
- extrapolated overhead for ``--extrapolate-steps`` (1,000) optimizer steps = callback time /
  (callback time + 1,000 x median step time), since the callback's cost is per rewire, not per step;
- one rewire: scoring (capture + scorer + allocation), the rewire (surgery + DDP re-wrap + optimizer
  rebuild + state carry-over) and the surgery alone (``apply_layout``);
- rewire disturbance: mean loss on the m scoring validation samples right before vs right after the
  rewire, and, side by side on the same samples and the same planned layout, a naive re-initialization
  of the resized layers (fresh LoRA init: A random, B zero) instead of the function-preserving resize;
- the scoring floor, measured in the same run after the fit: one forward+backward (train mode, the
  per-sample loss averaged, parameter gradients formed) over exactly the n + m samples the callback
  scored, in batches of the scoring batch size; extrapolated like the callback, and callback / floor;
- peak memory: the process RSS sampled every 20 ms, its maximum during the training steps before the
  rewire vs its maximum during scoring.

    python -m layermoe.models prepare smollm2        # once: ~/.cache/layermoe/smollm2-135m-instruct
    nohup python benchmarks/callback_overhead.py --steps 60 \
        --out /tmp/callback.md > /tmp/callback_overhead.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from layermoe.adapters import named_moe_layers  # noqa: E402
from layermoe.callbacks import LayerInfluenceCallback  # noqa: E402
from layermoe.callbacks import data as data_utils  # noqa: E402
from layermoe.callbacks.scoring_pass import mean_loss, resolve_per_sample_loss  # noqa: E402
from layermoe.callbacks.transaction import ModuleSnapshot  # noqa: E402

if TYPE_CHECKING:
    from layermoe.lightning_modules import TextDataModule

_HOOKS = ("setup", "on_fit_start", "on_train_batch_start", "on_train_batch_end", "on_validation_end")


class TimedCallback(LayerInfluenceCallback):
    """The product callback with its hooks timed, plus a naive re-initialization probe.

    The probe runs inside the timed ``on_train_batch_end``; its own time is kept in ``naive_seconds`` and
    subtracted from the callback's time and from the fit's wall time.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_seconds = 0.0
        self.naive_seconds = 0.0
        self.naive: dict[str, float] = {}
        for name in _HOOKS:
            original = getattr(self, name)

            def timed(*args: Any, _original: Any = original, **kw: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _original(*args, **kw)
                finally:
                    self.hook_seconds += time.perf_counter() - start

            setattr(self, name, timed)
        self._score_unwrapped = self.rewiring.score
        self.rewiring.score = self._scored

    def _scored(
        self, trainer: Trainer, pl_module: Any, *args: Any, **kwargs: Any
    ) -> tuple[dict[int, float], dict[int, float] | None]:
        """``rewiring.score`` (installed in ``__init__``) with the memory phase marked."""
        self.memory.phase = "scoring"
        try:
            scores = self._score_unwrapped(trainer, pl_module, *args, **kwargs)
        finally:
            self.memory.phase = "after"
        # the samples just scored, kept for the floor measurement (benchmark work: excluded)
        start = time.perf_counter()
        train = data_utils.training_batches(
            self.rewiring.training_loader(trainer),
            self.num_train_samples,
            self.seed + trainer.global_rank,
            self.scoring_batch_size,
        )
        self.scored_batches = list(self.rewiring.val_batches) + data_utils.to_device(trainer.strategy, train)
        self.naive_seconds += time.perf_counter() - start
        return scores

    def _apply_pending(self, trainer: Trainer, pl_module: Any) -> None:
        plan = self.state.pending
        before = {n: (layer.experts, layer.rank) for n, layer in named_moe_layers(pl_module).items()}
        super()._apply_pending(trainer, pl_module)
        start = time.perf_counter()
        self.naive = self._naive_reinit(trainer, pl_module, plan["layout"], before)
        self.naive_seconds += time.perf_counter() - start

    def _naive_reinit(self, trainer: Trainer, pl_module: Any, layout: dict, before: dict) -> dict[str, float]:
        """Undo-able: the resized layers get a fresh LoRA init, the loss is probed, the model is restored."""
        per_sample = resolve_per_sample_loss(pl_module, self.loss_fn)
        snapshot = ModuleSnapshot(pl_module)
        try:
            with torch.no_grad():
                for name, layer in named_moe_layers(pl_module).items():
                    if (layer.experts, layer.rank) != before[name]:
                        layer.reset_lora_parameters(layer.experts, layer.rank)
            loss = mean_loss(pl_module, per_sample, self.rewiring.val_batches)
        finally:
            snapshot.restore()
        loss_before = self.history[-1]["val_loss_before"]
        return {"val_loss_after": loss, "disturbance": (loss - loss_before) / abs(loss_before)}


class MemorySampler:
    """Peak process RSS per phase ("train" before the rewire, "scoring", "after"), sampled every 20 ms."""

    def __init__(self) -> None:
        import psutil

        self.process = psutil.Process()
        self.phase = "train"
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.process.memory_info().rss
            self.peak[self.phase] = max(self.peak.get(self.phase, 0), rss)
            time.sleep(0.02)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_floor(module: Any, batches: list[Any]) -> float:
    """Seconds of one training-mode forward+backward over `batches` (per-sample loss, mean), after a
    warm-up batch; parameter gradients are formed and then dropped."""
    per_sample = resolve_per_sample_loss(module, None)
    module.train()
    with torch.enable_grad():
        per_sample(module, batches[0]).mean().backward()
        module.zero_grad(set_to_none=True)
        start = time.perf_counter()
        for batch in batches:
            per_sample(module, batch).mean().backward()
        elapsed = time.perf_counter() - start
    module.zero_grad(set_to_none=True)
    return elapsed


class StepClock(Callback):
    """Wall time between consecutive optimizer steps, minus the callback's time inside them."""

    def __init__(self, timed: TimedCallback) -> None:
        self.timed, self.last, self.last_hook = timed, None, 0.0
        self.steps: list[float] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        hook = self.timed.hook_seconds  # includes the naive probe, which runs inside the timed hook
        if self.last is not None:
            self.steps.append((now - self.last) - (hook - self.last_hook))
            print(
                f"step {trainer.global_step}: {self.steps[-1]:.2f} s (+{hook - self.last_hook:.2f} s callback)",
                flush=True,
            )
        self.last, self.last_hook = now, hook


def sst2_data_module(model_dir: Path, data_dir: Path, batch_size: int) -> TextDataModule:
    """SST-2 as this benchmark feeds it to SmolLM2 (prompt, label words, 64 tokens, seed 0); the scoring
    memory benchmark measures on the same batches, so its numbers compare with this run's."""
    from layermoe.lightning_modules import TextDataModule

    return TextDataModule(
        train_file=str(data_dir / "train.jsonl"),
        val_file=str(data_dir / "validation.jsonl"),
        tokenizer=str(model_dir),
        task="classification",
        prompt_template="Review: {text}\nSentiment:",
        label_words=["negative", "positive"],
        max_length=64,
        batch_size=batch_size,
        eval_batch_size=batch_size,
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rewire-at", type=float, default=0.3, help="fraction of the run (schedule.warmup)")
    parser.add_argument("--n", type=int, default=128, help="training samples for scoring")
    parser.add_argument("--m", type=int, default=64, help="validation samples for scoring and the probe")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--scorer", default="layerif")
    parser.add_argument("--extrapolate-steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="markdown section to write")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from layermoe.lightning_modules import MoELoRAFineTuner
    from layermoe.models import is_prepared, smollm2_dir
    from layermoe.paths import shared_data_dir

    model_dir = smollm2_dir()
    if not is_prepared(model_dir):
        sys.exit(f"{model_dir} is missing: run `python -m layermoe.models prepare smollm2` first")
    data_dir = shared_data_dir() / "sst2"
    if not (data_dir / "train.jsonl").exists():
        sys.exit(f"{data_dir} is missing: set LAYERMOE_SHARED_DATA to the folder holding sst2/")
    torch.set_num_threads(args.threads)
    # the scoring plan and the per-block sketch error bounds go to the log
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("layermoe.scoring").setLevel(logging.INFO)
    seed_everything(0)
    module = MoELoRAFineTuner(
        model=str(model_dir),
        adapter={"experts": 4, "rank": 4, "lora_alpha": 8.0},
        task="classification",
        lr=1e-3,
        warmup_steps=max(1, args.steps // 10),
        scheduler="cosine",
        min_lr_ratio=0.1,
        print_layout=False,
        print_metrics=False,
    )
    data = sst2_data_module(model_dir, data_dir, args.batch_size)
    cb = TimedCallback(
        scorer=args.scorer,
        schedule={"warmup": args.rewire_at},
        num_train_samples=args.n,
        num_val_samples=args.m,
        plot=False,
    )
    clock = StepClock(cb)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, clock],
    )
    cb.memory = MemorySampler()
    with cb.memory:
        start = time.perf_counter()
        trainer.fit(module, datamodule=data)
        wall = time.perf_counter() - start - cb.naive_seconds
    entry = cb.history[0]
    step = statistics.median(clock.steps)
    callback = cb.hook_seconds - cb.naive_seconds  # the naive probe is the benchmark's, not the callback's
    n_ext = args.extrapolate_steps
    floor = measure_floor(module, cb.scored_batches)
    floor_samples = sum(int(b["input_ids"].shape[0]) for b in cb.scored_batches)
    result = {
        "steps": args.steps,
        "rewire_step": entry["step"],
        "n": args.n,
        "m": args.m,
        "batch_size": args.batch_size,
        "scorer": args.scorer,
        "fit_wall_s": wall,
        "median_step_s": step,
        "callback_s": callback,
        "naive_probe_s_excluded": cb.naive_seconds,
        "overhead_this_run": callback / wall,
        f"overhead_extrapolated_{n_ext}": callback / (callback + n_ext * step),
        "time_scoring_s": entry["time_scoring_s"],
        "floor_s": floor,
        "floor_samples": floor_samples,
        f"floor_extrapolated_{n_ext}": floor / (floor + n_ext * step),
        "callback_over_floor": callback / floor,
        "scoring_over_floor": entry["time_scoring_s"] / floor,
        "peak_rss_train_mib": cb.memory.peak.get("train", 0) / 2**20,
        "peak_rss_scoring_mib": cb.memory.peak.get("scoring", 0) / 2**20,
        "time_rewire_s": entry["time_rewire_s"],
        "time_surgery_s": entry["time_surgery_s"],
        "val_loss_before": entry["val_loss_before"],
        "val_loss_after": entry["val_loss_after"],
        "disturbance": entry["disturbance"],
        "naive_val_loss_after": cb.naive["val_loss_after"],
        "naive_disturbance": cb.naive["disturbance"],
        "params_before": entry["params_before"],
        "params_after": entry["params_after"],
        "layout_before": entry["layout_before"],
        "layout_after": entry["layout_after"],
        "optimizer_state": entry["optimizer_state"],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {args.threads}",
        "cpu": cpu_description(),
        "load_average_at_end": os.getloadavg(),
    }
    print(json.dumps(result, indent=1, default=str))
    table = render(result, args, n_ext)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


def cpu_description() -> str:
    """CPU model and whether it has native bf16: the tables of BENCHMARKS.md come from several machines."""
    from layermoe.precision import cpu_has_native_bf16

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    native = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{os.cpu_count()}-core {model} CPU ({native})"


def render(r: dict[str, Any], args: argparse.Namespace, n_ext: int) -> str:
    cmd = "python " + " ".join(sys.argv)
    lay = lambda layout: " ".join(f"{b}:{v['experts']}x{v['rank']}" for b, v in sorted(layout.items()))  # noqa: E731
    return f"""## LayerInfluenceCallback overhead (SmolLM2-135M, SST-2, batch {r["batch_size"]})

Command: `{cmd}`
Machine: {r["cpu"]}, shared with other jobs (load average at the end {r["load_average_at_end"][0]:.1f}),
fp32, {r["machine"]}. One run of {r["steps"]} optimizer steps with one rewire at step {r["rewire_step"]}
({args.rewire_at:.0%} of the run); scorer `{r["scorer"]}`, n={r["n"]} training and m={r["m"]} validation
samples{" (the callback's defaults)" if (r["n"], r["m"]) == (128, 64) else ""}. The overhead for {n_ext:,} steps is **extrapolated** from this run: the callback
costs per rewire, not per step, so it is callback time / (callback time + {n_ext:,} x median step time).

| measure | value | target |
|---|---|---|
| median training step (callback excluded) | {r["median_step_s"]:.2f} s | |
| time in the callback's hooks (whole run) | {r["callback_s"]:.1f} s | |
| overhead, this {r["steps"]}-step run | {r["overhead_this_run"]:.1%} | |
| overhead, extrapolated to {n_ext:,} steps | {r[f"overhead_extrapolated_{n_ext}"]:.1%} | <= 3% |
| floor: one fwd+bwd over the {r["floor_samples"]} scored samples (same run, after the fit) | {r["floor_s"]:.1f} s | |
| floor, extrapolated to {n_ext:,} steps | {r[f"floor_extrapolated_{n_ext}"]:.1%} | |
| callback time / floor | {r["callback_over_floor"]:.2f}x | <= 1.25x |
| scoring (capture + scorer + allocation) | {r["time_scoring_s"]:.1f} s ({r["scoring_over_floor"]:.2f}x the floor) | |
| peak RSS: training steps before the rewire / scoring | {r["peak_rss_train_mib"]:.0f} MiB / {r["peak_rss_scoring_mib"]:.0f} MiB ({r["peak_rss_scoring_mib"] / max(r["peak_rss_train_mib"], 1):.2f}x) | <= 1.1x |
| one rewire (surgery + optimizer rebuild + state carry) | {r["time_rewire_s"]:.2f} s | |
| surgery alone (`apply_layout`) | {r["time_surgery_s"]:.3f} s | <= 0.25 s |
| val loss on the m samples before -> after the rewire | {r["val_loss_before"]:.4f} -> {r["val_loss_after"]:.4f} | |
| rewire disturbance (relative val-loss change) | {r["disturbance"]:+.3%} | <= 1% |
| naive re-init of the resized layers, same layout | {r["naive_val_loss_after"]:.4f} ({r["naive_disturbance"]:+.2%}) | (comparison) |
| adapter params before -> after (budget "current") | {r["params_before"]:,} -> {r["params_after"]:,} | <= before |

Layout (block:experts x rank) before: {lay(r["layout_before"])}
after: {lay(r["layout_after"])}
Optimizer state after the rewire: {r["optimizer_state"]["kept"]} tensors kept, {r["optimizer_state"]["mapped"]} mapped, {r["optimizer_state"]["reset"]} reset.
"""


if __name__ == "__main__":
    main()
