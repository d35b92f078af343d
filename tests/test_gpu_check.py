"""scripts/gpu_check.sh at tiny shapes on the CPU: the same code the GPU run goes through, so it never rots."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PHASES = [
    "build_models",
    "step_moe_vs_peft",
    "scoring_vs_step",
    "rewire_surgery",
    "fit_resume",
    "fit_growth_resume",
    "quantized_4bit",
    "gpu_tests",
]


def test_tiny_gpu_check_writes_every_phase_and_resumes_exactly(tmp_path):
    results = tmp_path / "results"
    empty = tmp_path / "no_wheels"  # the test uses this environment's packages, never .whl/
    empty.mkdir()
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WHEELS": str(empty), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(results), "--tiny"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((results / "gpu_check.json").read_text())
    table = (results / "gpu_check.md").read_text()
    assert report["mode"] == "tiny"
    assert list(report["phases"]) == PHASES
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    for name, record in report["phases"].items():
        expected = "ok" if name != "quantized_4bit" or bnb else "skipped"
        assert record["status"] == expected, (name, record)
        assert f"| {name} | {expected} |" in table

    phases = {name: record["results"] for name, record in report["phases"].items()}
    for model, spec in phases["build_models"].items():
        steps = phases["step_moe_vs_peft"][model]
        moe, lora = steps["moe_lora_4x8"], steps["peft_lora_r32"]
        # equal total rank: MoE-LoRA's A and B hold exactly peft's LoRA parameters; the 4-expert routers
        # (weight and bias) come on top; d_in is the hidden size except down_proj's (the MLP width)
        router = 4 * (6 * (spec["hidden"] + 1) + spec["intermediate"] + 1)
        assert moe["trainable_params"] - lora["trainable_params"] == spec["blocks"] * router
        assert steps["step_time_moe_over_peft"] == round(moe["step_ms"] / lora["step_ms"], 3)
        assert f"| {model} | moe_lora_4x8 | {moe['step_ms']} |" in table

    scoring = phases["scoring_vs_step"]
    assert scoring["blocks_scored"] == phases["build_models"][scoring["model"]]["blocks"]
    assert scoring["errors_present"] and scoring["scoring"]["capture_s"] > 0

    surgery = phases["rewire_surgery"]
    assert surgery["layers_resized"] == 7 * phases["build_models"][surgery["model"]]["blocks"]

    fit = phases["fit_resume"]
    assert fit["rewires_done"] == 1 and fit["layout_changed"]
    assert [r["from_step"] for r in fit["resumes"]] == [3, 5]  # one checkpoint before the rewire, one after
    for resume in fit["resumes"]:
        assert resume["identical"] and resume["max_abs_diff"] == 0.0 and resume["same_layout"], resume
        assert resume["global_step"] == fit["steps"] and resume["tensors"] > 0

    grow = phases["fit_growth_resume"]
    assert grow["rewires_done"] == 2 and grow["round_steps"] == [2, 5] and grow["layout_changed"]
    assert "0x1" in grow["start_layout"].values()  # a start on some blocks: the rounds adapt the others
    assert grow["max_round_disturbance"] < 1e-5
    assert [r["from_step"] for r in grow["resumes"]] == [3, 6]  # between the rounds, after both
    for resume in grow["resumes"]:
        assert resume["identical"] and resume["same_layout"], resume

    if bnb:
        assert phases["quantized_4bit"]["base_layer"] == "Linear4bit"
    tests = phases["gpu_tests"]
    assert tests["tests"] >= 1 and tests["failures"] == tests["errors"] == 0
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"]


def test_a_failing_phase_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    def broken(run):
        raise RuntimeError("CUDA out of memory (planted)")

    monkeypatch.setitem(gpu_check.PHASE_FUNCTIONS, "rewire_surgery", broken)
    monkeypatch.setitem(gpu_check.PHASE_FUNCTIONS, "gpu_tests", lambda run: {"tests": 0})
    code = gpu_check.main([str(tmp_path), "--tiny", "--phases", "rewire_surgery", "gpu_tests"])
    assert code == 1
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    failed, after = report["phases"]["rewire_surgery"], report["phases"]["gpu_tests"]
    assert failed["status"] == "failed" and failed["error"] == "RuntimeError: CUDA out of memory (planted)"
    assert any("planted" in line for line in failed["traceback"])
    assert after == {"status": "ok", "seconds": after["seconds"], "error": None, "results": {"tests": 0}}
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| rewire_surgery | failed |" in table and "| gpu_tests | ok |" in table

    # past the time budget a phase is recorded as skipped, not started
    code = gpu_check.main([str(tmp_path), "--tiny", "--budget-s", "-1", "--phases", "rewire_surgery"])
    skipped = json.loads((tmp_path / "gpu_check.json").read_text())["phases"]["rewire_surgery"]
    assert code == 0 and skipped["status"] == "skipped" and "budget" in skipped["error"]
