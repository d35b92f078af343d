"""What a fit does when it is preempted, when another fit uses its folder, and when a resume changes what
the run was fixed to (issue 37): SIGTERM, one fit per folder, the budget, the callback given twice."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from layermoe.callbacks import CallbackConfigError, LayerInfluenceCallback
from layermoe.checkpointing import PREEMPTED_EXIT_CODE, AtomicCheckpointIO
from layermoe.checkpointing.run_lock import RunFolderBusyError
from layermoe.lightning_modules import MoELoRAFineTuner
from tests.fixtures import every_step_checkpoint, quiet_influence, quiet_trainer
from tests.scripts.resume_run import ADAPTER, TINY_LLAMA, data_module
from tests.test_resume_e2e import _max_difference, _script, _write_data
from tests.test_resume_guarantees import _checkpoints, _fit

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def quickstart_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the quickstart writes to runs/quickstart relative to the working directory
    monkeypatch.setattr("sys.argv", ["train.py"])
    return tmp_path


@pytest.fixture(scope="module")
def preempted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An unbroken 12-step run and two runs SIGTERMed (in a training step, inside a validation), each
    resumed from the checkpoint it wrote; fresh processes, two at a time."""
    root = tmp_path_factory.mktemp("sigterm")
    data = root / "data"
    _write_data(data)

    def chain(point: str, step: int) -> dict[str, Any]:
        run_dir = root / point
        stopped = _script(data, run_dir, root / f"{point}.pt", kill=f"sigterm_{point}", kill_step=step)
        written = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
        resumed = _script(data, run_dir, root / f"{point}.pt", ckpt="hpc") if written else None
        return {"stopped": stopped, "written": written, "resumed": resumed, "out": root / f"{point}.pt"}

    with ThreadPoolExecutor(max_workers=2) as pool:
        reference = pool.submit(_script, data, root / "A", root / "A.pt")
        runs = {
            point: pool.submit(chain, point, step) for point, step in (("train_step", 2), ("validation", 8))
        }
        assert reference.result().returncode == 0, reference.result().stderr[-3000:]
        return {"A": torch.load(root / "A.pt"), **{point: run.result() for point, run in runs.items()}}


@pytest.mark.parametrize(("point", "saved_at"), [("train_step", 3), ("validation", 8)])
def test_sigterm_writes_a_resumable_checkpoint_and_exits_non_zero(
    preempted: dict[str, Any], point: str, saved_at: int
) -> None:
    run = preempted[point]
    stopped = run["stopped"]
    assert f"SIGTERM at {point}" in stopped.stdout
    assert stopped.returncode == PREEMPTED_EXIT_CODE == 143, stopped.stderr[-3000:]
    assert "DONE" not in stopped.stdout  # the script's code after trainer.fit never ran
    (written,) = run["written"]
    assert f"A resumable checkpoint is at {written}" in stopped.stderr
    assert f"--ckpt_path {written}" in stopped.stderr
    # Lightning's notice for a save that does not say what it saves: noise in a preempted run's output
    assert "weights_only` was not set" not in stopped.stdout + stopped.stderr
    assert torch.load(written, weights_only=True)["global_step"] == saved_at
    assert run["resumed"].returncode == 0, run["resumed"].stderr[-3000:]
    resumed = torch.load(run["out"])
    assert resumed["global_step"] == 12 and resumed["layout"] == preempted["A"]["layout"]
    assert _max_difference(preempted["A"]["trainable"], resumed["trainable"]) == 0.0


HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from layermoe.checkpointing.run_lock import run_folder_lock
    with run_folder_lock([sys.argv[1]]):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes our stdin
    """
)


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the run lock of ``folder`` until its stdin is closed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_fit_into_a_folder_in_use_stops_naming_the_other_process(
    quickstart_dir: Path, tiny_spec: dict, toy_files: dict[str, Path]
) -> None:
    """Two processes, one folder: the second fit stops before writing anything, naming the holder's pid
    and host; once the holder is gone (its lock dies with it), the same fit runs."""
    folder = quickstart_dir / "runs" / "quickstart"
    holder = _hold_lock(folder)
    try:
        with pytest.raises(RunFolderBusyError) as info:
            _fit(quickstart_dir, tiny_spec, toy_files, max_steps=3)
        message = str(info.value)
        assert f"process {holder.pid} on host {socket.gethostname()}" in message
        assert str(folder.resolve()) in message and "another folder" in message
        written = [
            p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".layermoe-fit.lock")
        ]
        assert written == []  # nothing of the refused run was written
    finally:
        holder.communicate(input="", timeout=60)
    assert holder.returncode == 0
    assert _fit(quickstart_dir, tiny_spec, toy_files, max_steps=3).trainer.global_step == 3
    assert (_checkpoints(quickstart_dir) / "last.ckpt").exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = _hold_lock(tmp_path)
    from layermoe.checkpointing.run_lock import run_folder_lock

    with pytest.raises(RunFolderBusyError), run_folder_lock([tmp_path]):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    with run_folder_lock([tmp_path]) as held:
        assert held == [tmp_path.resolve()]


def _influence(budget: str) -> LayerInfluenceCallback:
    return quiet_influence("grad_norm", budget=budget, schedule={"warmup": 3, "interval": "step"})


def _plugin_fit(folder: Path, data: Path, budget: str, max_steps: int, ckpt: Path | None = None) -> L.Trainer:
    L.seed_everything(0)
    trainer = quiet_trainer(
        [_influence(budget), every_step_checkpoint(folder)],
        max_steps=max_steps,
        limit_val_batches=2,
        val_check_interval=2,
        check_val_every_n_epoch=None,
        plugins=[AtomicCheckpointIO()],
    )
    module = MoELoRAFineTuner(model=TINY_LLAMA, adapter=ADAPTER, num_classes=2, print_layout=False)
    trainer.fit(module, datamodule=data_module(str(data)), ckpt_path=ckpt)
    return trainer


@pytest.fixture(scope="module")
def before_first_rewire(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, int]:
    """A 4-step run with budget 'current' (rewired after step 3), its step-2 checkpoint (before the
    rewire) and the budget resolved there."""
    root = tmp_path_factory.mktemp("budget")
    _write_data(root / "data")
    _plugin_fit(root / "a", root / "data", "current", max_steps=4)
    ckpt = root / "a" / "step=2.ckpt"
    (state,) = [
        v
        for k, v in torch.load(ckpt, weights_only=True)["callbacks"].items()
        if k.startswith("LayerInfluenceCallback")
    ]
    assert state["rewires_done"] == 0 and state["budget_unit"] == "params"
    return root / "data", ckpt, state["budget"]


@pytest.mark.parametrize("change", ["smaller", "total_experts"])
def test_a_budget_changed_on_resume_is_refused_naming_it(
    before_first_rewire: tuple[Path, Path, int], tmp_path: Path, change: str
) -> None:
    """The budget is fixed at the first fit and kept on resume (README): a different one used to be
    ignored silently; now the resume stops before training, naming the field and both values."""
    data, ckpt, kept = before_first_rewire
    budget = f"params:{kept // 2}" if change == "smaller" else "total_experts:4"
    with pytest.raises(CallbackConfigError, match=rf"budget='{budget}'") as info:
        _plugin_fit(tmp_path, data, budget, max_steps=4, ckpt=ckpt)
    assert f"params:{kept}" in str(info.value) and "--ckpt_path" in str(info.value)
    assert not list(tmp_path.glob("*.ckpt"))


@pytest.mark.parametrize("same", ["current", "explicit"])
def test_the_kept_budget_resumes(
    before_first_rewire: tuple[Path, Path, int], tmp_path: Path, same: str
) -> None:
    data, ckpt, kept = before_first_rewire
    budget = "current" if same == "current" else f"params:{kept}"
    trainer = _plugin_fit(tmp_path, data, budget, max_steps=4, ckpt=ckpt)
    (influence,) = [cb for cb in trainer.callbacks if isinstance(cb, LayerInfluenceCallback)]
    assert trainer.global_step == 4 and influence.state.rewires_done == 1
    assert (influence.state.budget, influence.state.budget_unit) == (kept, "params")


def test_the_callback_given_twice_is_a_clear_error(tmp_path: Path) -> None:
    """train.py's Trainer names both entries (Lightning's own error only says state_key must be unique);
    two instances Lightning lets through (another scorer) are refused when the fit sets up."""
    from layermoe.cli import Trainer

    callback = _influence("current")
    with pytest.raises(CallbackConfigError, match=r"trainer.callbacks\[0\] and trainer.callbacks\[1\]"):
        Trainer(callbacks=[callback, callback], logger=False)
    other = LayerInfluenceCallback(scorer="layerif", plot=False, verbose=False)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, callbacks=[callback, other])
    module = MoELoRAFineTuner(model=TINY_LLAMA, adapter=ADAPTER, num_classes=2, print_layout=False)
    _write_data(tmp_path / "data")
    with pytest.raises(CallbackConfigError, match="2 LayerInfluenceCallbacks"):
        trainer.fit(module, datamodule=data_module(str(tmp_path / "data")))
    assert trainer.global_step == 0
