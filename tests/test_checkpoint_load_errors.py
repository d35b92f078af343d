"""Damaged checkpoint files through the two loaders that bypass the Trainer (issue 24).

``MoELoRAFineTuner.load_from_checkpoint`` and ``layermoe.callbacks.load_adapted_checkpoint`` must fail, like
``--ckpt_path`` does, with a ``CheckpointIntegrityError`` that names the file, what is wrong with it and
the fix, for an empty file, a truncated file and flipped bytes (in the pickled structure, where torch
itself fails, or inside a tensor's storage, which unpickles without complaint): never torch's raw
``EOFError`` / miniz error / "Weights only load failed ... re-run with weights_only=False", and never a
silent load.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from layermoe.callbacks import LayerInfluenceCallback, load_adapted_checkpoint
from layermoe.checkpointing.integrity import CHECKSUM_KEY, CheckpointIntegrityError
from layermoe.lightning_modules import MoELoRAFineTuner
from tests.fixtures import atomic_checkpoint_trainer
from tests.scripts.callback_fixtures import TinyLlamaModule, loaders
from tests.scripts.resume_run import ADAPTER, TINY_LLAMA, data_module
from tests.test_resume_e2e import _write_data

# (damage, what the message must say)
DAMAGES = [
    ("empty", r"is empty \(0 bytes\)"),
    ("truncated", "cannot be read: it is truncated or damaged"),
    ("pickle_bytes", "cannot be read: it is truncated or damaged"),
    ("tensor_bytes", "section 'state_dict' does not match its checksum"),
]


def _fit(module: L.LightningModule, folder: Path, callbacks: list, **fit_kwargs) -> Path:
    trainer = atomic_checkpoint_trainer(2, [*callbacks, ModelCheckpoint(folder, save_last=True)])
    trainer.fit(module, **fit_kwargs)
    return folder / "last.ckpt"


@pytest.fixture(scope="module")
def finetuner_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("finetuner")
    _write_data(root / "data")
    module = MoELoRAFineTuner(model=TINY_LLAMA, adapter=ADAPTER, num_classes=2, print_layout=False)
    return _fit(module, root / "checkpoints", [], datamodule=data_module(str(root / "data")))


@pytest.fixture(scope="module")
def injected_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's module whose adapters LayerInfluenceCallback(inject=...) added: load_adapted_checkpoint's case."""
    L.seed_everything(0)
    influence = LayerInfluenceCallback(
        scorer="grad_norm",
        schedule={"warmup": 1},
        num_train_samples=4,
        num_val_samples=4,
        inject={"experts": 2, "rank": 4, "lora_alpha": 8.0},
        plot=False,
        verbose=False,
    )
    train, val = loaders()
    folder = tmp_path_factory.mktemp("injected") / "checkpoints"
    return _fit(
        TinyLlamaModule(adapt=False), folder, [influence], train_dataloaders=train, val_dataloaders=val
    )


def _flip(raw: bytes, start: int, count: int = 64) -> bytes:
    return raw[:start] + bytes(b ^ 0xFF for b in raw[start : start + count]) + raw[start + count :]


def _damaged_copy(source: Path, folder: Path, damage: str) -> Path:
    """A copy of ``source`` named damaged.ckpt with one kind of damage (what a crash, a full disk or a bad
    disk/copy does)."""
    checkpoint = torch.load(source, weights_only=True)
    assert CHECKSUM_KEY in checkpoint  # written by AtomicCheckpointIO
    raw = source.read_bytes()
    if damage == "empty":
        raw = b""
    elif damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "pickle_bytes":
        # torch's zip writer puts the pickled structure (archive/data.pkl) first: its local header is at
        # offset 0 (30 bytes, then the name and the extra field), and its data follows uncompressed.
        name_length, extra_length = struct.unpack("<HH", raw[26:30])
        assert raw[30 : 30 + name_length].endswith(b"data.pkl")
        raw = _flip(raw, 30 + name_length + extra_length)
    else:  # tensor_bytes: inside the storage of the largest floating-point weight
        state = checkpoint["state_dict"]
        name = max((k for k in state if state[k].is_floating_point()), key=lambda k: state[k].numel())
        data = state[name].contiguous().numpy().tobytes()
        start = raw.find(data)
        assert start >= 0 and len(data) >= 128
        raw = _flip(raw, start + len(data) // 2)
    path = folder / "damaged.ckpt"
    path.write_bytes(raw)
    return path


def _check_message(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert str(path) in message  # names the file
    assert "another checkpoint" in message and "last.ckpt" in message  # and the fix


@pytest.mark.parametrize(("damage", "pattern"), DAMAGES)
def test_load_from_checkpoint_names_a_damaged_file(
    finetuner_ckpt: Path, tmp_path: Path, damage: str, pattern: str
) -> None:
    path = _damaged_copy(finetuner_ckpt, tmp_path, damage)
    with pytest.raises(CheckpointIntegrityError, match=pattern) as error:
        MoELoRAFineTuner.load_from_checkpoint(path)
    _check_message(error, path)


@pytest.mark.parametrize(("damage", "pattern"), DAMAGES)
def test_load_adapted_checkpoint_names_a_damaged_file(
    injected_ckpt: Path, tmp_path: Path, damage: str, pattern: str
) -> None:
    path = _damaged_copy(injected_ckpt, tmp_path, damage)
    with pytest.raises(CheckpointIntegrityError, match=pattern) as error:
        load_adapted_checkpoint(TinyLlamaModule, path)
    _check_message(error, path)


def test_intact_files_still_load_through_both_entry_points(
    finetuner_ckpt: Path, injected_ckpt: Path, tmp_path: Path
) -> None:
    """The checks pass on the undamaged files (copied, so only the bytes matter): weights equal the saved ones."""
    for source, load in (
        (finetuner_ckpt, MoELoRAFineTuner.load_from_checkpoint),
        (injected_ckpt, lambda p: load_adapted_checkpoint(TinyLlamaModule, p)),
    ):
        path = tmp_path / f"copy-{source.parent.parent.name}.ckpt"
        shutil.copyfile(source, path)
        module = load(path)
        saved = torch.load(path, weights_only=True)["state_dict"]
        live = module.state_dict()
        assert saved and all(torch.equal(live[k], v) for k, v in saved.items())


class _NotAllowlisted:
    """A class the weights-only unpickler refuses (as a user's custom hparam object would be)."""


def test_a_refused_class_keeps_torchs_own_message(tmp_path: Path) -> None:
    """Damaged bytes and a genuine weights-only refusal both surface as UnpicklingError from torch; only the
    first is a damaged file. The second keeps torch's message, which names the class and how to allow it."""
    import pickle

    from layermoe.checkpointing.integrity import read_checkpoint

    path = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"obj": _NotAllowlisted()}}, path)
    with pytest.raises(pickle.UnpicklingError, match=r"Unsupported global: .*_NotAllowlisted"):
        read_checkpoint(path)


# (what was saved instead of a Lightning checkpoint, what the message must say)
NOT_CHECKPOINTS = [
    ("tensor", r"not a Lightning checkpoint: it holds a Tensor"),
    ("list", r"not a Lightning checkpoint: it holds a list"),
    ("other_dict", r"not a Lightning checkpoint: it lacks \['pytorch-lightning_version', 'state_dict'\]"),
    ("state_dict", r"is a bare state_dict \(1 tensors, e\.g\. 'model\.w'\).*module\.load_state_dict"),
    ("folder", r"is a folder, not a checkpoint file\. It holds last\.ckpt"),
]


def _not_a_checkpoint(folder: Path, kind: str) -> Path:
    objects = {
        "tensor": torch.zeros(3),
        "list": [1, 2],
        "other_dict": {"epoch": 3},
        "state_dict": {"model.w": torch.zeros(2)},
    }
    if kind == "folder":
        (folder / "run").mkdir()
        (folder / "run" / "last.ckpt").write_bytes(b"")
        return folder / "run"
    path = folder / f"{kind}.pt"
    torch.save(objects[kind], path)
    return path


@pytest.mark.parametrize(("kind", "pattern"), NOT_CHECKPOINTS)
def test_files_that_are_not_checkpoints_are_named_by_both_loaders(
    tmp_path: Path, kind: str, pattern: str
) -> None:
    from layermoe.checkpointing.integrity import NotACheckpointError

    path = _not_a_checkpoint(tmp_path, kind)
    for load in (
        MoELoRAFineTuner.load_from_checkpoint,
        lambda p: load_adapted_checkpoint(TinyLlamaModule, p),
    ):
        with pytest.raises(NotACheckpointError, match=pattern) as info:
            load(path)
        assert str(path) in str(info.value) and ".ckpt" in str(info.value)


def test_an_adapter_folder_points_at_load_adapters(tmp_path: Path) -> None:
    from layermoe.checkpointing import save_adapters
    from layermoe.checkpointing.integrity import NotACheckpointError

    save_adapters(TinyLlamaModule().model, tmp_path / "adapters")
    with pytest.raises(NotACheckpointError, match=r"is an adapter folder .*load_adapters\(model, folder\)"):
        MoELoRAFineTuner.load_from_checkpoint(tmp_path / "adapters")


def _open_failing_for(path: Path, error: OSError):
    """``open`` for torch.serialization that raises ``error`` for ``path`` (what a file without read
    permission, one deleted after the check, or a failing disk gives; the tests run as root, which
    permissions do not stop)."""
    import builtins

    def fake(name, *args, **kwargs):
        if Path(name) == path:
            raise error
        return builtins.open(name, *args, **kwargs)

    return fake


@pytest.mark.parametrize(
    ("error", "kind", "pattern"),
    [
        (
            PermissionError(13, "Permission denied"),
            PermissionError,
            r"cannot be opened: this process may not read",
        ),
        (
            FileNotFoundError(2, "No such file or directory"),
            FileNotFoundError,
            r"does not exist; check the path",
        ),
        (OSError(5, "Input/output error"), OSError, r"failed: Input/output error\. .*may be intact"),
    ],
)
def test_a_file_that_cannot_be_opened_is_not_called_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, kind: type, pattern: str
) -> None:
    from layermoe.checkpointing.integrity import read_verified_checkpoint

    path = tmp_path / "last.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": {"w": torch.ones(2)}}, path)
    monkeypatch.setattr(torch.serialization, "open", _open_failing_for(path, error), raising=False)
    with pytest.raises(kind, match=pattern) as info:
        read_verified_checkpoint(path)
    assert not isinstance(info.value, CheckpointIntegrityError)
    message = str(info.value)
    assert str(path) in message and "damaged" not in message.replace("not known to be damaged", "")
    monkeypatch.undo()
    assert torch.equal(read_verified_checkpoint(path)["state_dict"]["w"], torch.ones(2))


def test_a_folder_that_cannot_be_searched_names_the_permission(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from layermoe.checkpointing.integrity import read_checkpoint

    path = tmp_path / "locked" / "last.ckpt"
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    with pytest.raises(PermissionError, match=rf"checkpoint {path} cannot be opened: .*chmod"):
        read_checkpoint(path)


@pytest.mark.parametrize(
    "text",
    [
        "Attempting to deserialize object on a CUDA device but torch.cuda.is_available() is False.",
        "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8",
    ],
)
def test_a_load_that_fails_for_want_of_a_device_or_memory_is_not_called_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    from layermoe.checkpointing.integrity import read_checkpoint

    path = tmp_path / "last.ckpt"
    torch.save({"w": torch.ones(2)}, path)

    def load(*args, **kwargs):
        raise RuntimeError(text)

    monkeypatch.setattr(torch, "load", load)
    with pytest.raises(RuntimeError, match="was not loaded \\(the file is not damaged\\)") as info:
        read_checkpoint(path)
    assert not isinstance(info.value, CheckpointIntegrityError) and text in str(info.value)


@pytest.mark.parametrize("size", [2_000, 8_000, 30_000, 65_000, 100_000])
def test_a_checkpoint_cut_short_is_called_truncated_whatever_its_length(tmp_path: Path, size: int) -> None:
    """A write killed early leaves the first bytes of a checkpoint. Cut between about 4 and 66 KB, torch's
    zip reader refuses it with ``OSError: [Errno 22] Invalid argument`` (it seeks before the start of the
    file looking for the zip directory in the last 64 KiB), elsewhere with a RuntimeError: both are a
    damaged file, never a disk that failed while reading."""
    from layermoe.checkpointing.integrity import read_checkpoint

    full = tmp_path / "full.ckpt"
    torch.save({"pytorch-lightning_version": "2.6.0", "state_dict": {"w": torch.randn(128, 256)}}, full)
    raw = full.read_bytes()
    assert len(raw) > size
    path = tmp_path / "last.ckpt"
    path.write_bytes(raw[:size])
    with pytest.raises(CheckpointIntegrityError, match="cannot be read: it is truncated or damaged") as info:
        read_checkpoint(path)
    _check_message(info, path)


def test_a_damaged_memo_reference_in_the_pickle_is_called_damaged(tmp_path: Path) -> None:
    """A flipped byte in the pickled structure can make the weights-only unpickler fetch an object it never
    stored (``KeyError: 250``) rather than fail to unpickle: still a damaged file, named as one."""
    import pickletools

    from layermoe.checkpointing.integrity import read_checkpoint

    full = tmp_path / "full.ckpt"
    torch.save(
        {"pytorch-lightning_version": "2.6.0", "state_dict": {"a": torch.ones(2), "b": torch.ones(3)}}, full
    )
    raw = full.read_bytes()
    name_length, extra_length = struct.unpack("<HH", raw[26:30])  # data.pkl's local header, as above
    start = 30 + name_length + extra_length
    memo_get = next(pos for op, _, pos in pickletools.genops(raw[start:]) if op.name == "BINGET")
    path = tmp_path / "last.ckpt"
    path.write_bytes(raw[: start + memo_get + 1] + bytes([250]) + raw[start + memo_get + 2 :])
    with pytest.raises(KeyError):  # what torch itself raises for these bytes
        torch.load(path, weights_only=True)
    with pytest.raises(CheckpointIntegrityError, match=r"truncated or damaged.*\(KeyError: 250\)") as info:
        read_checkpoint(path)
    _check_message(info, path)
