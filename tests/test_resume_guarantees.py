"""What ``python train.py fit`` guarantees around checkpoints and resume (issue 24), through the CLI.

Each case either behaves as an uninterrupted run would or fails before the first training step with a
message naming the file, field or row and the fix: a second run into the same folder, ``--ckpt_path``
with changed settings, corrupted, truncated and empty checkpoints, non-finite values.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from layermoe.lightning_modules.cli import main
from tests.conftest import tiny_llama_spec, toy_rows, write_jsonl
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


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 3-step quickstart fit (tiny model, toy data), shared: each test resumes from a copy of it."""
    root = tmp_path_factory.mktemp("three_steps")
    files = {
        "train": write_jsonl(root / "data" / "train.jsonl", toy_rows(96, seed=0)),
        "test": write_jsonl(root / "data" / "test.jsonl", toy_rows(24, seed=1)),
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr("sys.argv", ["train.py"])
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


@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_empty_or_truncated_checkpoint_names_the_file(run_dir, tiny_spec, toy_files, resumable, how) -> None:
    from layermoe.checkpointing.integrity import CheckpointIntegrityError

    ckpt = resumable
    raw = ckpt.read_bytes()
    ckpt.write_bytes(b"" if how == "empty" else raw[: len(raw) // 2])
    pattern = "is empty" if how == "empty" else "truncated or not a torch checkpoint"
    with pytest.raises(CheckpointIntegrityError, match=pattern) as info:
        _resume(run_dir, tiny_spec, toy_files, ckpt)
    assert str(ckpt) in str(info.value)
