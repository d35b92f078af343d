"""Run benchmark subprocesses a few at a time: the queue the resumable experiment runners share."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class QueuedRun:
    name: str
    command: list[str]
    result: Path  # the run counts as finished only when it exits 0 and this file exists
    log: Path | None  # None: the run's output goes to this process's stdout


def run_queue(runs: list[QueuedRun], parallel: int, env: dict[str, str]) -> None:
    """Up to ``parallel`` runs at once; a failed run is reported, not fatal (the next rerun retries it)."""
    running: list[tuple[subprocess.Popen, QueuedRun, float, Any]] = []
    queue = list(runs)
    while queue or running:
        while queue and len(running) < parallel:
            run = queue.pop(0)
            if run.log is not None:
                run.log.parent.mkdir(parents=True, exist_ok=True)
                log = open(run.log, "w")  # noqa: SIM115 - closed when the run ends
                print(f"run {run.name} (log: {run.log})", flush=True)
                process = subprocess.Popen(run.command, env=env, stdout=log, stderr=subprocess.STDOUT)
            else:
                log = None
                print(f"run {run.name}", flush=True)
                process = subprocess.Popen(run.command, env=env)
            running.append((process, run, time.perf_counter(), log))
        for entry in list(running):
            process, run, started, log = entry
            if process.poll() is None:
                continue
            running.remove(entry)
            if log is not None:
                log.close()
            ok = process.returncode == 0 and run.result.exists()
            status = "ok" if ok else f"failed (exit {process.returncode})"
            print(f"  {run.name}: {status} in {time.perf_counter() - started:.0f} s", flush=True)
        if running:
            time.sleep(0.5)
