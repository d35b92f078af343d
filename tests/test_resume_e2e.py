"""Checkpoints and resume across a rewire, end to end, each run in a fresh process (issue 15).

One uninterrupted run A (12 optimizer steps, a LayerInfluenceCallback rewire after step 6, validation
every 4 steps, dropout 0.1, shuffled data, a checkpoint after every step) is the reference. Against it:
(a) runs resumed from A's checkpoints before (step 4, mid-epoch, right before a validation) and after
the rewire (step 7), and (b) a chain of processes SIGKILLed at five points, each resumed from the last
checkpoint, the final one through ``python train.py fit --config ... --ckpt_path last``. Final adapter
tensors must agree with A's to 1e-6 (they agree exactly on this CPU). Also (c) weights-only loading,
(d) ``load_from_checkpoint`` reproducing A's validation loss, (e) clear errors for a missing or corrupt
layout. The runs start together in a module fixture (two process streams, as the machine has 2 cores).
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

from layermoe.adapters import layout
from layermoe.checkpointing import MANIFEST_KEY, AtomicCheckpointIO, CheckpointLayoutError, stale_temp_files
from layermoe.lightning_modules import MoELoRAFineTuner
from tests.scripts.resume_run import ADAPTER, TINY_LLAMA, cli_config, data_module, validation_loss

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "resume_run.py"
TOLERANCE = 1e-6
# (kill point, kill step, global step of last.ckpt after the kill, rewires recorded in it)
CHAIN = [
    ("train_step", 3, 3, 0),
    ("scoring", -1, 5, 0),
    ("after_rewire", -1, 5, 0),
    ("checkpoint_write", 7, 6, 1),
    ("validation", 8, 8, 1),
]


def _write_data(folder: Path) -> None:
    rng = random.Random(0)
    words = ["good", "bad", "great", "awful", "fine", "poor", "nice", "sad"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", 40), ("val", 8)):
        with open(folder / f"{name}.jsonl", "w") as handle:
            for _ in range(rows):
                text = [rng.choice(words) for _ in range(rng.randint(2, 5))]
                label = int(2 * sum(words.index(w) % 2 == 0 for w in text) > len(text))
                handle.write(json.dumps({"text": " ".join(text), "label": label}) + "\n")


def _env(kill: str = "") -> dict[str, str]:
    # One intra-op thread in every process: the same float reduction order everywhere.
    return {**os.environ, "LAYERMOE_TEST_KILL_AT": kill, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _run(args: list[str], kill: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=_env(kill), capture_output=True, text=True, timeout=900
    )


def _script(
    data: Path,
    run_dir: Path,
    out: Path,
    ckpt: str | None = None,
    kill: str = "",
    kill_step: int = -1,
    extra: tuple[str, ...] = (),
):
    args = [
        str(SCRIPT),
        "--data",
        str(data),
        "--run-dir",
        str(run_dir),
        "--out",
        str(out),
        "--kill-step",
        str(kill_step),
    ]
    return _run(args + list(extra) + (["--ckpt", ckpt] if ckpt else []), kill)


def _last(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def _rewires(checkpoint: dict[str, Any]) -> int:
    states = [v for k, v in checkpoint["callbacks"].items() if k.startswith("LayerInfluenceCallback")]
    assert len(states) == 1
    return states[0]["rewires_done"]


def _chain(data: Path, root: Path) -> dict[str, Any]:
    """Kill, resume, kill, ...: every resume is a fresh process starting from the last checkpoint."""
    run_dir = root / "chain"
    observed = []
    for i, (point, kill_step, _, _) in enumerate(CHAIN):
        proc = _script(data, run_dir, root / "chain.pt", None if i == 0 else "last", point, kill_step)
        after = _last(run_dir)
        observed.append(
            {
                "point": point,
                "returncode": proc.returncode,
                "killed_here": f"KILLING at {point}" in proc.stdout,
                "stderr": proc.stderr[-3000:],
                "last_step": after["global_step"],
                "rewires": _rewires(after),
                "stale_temps": len(stale_temp_files(run_dir / "checkpoints" / "last.ckpt")),
            }
        )
    config = root / "chain.yaml"
    config.write_text(yaml.safe_dump(cli_config(str(data), str(run_dir))))
    final = _run([str(REPO / "train.py"), "fit", "--config", str(config), "--ckpt_path", "last"])
    return {"observed": observed, "final": final, "run_dir": run_dir}


# Epoch mode (issue 24): 2 epochs of 10 steps, validation at each epoch end, an epoch-interval rewire
# scored at the end of epoch 0's validation and applied after step 11, a checkpoint after every step and
# one at every validation end (val-step=K.ckpt, where a monitored "best" checkpoint is written).
EPOCH_MODE = ("--epochs", "2", "--rewire-step", "1")


def _epoch_chain(data: Path, root: Path) -> dict[str, Any]:
    """SIGKILL inside the epoch-end validation that scores the rewire, then resume from last.ckpt."""
    run_dir = root / "epoch_chain"
    out = root / "epoch_chain.pt"
    killed = _script(data, run_dir, out, None, "validation", 10, EPOCH_MODE)
    saved = _last(run_dir)
    resumed = _script(data, run_dir, out, "last", extra=EPOCH_MODE)
    return {"killed": killed, "saved": saved, "resumed": resumed, "out": out}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("resume")
    data = root / "data"
    _write_data(data)
    with ThreadPoolExecutor(max_workers=3) as pool:
        chain = pool.submit(_chain, data, root)
        epoch_chain = pool.submit(_epoch_chain, data, root)
        a_epoch = _script(data, root / "A_epoch", root / "A_epoch.pt", extra=EPOCH_MODE)
        assert a_epoch.returncode == 0, a_epoch.stderr[-3000:]
        at_validation = pool.submit(
            _script,
            data,
            root / "B_epoch",
            root / "B_epoch.pt",
            str(root / "A_epoch" / "checkpoints" / "val-step=10.ckpt"),
            extra=EPOCH_MODE,
        )
        a = _script(data, root / "A", root / "A.pt")
        assert a.returncode == 0, a.stderr[-3000:]
        ckpts = root / "A" / "checkpoints"
        resumed = {
            step: pool.submit(
                _script, data, root / f"B{step}", root / f"B{step}.pt", str(ckpts / f"step={step}.ckpt")
            )
            for step in (4, 7)
        }
        results = {step: future.result() for step, future in resumed.items()}
        chain_result = chain.result()
        epoch_chain_result = epoch_chain.result()
        at_validation_result = at_validation.result()
    return {
        "root": root,
        "data": data,
        "A": torch.load(root / "A.pt"),
        "resumed": results,
        "chain": chain_result,
        "A_epoch": torch.load(root / "A_epoch.pt"),
        "epoch_chain": epoch_chain_result,
        "at_validation": at_validation_result,
    }


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)  # same parameters: same layout
    for name in a:
        assert a[name].shape == b[name].shape, name
    return max((a[n].double() - b[n].double()).abs().max().item() for n in a)


def test_reference_run_rewired_mid_run(runs: dict[str, Any]) -> None:
    reference = runs["A"]
    initial = {b: {"experts": ADAPTER["experts"], "rank": ADAPTER["rank"]} for b in range(3)}
    assert reference["global_step"] == 12 and reference["rewires_done"] == 1
    assert reference["layout"] != initial  # the rewire changed shapes: resume must rebuild them


@pytest.mark.parametrize("step", [4, 7])
def test_a_exact_resume_before_and_after_the_rewire(runs: dict[str, Any], step: int) -> None:
    proc = runs["resumed"][step]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not resumable" not in proc.stderr
    saved = torch.load(runs["root"] / "A" / "checkpoints" / f"step={step}.ckpt", weights_only=True)
    loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["batches_yielded"]) == (0, step)  # mid-epoch (10 batches)
    assert _rewires(saved) == (0 if step < 6 else 1)
    resumed = torch.load(runs["root"] / f"B{step}.pt")
    assert resumed["rewires_done"] == 1 and resumed["layout"] == runs["A"]["layout"]
    assert _max_difference(runs["A"]["trainable"], resumed["trainable"]) <= TOLERANCE


def test_b_sigkill_at_five_points_then_resume_matches_uninterrupted_run(runs: dict[str, Any]) -> None:
    chain = runs["chain"]
    for expected, seen in zip(CHAIN, chain["observed"], strict=True):
        point, _, last_step, rewires = expected
        assert seen["returncode"] == -signal.SIGKILL and seen["killed_here"], seen
        assert (seen["last_step"], seen["rewires"]) == (last_step, rewires), seen
        # Only the kill during a write leaves its half-written temp file; last.ckpt itself is intact.
        assert seen["stale_temps"] == (1 if point == "checkpoint_write" else 0), seen
    final = chain["final"]
    assert final.returncode == 0, final.stderr[-3000:]
    reference = torch.load(runs["root"] / "A" / "checkpoints" / "last.ckpt", weights_only=True)
    finished = _last(chain["run_dir"])
    assert finished["global_step"] == 12 and _rewires(finished) == 1
    assert stale_temp_files(chain["run_dir"] / "checkpoints" / "last.ckpt") == []
    assert _max_difference(_float_state(reference), _float_state(finished)) <= TOLERANCE


def _float_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in checkpoint["state_dict"].items() if v.is_floating_point()}


def test_c_every_checkpoint_loads_weights_only(runs: dict[str, Any]) -> None:
    paths = sorted((runs["root"] / "A" / "checkpoints").glob("*.ckpt"))
    assert len(paths) == 13  # step=1..12 and last
    for path in paths:
        checkpoint = torch.load(path, weights_only=True)
        assert "layermoe.RNGStateCallback" in checkpoint["callbacks"]
        assert MANIFEST_KEY in checkpoint
        assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["version"] == 1


def test_d_load_from_checkpoint_reproduces_the_validation_loss(runs: dict[str, Any]) -> None:
    module = MoELoRAFineTuner.load_from_checkpoint(runs["root"] / "A" / "checkpoints" / "last.ckpt")
    assert layout(module.model) == runs["A"]["layout"]
    trainable = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    assert _max_difference(runs["A"]["trainable"], trainable) == 0.0
    loss = validation_loss(module, data_module(str(runs["data"])))
    assert abs(loss - runs["A"]["val_loss"]) <= TOLERANCE


def _corrupted(runs: dict[str, Any], tmp_path: Path, how: str) -> Path:
    checkpoint = torch.load(runs["root"] / "A" / "checkpoints" / "step=7.ckpt", weights_only=True)
    checkpoint = copy.deepcopy(checkpoint)
    state = checkpoint["state_dict"]
    key = sorted(k for k in state if k.endswith("lora_shape"))[0]
    if how == "missing":
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.endswith("lora_shape")}
    else:
        state[key] = torch.tensor([5, 5])
    path = tmp_path / f"{how}.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("how", "message"), [("missing", "lora_shape is missing"), ("corrupt", r"says \[5, 5\]")]
)
def test_e_missing_or_corrupt_layout_fails_clearly_before_training(
    runs: dict[str, Any], tmp_path: Path, how: str, message: str
) -> None:
    path = _corrupted(runs, tmp_path, how)
    module = MoELoRAFineTuner(model=TINY_LLAMA, adapter=ADAPTER, num_classes=2, print_layout=False)
    trainer = L.Trainer(
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        plugins=[AtomicCheckpointIO()],
    )
    with pytest.raises(CheckpointLayoutError, match=message):
        trainer.fit(module, datamodule=data_module(str(runs["data"])), ckpt_path=path)
    assert trainer.global_step == 0


@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_e_load_from_checkpoint_names_the_layout_problem(
    runs: dict[str, Any], tmp_path: Path, how: str
) -> None:
    with pytest.raises(CheckpointLayoutError, match="layout is missing or corrupt"):
        MoELoRAFineTuner.load_from_checkpoint(_corrupted(runs, tmp_path, how))


def _history_steps(checkpoint: dict[str, Any]) -> list[tuple[int, int]]:
    states = [v for k, v in checkpoint["callbacks"].items() if k.startswith("LayerInfluenceCallback")]
    return [(entry["scored_at_step"], entry["step"]) for entry in states[0]["history"]]


def test_epoch_rewire_happens_after_a_sigkill_in_the_epoch_end_validation(runs: dict[str, Any]) -> None:
    """Issue 24 case 1: last.ckpt precedes the validation that scores an epoch-interval rewire; Lightning
    does not re-run that validation on resume, yet the rewire happens at the same step, bit-identically."""
    reference = runs["A_epoch"]
    assert reference["global_step"] == 20 and reference["rewires_done"] == 1
    ref_ckpt = torch.load(runs["root"] / "A_epoch" / "checkpoints" / "last.ckpt", weights_only=True)
    assert _history_steps(ref_ckpt) == [(10, 11)]  # scored at epoch 0's validation end, applied after step 11
    chain = runs["epoch_chain"]
    assert chain["killed"].returncode == -signal.SIGKILL and "KILLING at validation" in chain["killed"].stdout
    assert chain["saved"]["global_step"] == 10 and _rewires(chain["saved"]) == 0
    assert chain["resumed"].returncode == 0, chain["resumed"].stderr[-3000:]
    resumed = torch.load(chain["out"])
    assert resumed["rewires_done"] == 1 and resumed["layout"] == reference["layout"]
    assert _history_steps(_last(runs["root"] / "epoch_chain")) == [(10, 11)]
    assert _max_difference(reference["trainable"], resumed["trainable"]) == 0.0


def test_resume_from_the_epoch_end_validation_checkpoint_is_exact(runs: dict[str, Any]) -> None:
    """Issue 24 case 2: the checkpoint written at epoch 0's validation end (where a monitored best is
    saved, pending plan inside) resumes epoch 1 in the same sampler order, with the same dropout masks."""
    saved = torch.load(runs["root"] / "A_epoch" / "checkpoints" / "val-step=10.ckpt", weights_only=True)
    loader_state = saved["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["batches_yielded"]) == (0, 10)  # the end of epoch 0
    proc = runs["at_validation"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = torch.load(runs["root"] / "B_epoch.pt")
    assert resumed["rewires_done"] == 1 and resumed["layout"] == runs["A_epoch"]["layout"]
    assert _max_difference(runs["A_epoch"]["trainable"], resumed["trainable"]) == 0.0
