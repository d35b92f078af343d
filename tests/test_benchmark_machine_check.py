"""benchmarks/machine_check.py: the same run found on two machines, and only that."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import machine_check  # noqa: E402


def _write(folder: Path, name: str, machine: str, loss: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    run = {"machine": machine, "final": {"loss_sample": loss, "loss_token": loss, "exact_match": 0.0}}
    (folder / f"{name}.json").write_text(json.dumps(run))


def test_pairs_the_same_run_across_machines_and_skips_copies_on_one(tmp_path: Path) -> None:
    curve, grow, check = tmp_path / "curve", tmp_path / "grow", tmp_path / "check"
    _write(curve, "t__half7__uniform+lr=0.016__seed1", "epyc", 1.25)
    _write(grow, "t__half7__uniform+lr=0.016__seed1", "epyc", 1.25)  # the grow phase's copy: same machine
    _write(check, "t__half7__uniform+lr=0.016__seed1", "xeon", 1.0)
    _write(check, "t__small__uniform+lr=0.008__seed0", "xeon", 0.9)  # on one machine only
    _write(grow, "t__half7__layerif-grow+lr=0.016__seed0", "xeon", 2.0)
    _write(check, "t__half7__layerif-grow+lr=0.016__seed0", "epyc", 1.6)
    pairs = machine_check.cross_machine_pairs([curve, grow, check])
    assert [(name, a["machine"], b["machine"]) for name, a, b in pairs] == [
        ("t__half7__layerif-grow+lr=0.016__seed0.json", "epyc", "xeon"),
        ("t__half7__uniform+lr=0.016__seed1.json", "epyc", "xeon"),
    ]
    table = machine_check.machine_table(pairs)
    assert "| t__half7__layerif-grow+lr=0.016__seed0 | 1.6000 | 2.0000 | +25.00% |" in table
    assert "| t__half7__uniform+lr=0.016__seed1 | 1.2500 | 1.0000 | -20.00% |" in table
    assert "B vs A over 2 runs: +2.50% ±" in table  # mean of +25% and -20%
