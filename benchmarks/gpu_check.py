"""The GPU path in one run: step time and memory of MoE-LoRA vs peft LoRA, scoring, surgery, fit + resume.

    python benchmarks/gpu_check.py RESULTS_DIR            # the real shapes on a CUDA GPU (bf16)
    python benchmarks/gpu_check.py RESULTS_DIR --tiny     # tiny shapes (automatic without CUDA)

Run it through ``scripts/gpu_check.sh`` on a bare GPU machine (docs/gpu.md). Each phase is timed and runs
in its own ``try``: a failure is recorded (type, message, last traceback lines) and the next phase runs.
``RESULTS_DIR/gpu_check.json`` and ``RESULTS_DIR/gpu_check.md`` are rewritten after every phase, so a run
stopped from outside still leaves what it measured. Phases that would start after ``--budget-s`` are
recorded as skipped. The tiny run (tests/test_gpu_check.py) goes through the same code.

Phases:
  build_models      random-initialised Llamas from a config (no weights): ~1B and Llama-3-8B shapes
  step_moe_vs_peft  one training step (fwd + bwd + AdamW) of MoE-LoRA (4 experts x rank 8) and peft LoRA
                    (rank 32, the same total rank) on all 7 projections: median time and peak memory
  scoring_vs_step   the callback's scoring pass at its defaults (128 training + 64 validation samples,
                    layerif with jackknife errors, store = 10% of training's peak) against one step
  rewire_surgery    apply_layout on the 8B-shaped adapters to a layout that moves experts and ranks
  fit_resume        a Lightning fit with a rewire and a checkpoint per step; runs resumed from a
                    checkpoint before and after the rewire, final adapters compared tensor for tensor
  quantized_4bit    the ~1B shape saved, reloaded with a 4-bit NF4 base (bitsandbytes), one MoE-LoRA step
  gpu_tests         ``pytest -m gpu`` in a subprocess
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# deterministic cuBLAS for the exact-resume phase; must be set before CUDA initialises
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
for folder in (ROOT, ROOT / "benchmarks"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402
from gpu_check_report import markdown  # noqa: E402 -- this script's folder

GIB = 2**30
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: MoE-LoRA of configs/gpu/*.yaml; peft LoRA gets the same total rank (experts x rank)
EXPERTS, RANK = 4, 8
PHASES = (
    "build_models",
    "step_moe_vs_peft",
    "scoring_vs_step",
    "rewire_surgery",
    "fit_resume",
    "fit_growth_resume",
    "quantized_4bit",
    "gpu_tests",
)


def llama_spec(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int) -> dict:
    return {
        "type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    }


@dataclass
class Shapes:
    """What one mode runs: model specs, batch shape and repetitions."""

    models: dict[str, dict]  # name -> spec; the last one is the large one (scoring, surgery)
    batch: int
    length: int
    warmup: int
    steps: int
    surgery_repeats: int
    fit_model: dict
    fit_steps: int
    dtype: str
    precision: str
    #: scoring samples (training, validation); None: the callback's defaults (128, 64)
    scoring_samples: tuple[int, int] | None = None


GPU = Shapes(
    models={
        # Llama-3.2-1B's dims without tied embeddings (1.5B parameters)
        "llama-1b": llama_spec(2048, 8192, 16, 32, 8, 128256),
        # Llama-3-8B's dims, all 32 blocks (8.0B parameters)
        "llama-8b": llama_spec(4096, 14336, 32, 32, 8, 128256),
    },
    batch=4,
    length=256,
    warmup=2,
    steps=5,
    surgery_repeats=3,
    fit_model=llama_spec(1024, 2816, 8, 16, 4, 320),
    fit_steps=8,
    dtype="bfloat16",
    precision="bf16-mixed",
)
TINY = Shapes(
    models={"tiny-a": llama_spec(32, 64, 2, 4, 2, 320), "tiny-b": llama_spec(48, 96, 3, 4, 2, 320)},
    batch=2,
    length=16,
    warmup=1,
    steps=2,
    surgery_repeats=1,
    fit_model=llama_spec(32, 64, 3, 4, 2, 320),
    fit_steps=8,
    dtype="float32",
    precision="32-true",
    scoring_samples=(16, 8),  # the same code path; the defaults' 192 samples take ~15 s on one CPU thread
)


@dataclass
class Run:
    """The state phases share and the results written after each phase."""

    out: Path
    shapes: Shapes
    device: torch.device
    budget_s: float
    started: float = field(default_factory=time.perf_counter)
    models: dict[str, torch.nn.Module] = field(default_factory=dict)
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def report(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {
            "mode": "gpu" if self.shapes is GPU else "tiny",
            "machine": {
                "device": torch.cuda.get_device_name(self.device) if cuda else platform.processor() or "cpu",
                "gpu_memory_gib": round(torch.cuda.get_device_properties(self.device).total_memory / GIB, 1)
                if cuda
                else None,
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "packages": package_versions(),
            },
            "total_s": round(self.elapsed(), 2),
            "phases": self.phases,
        }

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        report = self.report()
        (self.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        (self.out / "gpu_check.md").write_text(markdown(report))


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    names = (
        "lightning",
        "transformers",
        "peft",
        "torchmetrics",
        "accelerate",
        "bitsandbytes",
        "jsonargparse",
    )
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# -- measuring ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> int | None:
    """Reset CUDA's peak counter; returns the bytes allocated now (None on CPU: no resettable peak)."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_since(device: torch.device, resident: int | None) -> dict[str, float | None]:
    if device.type != "cuda" or resident is None:
        return {"peak_gib": None, "peak_over_resident_gib": None}
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_gib": round(peak / GIB, 3), "peak_over_resident_gib": round((peak - resident) / GIB, 3)}


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def free(run: Run) -> None:
    run.models.clear()
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


# -- models and steps --------------------------------------------------------------------------------


def build_base(spec: dict, dtype: str, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A random-initialised causal LM made directly on ``device`` (an 8B model never touches the CPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(spec)
    config = AutoConfig.for_model(kwargs.pop("type"), **kwargs)
    config.use_cache = False
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.train()


def token_batch(spec: dict, batch: int, length: int, device: torch.device, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec["vocab_size"], (batch, length), generator=generator).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def training_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    from layermoe.adapters import collect_router_losses
    from layermoe.scoring import causal_lm_per_sample_loss

    return causal_lm_per_sample_loss(model, batch).mean() + collect_router_losses(model).loss


def step_times(model: torch.nn.Module, batch: dict, shapes: Shapes, device: torch.device) -> dict[str, Any]:
    """Median time of full training steps; peak memory over them (optimizer state included)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> None:
        training_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    resident = reset_peak(device)
    times = [timed(device, step)[0] for _ in range(shapes.warmup + shapes.steps)][shapes.warmup :]
    return {
        "step_ms": round(1000 * statistics.median(times), 2),
        "trainable_params": sum(p.numel() for p in params),
        **peak_since(device, resident),
    }


def moe_config() -> Any:
    from layermoe.adapters import MoELoRAConfig

    return MoELoRAConfig(target_modules=ALL7, experts=EXPERTS, rank=RANK, lora_alpha=16.0)


# -- phases ------------------------------------------------------------------------------------------


def phase_build_models(run: Run) -> dict[str, Any]:
    results = {}
    for name, spec in run.shapes.models.items():
        seconds, model = timed(run.device, lambda spec=spec: build_base(spec, run.shapes.dtype, run.device))
        run.models[name] = model
        results[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "build_s": round(seconds, 2),
            "blocks": spec["num_hidden_layers"],
            "hidden": spec["hidden_size"],
            "intermediate": spec["intermediate_size"],
            "dtype": run.shapes.dtype,
        }
    return results


def phase_step_moe_vs_peft(run: Run) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    from layermoe.adapters import inject

    results = {}
    for name, spec in run.shapes.models.items():
        model = run.models[name]
        batch = token_batch(spec, run.shapes.batch, run.shapes.length, run.device)
        lora = get_peft_model(
            model, LoraConfig(r=EXPERTS * RANK, lora_alpha=2 * EXPERTS * RANK, target_modules=ALL7)
        )
        peft_result = step_times(lora, batch, run.shapes, run.device)
        model = lora.unload()  # the plain base again, for MoE-LoRA on the same weights
        del lora
        inject(model, moe_config())
        run.models[name] = model
        moe_result = step_times(model, batch, run.shapes, run.device)
        ratio = {"step_time_moe_over_peft": round(moe_result["step_ms"] / peft_result["step_ms"], 3)}
        if moe_result["peak_over_resident_gib"] and peft_result["peak_over_resident_gib"]:
            ratio["extra_memory_moe_over_peft"] = round(
                moe_result["peak_over_resident_gib"] / peft_result["peak_over_resident_gib"], 3
            )
        results[name] = {
            "batch": [run.shapes.batch, run.shapes.length],
            f"peft_lora_r{EXPERTS * RANK}": peft_result,
            f"moe_lora_{EXPERTS}x{RANK}": moe_result,
            **ratio,
        }
    return results


def scoring_batches(spec: dict, shapes: Shapes, samples: int, device: torch.device, seed: int) -> list:
    """``samples`` rows in batches of the training batch size (the callback's scoring_batch_size=None)."""
    batches = []
    for i, start in enumerate(range(0, samples, shapes.batch)):
        rows = min(shapes.batch, samples - start)
        batches.append(token_batch(spec, rows, shapes.length, device, seed=seed + i))
    return batches


def phase_scoring_vs_step(run: Run) -> dict[str, Any]:
    from layermoe.callbacks import LayerInfluenceCallback
    from layermoe.scoring import (
        capture_statistics,
        causal_lm_per_sample_loss,
        get_scorer,
        training_store_bytes,
    )

    name, spec = list(run.shapes.models.items())[-1]
    model = run.models[name]
    defaults = LayerInfluenceCallback(plot=False, verbose=False)
    batch = token_batch(spec, run.shapes.batch, run.shapes.length, run.device)
    step = step_times(model, batch, run.shapes, run.device)
    # as inside a fit: the store is a tenth of the peak training reached so far
    store = training_store_bytes(run.device)
    n_train, n_val = run.shapes.scoring_samples or (defaults.num_train_samples, defaults.num_val_samples)
    train = scoring_batches(spec, run.shapes, n_train, run.device, seed=100)
    val = scoring_batches(spec, run.shapes, n_val, run.device, seed=10_000)
    scorer = get_scorer(defaults.scorer, **defaults.scorer_options)
    resident = reset_peak(run.device)

    def capture() -> Any:
        model.eval()
        try:
            return capture_statistics(
                model,
                train,
                val,
                causal_lm_per_sample_loss,
                scope=defaults.scope,
                max_store_bytes=store,
                progress=False,
            )
        finally:
            model.train()

    capture_s, stats = timed(run.device, capture)
    memory = peak_since(run.device, resident)
    score_s, (scores, errors) = timed(
        run.device, lambda: scorer.score_with_errors(stats, defaults.error_groups)
    )
    first = stats[min(stats)]
    return {
        "model": name,
        "scorer": defaults.scorer,
        "train_samples": n_train,
        "val_samples": n_val,
        "store_gib": round(store / GIB, 3),
        "projected_dim": first.projected_dim,
        "training_step": step,
        "scoring": {"capture_s": round(capture_s, 2), "score_s": round(score_s, 3), **memory},
        "capture_over_step_time": round(1000 * capture_s / step["step_ms"], 1),
        "blocks_scored": len(scores),
        "errors_present": errors is not None,
    }


def target_layout(blocks: int) -> dict[int, dict[str, int]]:
    """Experts and ranks moved towards the later blocks, total expert count kept."""
    half = blocks // 2
    return {
        b: {"experts": EXPERTS - 2, "rank": RANK // 2} if b < half else {"experts": EXPERTS + 2, "rank": RANK}
        for b in range(blocks)
    }


def phase_rewire_surgery(run: Run) -> dict[str, Any]:
    from layermoe.adapters import apply_layout, named_moe_layers
    from layermoe.callbacks.transaction import ModuleSnapshot

    name, spec = list(run.shapes.models.items())[-1]
    model = run.models[name]
    with torch.no_grad():  # trained-looking adapters: surgery on B = 0 would be trivial
        generator = torch.Generator(device=run.device).manual_seed(0)
        for layer in named_moe_layers(model).values():
            layer.lora_B.normal_(0, 0.02, generator=generator)
            layer.lora_router_weight.normal_(0, 0.5, generator=generator)
    target = target_layout(spec["num_hidden_layers"])
    snapshot = ModuleSnapshot(model)
    times, changed = [], 0
    for i in range(run.shapes.surgery_repeats):
        if i:
            snapshot.restore()
        seconds, reports = timed(run.device, lambda: apply_layout(model, target))
        times.append(seconds)
        changed = len(reports)
    return {
        "model": name,
        "layers_resized": changed,
        "target": f"blocks < {spec['num_hidden_layers'] // 2}: {EXPERTS - 2}x{RANK // 2}, others {EXPERTS + 2}x{RANK}",
        "apply_layout_s": [round(t, 3) for t in times],
    }


def phase_fit_resume(run: Run) -> dict[str, Any]:
    free(run)  # the large models are done with
    with tempfile.TemporaryDirectory(prefix="gpu_check_fit_") as tmp:
        from gpu_check_fit import compare_resumes  # this script's folder

        return compare_resumes(Path(tmp), run.shapes.fit_model, run.shapes, run.device)


def phase_fit_growth_resume(run: Run) -> dict[str, Any]:
    free(run)
    with tempfile.TemporaryDirectory(prefix="gpu_check_grow_") as tmp:
        from gpu_check_fit import compare_resumes  # this script's folder

        return compare_resumes(Path(tmp), run.shapes.fit_model, run.shapes, run.device, growth=True)


def phase_quantized_4bit(run: Run) -> dict[str, Any]:
    import importlib.util

    from layermoe.adapters import inject
    from layermoe.lightning_modules.model_factory import build_model

    if importlib.util.find_spec("bitsandbytes") is None:
        raise SkipPhase("bitsandbytes is not installed (make gpu-wheels brings it; see docs/gpu.md)")
    free(run)
    name, spec = next(iter(run.shapes.models.items()))
    with tempfile.TemporaryDirectory(prefix="gpu_check_4bit_") as tmp:
        base = build_base(spec, run.shapes.dtype, run.device)
        start = time.perf_counter()
        base.save_pretrained(tmp)
        save_s = time.perf_counter() - start
        del base
        free(run)
        compute = "bfloat16" if run.device.type == "cuda" else "float32"
        load_s, model = timed(run.device, lambda: build_model(tmp, quantization="4bit", dtype=compute))
    linear = type(model.model.layers[0].self_attn.q_proj).__name__
    inject(model, moe_config())
    model.config.use_cache = False
    model.train()
    batch = token_batch(spec, run.shapes.batch, run.shapes.length, run.device)
    result = step_times(model, batch, run.shapes, run.device)
    del model
    free(run)
    return {
        "model": name,
        "base_layer": linear,
        "save_s": round(save_s, 2),
        "load_s": round(load_s, 2),
        **result,
    }


def phase_gpu_tests(run: Run) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gpu_check_pytest_") as tmp:
        xml = Path(tmp) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider"]
        # collecting only the files that use the marker: importing every test module takes ~40 s on a CPU
        files = [
            str(p.relative_to(ROOT))
            for p in sorted((ROOT / "tests").glob("test_*.py"))
            if "mark.gpu" in p.read_text()
        ]
        command += [f"--junitxml={xml}", *files]
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        suite = ET.parse(xml).getroot() if xml.is_file() else None
    counts = {}
    if suite is not None:
        node = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(node.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    skipped_reasons = sorted(set(line for line in proc.stdout.splitlines() if "SKIPPED" in line))
    result = {"returncode": proc.returncode, **counts, "skip_reasons": skipped_reasons[:5]}
    if proc.returncode not in (0, 5):  # 5: no test collected
        raise PhaseFailed(f"pytest -m gpu exited {proc.returncode}: {proc.stdout[-1500:]}", result)
    return result


class SkipPhase(Exception):
    """A phase that cannot run here (a missing optional package), recorded as skipped."""


class PhaseFailed(Exception):
    """A failure that still carries the phase's partial results."""

    def __init__(self, message: str, results: dict[str, Any]) -> None:
        super().__init__(message)
        self.results = results


PHASE_FUNCTIONS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "build_models": phase_build_models,
    "step_moe_vs_peft": phase_step_moe_vs_peft,
    "scoring_vs_step": phase_scoring_vs_step,
    "rewire_surgery": phase_rewire_surgery,
    "fit_resume": phase_fit_resume,
    "fit_growth_resume": phase_fit_growth_resume,
    "quantized_4bit": phase_quantized_4bit,
    "gpu_tests": phase_gpu_tests,
}


def run_phase(run: Run, name: str) -> None:
    record: dict[str, Any] = {"status": "ok", "seconds": None, "error": None, "results": {}}
    if run.elapsed() > run.budget_s:
        record.update(
            status="skipped", error=f"time budget of {run.budget_s:.0f} s used up before it started"
        )
    else:
        start = time.perf_counter()
        try:
            record["results"] = PHASE_FUNCTIONS[name](run)
        except SkipPhase as exc:
            record.update(status="skipped", error=str(exc))
        except Exception as exc:  # noqa: BLE001 -- a broken phase must not lose the others
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:2000])
            record["traceback"] = traceback.format_exc().splitlines()[-12:]
            record["results"] = getattr(exc, "results", {})
            if name in ("build_models", "step_moe_vs_peft"):
                free(run)  # half-built models are no use to later phases
        record["seconds"] = round(time.perf_counter() - start, 2)
    run.phases[name] = record
    print(
        f"[gpu_check] {name}: {record['status']} ({record['seconds']} s) {record['error'] or ''}", flush=True
    )
    run.write()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the default without CUDA)")
    parser.add_argument(
        "--budget-s", type=float, default=420.0, help="start no phase after this many seconds"
    )
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    shapes = TINY if args.tiny or not cuda else GPU
    if shapes is TINY:
        torch.set_num_threads(1)  # tiny matrices: extra threads only wait on each other
    run = Run(args.results_dir, shapes, torch.device("cuda" if cuda else "cpu"), args.budget_s)
    for name in args.phases:
        run_phase(run, name)
    print(
        f"[gpu_check] wrote {args.results_dir / 'gpu_check.json'} and gpu_check.md in {run.elapsed():.0f} s"
    )
    return 0 if all(r["status"] != "failed" for r in run.phases.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
