"""(d) Rewire under DDP (2 CPU processes, gloo): both ranks end with identical layouts and weights.

Lightning's DDP launcher re-executes ``sys.argv`` for the second rank, which inside pytest would re-run
the test selection, so the job is a standalone script run in a subprocess; its output is shown on failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_rewire.py"


def _run_job(tmp_path, *args: str) -> tuple[dict, dict, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
        )
    except subprocess.TimeoutExpired as exc:
        out = (
            (exc.stdout or b"").decode(errors="replace")
            if isinstance(exc.stdout, bytes)
            else exc.stdout or ""
        )
        err = (
            (exc.stderr or b"").decode(errors="replace")
            if isinstance(exc.stderr, bytes)
            else exc.stderr or ""
        )
        pytest.fail(f"DDP job timed out\n--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}")
    output = f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.returncode == 0, output
    assert "RANK 0 OK" in proc.stdout and "RANK 1 OK" in proc.stdout, output
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    return r0, r1, output


def test_ddp_ranks_agree_after_rewire(tmp_path) -> None:
    r0, r1, output = _run_job(tmp_path)
    assert len(r0["history"]) == len(r1["history"]) == 1, output
    assert r0["layout"] == r1["layout"]
    assert r0["layout"] != r0["start_layout"]
    assert r0["history"][0]["scores"] == r1["history"][0]["scores"]
    # the planted block (1, adapters not scaled down) receives the most experts on both ranks
    assert max(r0["layout"], key=lambda b: (r0["layout"][b]["experts"], r0["layout"][b]["rank"])) == 1
    assert r0["weights"].keys() == r1["weights"].keys()
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key
    for r in (r0, r1):
        assert r["optimizer_matches_trainable"] and r["wrapped_module_is_resized"]


def test_ddp_empties_a_block_and_regrows_it_with_ranks_in_agreement(tmp_path) -> None:
    r0, r1, output = _run_job(tmp_path, "zero")
    assert len(r0["history"]) == len(r1["history"]) == 2, output
    emptied, regrown = r0["history"]
    assert emptied["layout_after"][0]["experts"] == 0 and regrown["layout_after"][0]["experts"] > 0
    assert [h["layout_after"] for h in r0["history"]] == [h["layout_after"] for h in r1["history"]]
    assert r0["layout"] == r1["layout"] == regrown["layout_after"]
    assert r0["weights"].keys() == r1["weights"].keys()
    assert any(".layers.0." in k for k in r0["weights"])
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key
    for r in (r0, r1):
        assert r["optimizer_matches_trainable"] and r["wrapped_module_is_resized"]
