"""Same run, two machines: every run file of the sweep's folders that exists on two machines (by file name:
task, budget, arm + lr, seed), with its test loss on each and their relative difference.

Issue 34's sweep ran on an AMD EPYC and on an Intel Xeon (both fp32), where the same run does not give the
same numbers (benchmarks/results/machine-check/README.md); this is how far apart they land.

    .venv/bin/python benchmarks/machine_check.py     # the table, from the run files
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from quality_results import machine_of
from sweep_report import _interval, primary_loss

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FOLDERS = [RESULTS / "curve", RESULTS / "grow", RESULTS / "machine-check", RESULTS / "machine-check" / "epyc"]


def cross_machine_pairs(folders: Sequence[Path]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(file name, run on one machine, the same run on another) for each name found on two machines; the
    machines in the order they first appear over ``folders``, so every pair reads the same way round."""
    by_name: dict[str, dict[str, dict[str, Any]]] = {}
    order: list[str] = []
    for folder in folders:
        for path in sorted(folder.glob("*__*__seed*.json")):
            run = json.loads(path.read_text())
            machine = machine_of(run)
            order += [] if machine in order else [machine]
            by_name.setdefault(path.name, {}).setdefault(machine, run)
    pairs = []
    for name, runs in sorted(by_name.items()):
        machines = sorted(runs, key=order.index)
        if len(machines) >= 2:
            pairs.append((name, runs[machines[0]], runs[machines[1]]))
    return pairs


def machine_table(pairs: Sequence[tuple[str, dict[str, Any], dict[str, Any]]]) -> str:
    if not pairs:
        return "No run exists on two machines."
    first, second = pairs[0][1].get("machine"), pairs[0][2].get("machine")
    lines = [
        f"(A) {first}; (B) {second}",
        "",
        "| run | test loss A | test loss B | B vs A |",
        "| --- | --- | --- | --- |",
    ]
    diffs = []
    for name, a, b in pairs:
        diff = primary_loss(b) / primary_loss(a) - 1
        diffs.append(diff)
        lines.append(
            f"| {name.removesuffix('.json')} | {primary_loss(a):.4f} | {primary_loss(b):.4f} | {100 * diff:+.2f}% |"
        )
    spread = f", sd {100 * statistics.stdev(diffs):.2f}%" if len(diffs) > 1 else ""
    lines += ["", f"B vs A over {len(diffs)} runs: {_interval(diffs)} (mean ± 95% interval){spread}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    del argv
    print(machine_table(cross_machine_pairs(FOLDERS)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
