"""(d) Rewire under DDP (2 CPU processes, gloo): both ranks end with identical layouts and weights.

Lightning's DDP launcher re-executes ``sys.argv`` for the second rank, which inside pytest would re-run
the test selection, so the job is a standalone script run in a subprocess; its output is shown on failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_rewire.py"


def _run_job(tmp_path, *args: str, timeout: float = 300) -> tuple[dict, dict, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # its own session: a timeout kills both ranks (rank 1 is rank 0's child), not only rank 0
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(tmp_path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"DDP job timed out after {timeout} s (a rank left waiting in a collective?)\n"
            f"--- stdout ---\n{out[-6000:]}\n--- stderr ---\n{err[-6000:]}"
        )
    output = f"--- stdout ---\n{stdout[-6000:]}\n--- stderr ---\n{stderr[-6000:]}"
    assert proc.returncode == 0, output
    assert "RANK 0 OK" in stdout and "RANK 1 OK" in stdout, output
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


@pytest.mark.parametrize("fail", [None, "rotation"])
def test_ddp_a_faded_rank_move_keeps_the_ranks_in_agreement(tmp_path, fail) -> None:
    """The fading blocks' factors are rotated into their singular basis on every rank or on none: a
    rotation failing on rank 1 only (planted) must not leave rank 0 training rotated coordinates."""
    r0, r1, output = _run_job(tmp_path, "fade", *([fail, "raise"] if fail else []))
    (entry,) = r0["history"]
    assert entry["rank_moves"]["fade_steps"] == 2 and entry["rank_moves"]["removal_step"] == 4, output
    assert r0["layout"] == r1["layout"] == entry["layout_after"] != r0["start_layout"]
    assert r0["weights"].keys() == r1["weights"].keys()
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key
    if fail:
        assert "rotating the fading ranks failed" in output and "on another rank" in output


@pytest.mark.parametrize("on_error", ["raise", "skip"])
@pytest.mark.parametrize(
    ("mode", "fail", "stage"),
    [
        pytest.param("planted", "scoring", "scoring", id="rewire-scoring"),
        pytest.param("planted", "probe", "the probe loss before the rewire", id="rewire-probe"),
        pytest.param("grow", "scoring", "scoring", id="grow-scoring"),
        pytest.param("grow", "probe", "the probe loss before the rewire", id="grow-probe"),
        pytest.param("grow", "gradients", "the weight gradients for init='gradient'", id="grow-gradients"),
    ],
)
def test_ddp_a_failure_on_one_rank_stops_or_skips_on_every_rank(
    tmp_path, mode: str, fail: str, stage: str, on_error: str
) -> None:
    """The loss raises on rank 1 only, before the transaction: the job ends (no rank left waiting in a
    collective), both ranks raise the same RewireError (``raise``) or skip the same slots (``skip``), and
    their layouts and weights are the same, unchanged by the failed rewire/growth rounds."""
    r0, r1, output = _run_job(tmp_path, mode, fail, on_error, timeout=150)
    where = f"failed on rank 1 during {stage}: ValueError: planted loss failure on rank 1"
    if on_error == "raise":
        assert r0["error"] is not None and r0["error"] == r1["error"], output
        assert where in r0["error"], r0["error"]
        assert r0["failures"] == r1["failures"] == []
    else:
        assert r0["error"] is None and r1["error"] is None, output
        slots = 2 if mode == "grow" else 1  # every scoring (or probe) fails: each slot is used up
        assert len(r0["failures"]) == slots and r0["failures"] == r1["failures"], output
        assert all(where in f["error"] for f in r0["failures"]), r0["failures"]
    assert r0["history"] == r1["history"] == []
    unchanged = r0["growth_start_layout"] if mode == "grow" else r0["start_layout"]
    assert r0["layout"] == r1["layout"] == unchanged
    assert r0["weights"].keys() == r1["weights"].keys()
    for key, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][key]), key
    for r in (r0, r1):
        assert r["optimizer_matches_trainable"]
