"""What ``python train.py fit`` guarantees around checkpoints and resume (issue 24), through the CLI.

Each case either behaves as an uninterrupted run would or fails before the first training step with a
message naming the file, field or row and the fix: a second run into the same folder, ``--ckpt_path``
with changed settings, corrupted, truncated and empty checkpoints, non-finite values.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from layermoe.lightning_modules.cli import main
from tests.test_cli_quickstart import QUICKSTART, _override


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the quickstart writes to runs/quickstart relative to the working directory
    monkeypatch.setattr("sys.argv", ["train.py"])
    return tmp_path


def _fit(run_dir: Path, spec: dict, files: dict[str, Path], *extra: str, max_steps: int = 3):
    override = _override(run_dir, spec, files, max_steps=max_steps)
    return main(["fit", "--config", str(QUICKSTART), "--config", str(override), *extra])


def _checkpoints(run_dir: Path) -> Path:
    return run_dir / "runs" / "quickstart" / "checkpoints"


def test_a_second_run_into_the_same_folder_overwrites_last_ckpt(run_dir, tiny_spec, toy_files) -> None:
    """Case 5: no last-v1.ckpt next to a stale last.ckpt; last.ckpt is the newest run's newest step."""
    _fit(run_dir, tiny_spec, toy_files, max_steps=3)
    assert torch.load(_checkpoints(run_dir) / "last.ckpt", weights_only=True)["global_step"] == 3
    second = _fit(run_dir, tiny_spec, toy_files, max_steps=6)
    assert second.trainer.global_step == 6
    names = sorted(p.name for p in _checkpoints(run_dir).glob("last*.ckpt"))
    assert names == ["last.ckpt"]
    assert torch.load(_checkpoints(run_dir) / "last.ckpt", weights_only=True)["global_step"] == 6
