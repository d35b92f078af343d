"""What ``python train.py fit`` guarantees around checkpoints and resume (issue 24), through the CLI.

Each case either behaves as an uninterrupted run would or fails before the first training step with a
message naming the file, field or row and the fix: a second run into the same folder, ``--ckpt_path``
with changed settings, corrupted, truncated and empty checkpoints, non-finite values.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from layermoe.cli import main
from tests.conftest import tiny_llama_spec, write_toy_files
from tests.test_cli_quickstart import QUICKSTART, _override, toy_data_override


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # the quickstart writes to runs/quickstart relative to the working directory
    monkeypatch.setattr("sys.argv", ["train.py"])
    return tmp_path


@contextmanager
def _train_py_in(folder: Path) -> Iterator[None]:
    """What the run_dir fixture sets up, for module-scoped fixtures (which cannot take monkeypatch)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setattr("sys.argv", ["train.py"])
        yield


def _fit(run_dir: Path, spec: dict, files: dict[str, Path], *extra: str, max_steps: int = 3):
    override = _override(run_dir, spec, files, max_steps=max_steps)
    return main(["fit", "--config", str(QUICKSTART), "--config", str(override), *extra])


def _checkpoints(run_dir: Path) -> Path:
    return run_dir / "runs" / "quickstart" / "checkpoints"


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 3-step quickstart fit (tiny model, toy data), shared: each test resumes from a copy of it."""
    root = tmp_path_factory.mktemp("three_steps")
    files = write_toy_files(root)
    with _train_py_in(root):
        _fit(root, tiny_llama_spec(), files, max_steps=3)
    return _checkpoints(root) / "last.ckpt"


@pytest.fixture
def resumable(three_steps: Path, run_dir: Path) -> Path:
    """A copy of the shared 3-step checkpoint in this test's folder."""
    target = _checkpoints(run_dir) / "last.ckpt"
    target.parent.mkdir(parents=True)
    shutil.copyfile(three_steps, target)
    return target


def test_a_second_run_into_the_same_folder_overwrites_last_ckpt(run_dir, tiny_spec, toy_files) -> None:
    """Case 5: no last-v1.ckpt next to a stale last.ckpt; last.ckpt is the newest run's newest step."""
    _fit(run_dir, tiny_spec, toy_files, max_steps=3)
    assert torch.load(_checkpoints(run_dir) / "last.ckpt", weights_only=True)["global_step"] == 3
    second = _fit(run_dir, tiny_spec, toy_files, max_steps=6)
    assert second.trainer.global_step == 6
    names = sorted(p.name for p in _checkpoints(run_dir).glob("last*.ckpt"))
    assert names == ["last.ckpt"]
    assert torch.load(_checkpoints(run_dir) / "last.ckpt", weights_only=True)["global_step"] == 6


def _resume(run_dir: Path, spec: dict, files: dict[str, Path], ckpt: Path, *extra: str, max_steps: int = 6):
    return _fit(run_dir, spec, files, *extra, "--ckpt_path", str(ckpt), max_steps=max_steps)


def test_resume_with_a_new_lr_applies_it_from_the_resumed_step(
    run_dir, tiny_spec, toy_files, resumable
) -> None:
    """Case 3: --model.lr on resume is honoured (it used to be replaced by the checkpoint's)."""
    ckpt = resumable
    saved = torch.load(ckpt, weights_only=True)
    assert saved["hyper_parameters"]["lr"] == pytest.approx(1e-3)  # configs/quickstart.yaml
    resumed = _resume(run_dir, tiny_spec, toy_files, ckpt, "--model.lr", "0.05", max_steps=6)
    assert resumed.trainer.global_step == 6
    assert resumed.model.hparams.lr == 0.05
    group = resumed.trainer.optimizers[0].param_groups[0]
    # Closed form of the quickstart schedule at step 6 of 6 (warmup 2, cosine to 0.1 x lr): 0.1 x 0.05.
    assert group["lr"] == pytest.approx(0.1 * 0.05, rel=1e-9)
    assert group["initial_lr"] == 0.05


@pytest.mark.parametrize(
    ("override", "listed"),
    [
        (("--model.model.num_hidden_layers", "3"), "model.model.num_hidden_layers: checkpoint 2, now 3"),
        (("--model.adapter.rank", "8"), "model.adapter.rank: checkpoint 4, now 8"),
        (("--model.model_seed", "1"), "base model weights: checkpoint fingerprint"),
    ],
)
def test_resume_with_changed_model_settings_is_refused_listing_them(
    run_dir, tiny_spec, toy_files, resumable, override, listed
) -> None:
    """Case 3: the model and adapter settings cannot change on resume; the run stops before training."""
    ckpt = resumable
    from layermoe.lightning_modules.resume_settings import CheckpointSettingsError

    with pytest.raises(CheckpointSettingsError, match="cannot change on resume") as info:
        _resume(run_dir, tiny_spec, toy_files, ckpt, *override)
    assert listed in str(info.value)
    assert torch.load(ckpt, weights_only=True)["global_step"] == 3  # nothing trained, nothing written


def _corrupt_tensor_bytes(path: Path, name: str) -> None:
    """Overwrite 64 bytes inside the stored data of tensor ``name`` (what a disk or copy error does)."""
    tensor = torch.load(path, weights_only=True)["state_dict"][name]
    raw = path.read_bytes()
    data = tensor.contiguous().numpy().tobytes()
    start = raw.find(data)
    assert start >= 0 and len(data) >= 128
    middle = start + len(data) // 2
    path.write_bytes(raw[:middle] + bytes(range(64, 128)) + raw[middle + 64 :])


def test_corrupted_bytes_in_a_checkpoint_are_caught_before_training(
    run_dir, tiny_spec, toy_files, resumable
) -> None:
    """Case 4: 64 corrupted bytes inside a weight tensor unpickle fine; the checksum names the section."""
    from layermoe.checkpointing.integrity import CheckpointIntegrityError

    ckpt = resumable
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    name = max((k for k in state if k.endswith("lora_B")), key=lambda k: state[k].numel())
    _corrupt_tensor_bytes(ckpt, name)
    assert not torch.equal(torch.load(ckpt, weights_only=True)["state_dict"][name], state[name])
    with pytest.raises(CheckpointIntegrityError, match=r"section 'state_dict' does not match its checksum"):
        _resume(run_dir, tiny_spec, toy_files, ckpt)


@pytest.mark.parametrize("how", ["empty", "truncated", "pickle_bytes"])
def test_empty_truncated_or_damaged_checkpoint_names_the_file(
    run_dir, tiny_spec, toy_files, resumable, how
) -> None:
    """An empty file, half a file, or 64 flipped bytes in the pickled structure (where torch's own error
    is "Weights only load failed ... re-run with weights_only=False", advice that does not apply)."""
    from layermoe.checkpointing.integrity import CheckpointIntegrityError

    ckpt = resumable
    raw = ckpt.read_bytes()
    if how == "pickle_bytes":
        # archive/data.pkl comes first in torch's zip: 30-byte local header, name, extra field, then data.
        name_length, extra_length = struct.unpack("<HH", raw[26:30])
        start = 30 + name_length + extra_length
        damaged = raw[:start] + bytes(b ^ 0xFF for b in raw[start : start + 64]) + raw[start + 64 :]
    else:
        damaged = b"" if how == "empty" else raw[: len(raw) // 2]
    ckpt.write_bytes(damaged)
    pattern = "is empty" if how == "empty" else "truncated or damaged"
    with pytest.raises(CheckpointIntegrityError, match=pattern) as info:
        _resume(run_dir, tiny_spec, toy_files, ckpt)
    assert str(ckpt) in str(info.value) and "another checkpoint" in str(info.value)


# Case 2: 96 toy rows - 16 for validation = 80 training rows = 10 batches of 8 per epoch; validation once per
# epoch at its end; max_steps set, as in configs/quickstart.yaml (iteration-based training).
EPOCH_END_STEPS = 12


def _epoch_end_override(root: Path, files: dict[str, Path], max_epochs: int | None) -> Path:
    """The quickstart with validation at each epoch end, the val/acc-monitored best checkpoint (saved by
    ModelCheckpoint's default inside on_train_epoch_end there), the quickstart's influence callback, and
    a checkpoint after every step under checkpoints/steps (to compare runs step by step)."""
    checkpoints = root / "checkpoints"
    config = {
        "trainer": {
            "max_steps": EPOCH_END_STEPS,
            "max_epochs": max_epochs,
            "val_check_interval": 1.0,
            "check_val_every_n_epoch": 1,
            "logger": False,
            "enable_progress_bar": False,
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(checkpoints / "best"),
                        "filename": "best-{step}",
                        "auto_insert_metric_name": False,
                        "monitor": "val/acc",
                        "mode": "max",
                        "save_top_k": 1,
                    },
                },
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "dirpath": str(checkpoints / "steps"),
                        "filename": "{step}",
                        "auto_insert_metric_name": True,
                        "every_n_train_steps": 1,
                        "save_top_k": -1,
                    },
                },
                {
                    "class_path": "layermoe.callbacks.LayerInfluenceCallback",
                    "init_args": {
                        "scorer": "layerif",
                        "allocator": "power_law",
                        "budget": "current",
                        "schedule": {"warmup": 0.3},
                        "num_train_samples": 32,
                        "num_val_samples": 16,
                        "plot": False,
                        "verbose": False,
                    },
                },
            ],
        },
        "model": {
            "model": tiny_llama_spec(),
            "warmup_steps": 2,
            "print_layout": False,
            "print_metrics": False,
        },
        "data": toy_data_override(files),
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "override.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def epoch_end_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    """The uninterrupted run (12 steps: epoch 0, then 2 steps of epoch 1) and its data files."""
    root = tmp_path_factory.mktemp("epoch_end")
    files = write_toy_files(root)
    with _train_py_in(root):
        override = _epoch_end_override(root / "A", files, max_epochs=None)
        main(["fit", "--config", str(QUICKSTART), "--config", str(override)])
    return root / "A" / "checkpoints", files


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("max_epochs", [None, 2])
def test_resume_from_the_epoch_end_best_checkpoint_is_exact(
    run_dir: Path, epoch_end_run: tuple[Path, dict[str, Path]], max_epochs: int | None
) -> None:
    """Case 2, as filed: `train.py fit --ckpt_path` the val/acc-monitored best written at epoch 0's end.

    Lightning writes it inside on_train_epoch_end (epoch counted as processed, not yet as completed); with
    max_steps set, Lightning 2.6 resumed it by counting epoch 0 twice, so epoch 1 trained on the sampler
    order of epoch 2 (49-69 tensors differed at the next step), and with max_epochs=2 also set the resumed
    run stopped without training. Now every adapter tensor equals the uninterrupted run's after each step.
    """
    from layermoe.lightning_compat import settle_epoch_end_progress

    reference, files = epoch_end_run
    (best,) = (reference / "best").glob("*.ckpt")
    assert best.name == "best-10.ckpt"  # epoch 0's end (the only validation before step 12)
    saved = torch.load(best, weights_only=True)
    fit_loop = saved["loops"]["fit_loop"]
    assert fit_loop["epoch_progress"]["current"] == {"ready": 1, "started": 1, "processed": 1, "completed": 0}
    loader_state = fit_loop["state_dict"]["combined_loader"][0]
    assert (loader_state["epoch"], loader_state["batches_yielded"]) == (0, 10)
    # Only checkpoints written inside on_train_epoch_end are rewritten on load (the step-10 one is a batch end).
    assert settle_epoch_end_progress(saved) and not settle_epoch_end_progress(saved)
    assert not settle_epoch_end_progress(torch.load(reference / "steps" / "step=10.ckpt", weights_only=True))

    override = _epoch_end_override(run_dir / "B", files, max_epochs=max_epochs)
    resumed = main(["fit", "--config", str(QUICKSTART), "--config", str(override), "--ckpt_path", str(best)])
    assert resumed.trainer.global_step == EPOCH_END_STEPS
    for step in range(11, EPOCH_END_STEPS + 1):
        expected = _weights(reference / "steps" / f"step={step}.ckpt")
        actual = _weights(run_dir / "B" / "checkpoints" / "steps" / f"step={step}.ckpt")
        assert sorted(actual) == sorted(expected) and len(expected) > 0
        differing = [name for name in expected if not torch.equal(actual[name], expected[name])]
        assert differing == [], f"step {step}: {len(differing)} of {len(expected)} tensors differ"
