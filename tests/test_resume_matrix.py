"""Resume matrix (issue 37): how the run's length is set x where the checkpoint was written x the rewire
interval x CLI or plug-in Trainer; every adapter tensor after each resumed step equals the unbroken run's.

Lengths: ``max_steps`` only, ``max_epochs`` only, both (``tests/scripts/resume_run.py``'s
``MATRIX_LENGTHS``; every run is 20 steps). Checkpoints: mid-epoch (a batch end, step 7), epoch-end
(inside ``on_train_epoch_end``, step 10), validation-end (a mid-epoch validation, step 15). Rewires: one
step rewire after step 8, or one epoch rewire scored at epoch 0's validation end and applied after step 11.
Paths: ``train.py fit`` (``layermoe.cli.main``) and a plain ``lightning.Trainer`` with
``LayerInfluenceCallback`` and ``exact_resume_callbacks()``.

The default suite runs a representative subset (each length, checkpoint kind, rewire interval and path at
least once; the filed case, ``both``, in each checkpoint kind); the whole cross product (36 resumes) is
marked ``resume_matrix``: ``pytest -m resume_matrix tests/test_resume_matrix.py`` (``make test-resume-matrix``).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from layermoe.cli import main
from tests.scripts.resume_run import (
    MATRIX_LENGTHS,
    MATRIX_RESUME_FROM,
    matrix_cli_config,
    matrix_plugin_fit,
)
from tests.test_resume_e2e import _write_data

TOTAL_STEPS = 20
SUBSET = {
    ("plugin", "both", "mid_epoch", "step"),
    ("plugin", "both", "epoch_end", "epoch"),
    ("plugin", "both", "validation_end", "step"),
    ("plugin", "max_epochs", "mid_epoch", "epoch"),
    ("cli", "both", "mid_epoch", "epoch"),
    ("cli", "max_steps", "validation_end", "epoch"),
}
CASES = [
    pytest.param(*case, marks=[] if case in SUBSET else [pytest.mark.resume_matrix], id="-".join(case))
    for case in itertools.product(("plugin", "cli"), MATRIX_LENGTHS, MATRIX_RESUME_FROM, ("step", "epoch"))
]


def _fit(path: str, data: Path, run_dir: Path, length: str, interval: str, ckpt: Path | None = None) -> int:
    torch.set_num_threads(1)  # one reduction order in every run
    if path == "plugin":
        trainer = matrix_plugin_fit(
            str(data), str(run_dir), length, interval, None if ckpt is None else str(ckpt)
        )
        return trainer.global_step
    run_dir.mkdir(parents=True, exist_ok=True)
    config = run_dir / "config.yaml"
    config.write_text(yaml.safe_dump(matrix_cli_config(str(data), str(run_dir), length, interval)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("sys.argv", ["train.py"])
        cli = main(["fit", "--config", str(config), *(["--ckpt_path", str(ckpt)] if ckpt else [])])
    return cli.trainer.global_step


@pytest.fixture(scope="module")
def matrix_root(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("resume_matrix")
    _write_data(root / "data")
    return {"root": root, "references": {}}


def _reference(matrix_root: dict[str, Any], path: str, length: str, interval: str) -> Path:
    """The unbroken run of this configuration (run once per module, shared by its checkpoint kinds)."""
    key = (path, length, interval)
    if key not in matrix_root["references"]:
        run_dir = matrix_root["root"] / "-".join(("A", *key))
        assert _fit(path, matrix_root["root"] / "data", run_dir, length, interval) == TOTAL_STEPS
        matrix_root["references"][key] = run_dir / "checkpoints"
    return matrix_root["references"][key]


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, weights_only=True)
    return {k: v for k, v in checkpoint["state_dict"].items() if v.is_floating_point()}


def _rewires(path: Path) -> int:
    states = torch.load(path, weights_only=True)["callbacks"]
    (state,) = [v for k, v in states.items() if k.startswith("LayerInfluenceCallback")]
    return state["rewires_done"]


@pytest.mark.parametrize(("path", "length", "kind", "interval"), CASES)
def test_resume_equals_the_unbroken_run_after_every_step(
    matrix_root: dict[str, Any], tmp_path: Path, path: str, length: str, kind: str, interval: str
) -> None:
    reference = _reference(matrix_root, path, length, interval)
    folder, name = MATRIX_RESUME_FROM[kind]
    ckpt = reference / folder / name
    saved_at = torch.load(ckpt, weights_only=True)["global_step"]
    assert saved_at == int(name.removeprefix("step=").removesuffix(".ckpt"))
    assert _fit(path, matrix_root["root"] / "data", tmp_path, length, interval, ckpt) == TOTAL_STEPS
    assert _rewires(reference / "steps" / f"step={TOTAL_STEPS}.ckpt") == 1  # the rewire happened ...
    resumed = tmp_path / "checkpoints" / "steps"
    for step in range(saved_at + 1, TOTAL_STEPS + 1):
        expected = _adapter_tensors(reference / "steps" / f"step={step}.ckpt")
        actual = _adapter_tensors(resumed / f"step={step}.ckpt")
        assert sorted(actual) == sorted(expected), f"step {step}: another layout"
        differing = [n for n in expected if not torch.equal(actual[n], expected[n])]
        assert differing == [], f"step {step}: {len(differing)} of {len(expected)} tensors differ"
    assert _rewires(resumed / f"step={TOTAL_STEPS}.ckpt") == 1  # ... once, in the resumed run too
