"""benchmarks/warmup_start.py measures the warm-up's first LR alone: without warm-up its two runs are the
same run, bit for bit; with one they part, and only through the first steps' LRs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import warmup_start  # noqa: E402


def _measure(tmp_path: Path, warmup: int) -> dict:
    argv = ["--steps", "6", "--batch-size", "4", "--warmup", str(warmup), "--workdir", str(tmp_path)]
    return warmup_start.measure(argv)


def test_without_warmup_the_two_schedules_are_one_run(tmp_path):
    result = _measure(tmp_path, warmup=0)
    assert result["relative_update_gap"] == 0.0 and result["max_update_gap"] == 0.0
    runs = result["runs"]
    assert runs["transformers"] == runs["project"]
    assert result["relative_gap_other_order"] > 0.0  # the reference does differ


def test_with_warmup_the_runs_part_after_the_first_step(tmp_path, capsys):
    result = _measure(tmp_path, warmup=2)
    runs = result["runs"]
    assert runs["transformers"]["losses"][0] == runs["project"]["losses"][0]  # the same weights at step 1
    assert runs["transformers"]["losses"][1] != pytest.approx(runs["project"]["losses"][1], abs=1e-6)
    assert result["relative_update_gap"] > 0.01
    assert (
        warmup_start.main(["--steps", "6", "--batch-size", "4", "--warmup", "2", "--workdir", str(tmp_path)])
        == 0
    )
    assert "relative gap" in capsys.readouterr().out
