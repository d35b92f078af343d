"""AtomicCheckpointIO: a checkpoint on disk is always either the previous or the complete new one."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layermoe.checkpointing import AtomicCheckpointIO, stale_temp_files

SCRIPT = Path(__file__).parent / "scripts" / "resume_killed_writer.py"
REPO = Path(__file__).resolve().parents[1]


def _ckpt(value: float) -> dict:
    return {"value": torch.full((256,), value), "step": int(value)}


def test_roundtrip_loads_weights_only_and_leaves_no_temp(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint(_ckpt(1.0), path)
    io.save_checkpoint(_ckpt(2.0), path)  # overwrite
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["value"], torch.full((256,), 2.0)) and loaded["step"] == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]
    assert io.load_checkpoint(path, weights_only=True)["step"] == 2


def test_exception_midway_keeps_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_ckpt(1.0), path)
    before = path.read_bytes()

    def failing_save(obj, handle) -> None:
        handle.write(b"partial bytes of a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint(_ckpt(2.0), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(torch.load(path, weights_only=True)["value"], torch.full((256,), 1.0))
    assert stale_temp_files(path) == []  # the failed writer cleaned up after itself


def test_sigkill_during_write_keeps_previous_file(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_ckpt(1.0), path)
    before = path.read_bytes()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(path), "2.0"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_bytes() == before
    assert torch.load(path, weights_only=True)["step"] == 1
    leftovers = stale_temp_files(path)
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < len(before)  # the killed half-write
    io.save_checkpoint(_ckpt(3.0), path)  # the next successful save sweeps it
    assert stale_temp_files(path) == [] and torch.load(path, weights_only=True)["step"] == 3


def test_remove_checkpoint(tmp_path: Path) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "epoch=0.ckpt"
    io.save_checkpoint(_ckpt(1.0), path)
    io.remove_checkpoint(path)
    assert not path.exists()
    io.remove_checkpoint(path)  # removing twice is not an error (ModelCheckpoint may race with itself)


def test_storage_options_rejected_with_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint(_ckpt(1.0), tmp_path / "x.ckpt", storage_options={"a": 1})


def _failing_open(code: int, on_call: int = 1):
    """``open`` that raises ``OSError(code)`` at the ``on_call``-th temporary file: a full disk (after
    some bytes went out) or a read-only folder."""
    import builtins
    import errno
    import os

    calls = []

    def fake(path, mode="r", *args, **kwargs):
        calls.append(path)
        handle = builtins.open(path, mode, *args, **kwargs)
        if len(calls) == on_call:
            if code == errno.ENOSPC:
                handle.write(b"\0" * 64)  # part of the bytes reached the disk
            handle.close()
            raise OSError(code, os.strerror(code))
        return handle

    return fake


@pytest.mark.parametrize(
    ("code", "pattern"),
    [(28, r"the disk holding .* is full \(No space left on device\)"), (30, r"is on a read-only filesystem")],
)
def test_a_full_disk_or_read_only_folder_names_the_folder_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, pattern: str
) -> None:
    from layermoe.checkpointing import atomic_io

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint(_ckpt(1.0), path)
    monkeypatch.setattr(atomic_io, "open", _failing_open(code), raising=False)
    with pytest.raises(atomic_io.CheckpointWriteError, match=pattern) as info:
        io.save_checkpoint(_ckpt(2.0), path)
    message = str(info.value)
    assert str(path) in message and "Nothing was written (the previous file is unchanged)" in message
    assert "ModelCheckpoint's dirpath" in message and info.value.errno == code
    monkeypatch.undo()
    assert io.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


@pytest.mark.parametrize("failing", ["staging", "rename"])
def test_save_adapters_replaces_both_files_or_neither(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    from layermoe.adapters import MoELoRAConfig, inject
    from layermoe.checkpointing import atomic_io, load_adapters, save_adapters
    from tests.tiny_models import tiny_llama

    model = tiny_llama()
    inject(model, MoELoRAConfig(experts=2, rank=4))
    save_adapters(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "lora_B" in n).add_(1.0)
    if failing == "staging":
        # the manifest, staged second, hits the full disk after the tensors were staged
        monkeypatch.setattr(atomic_io, "open", _failing_open(28, on_call=2), raising=False)
    else:
        # both staged; the manifest's rename fails after the tensors' file was already replaced
        _replace_failing_on_call(monkeypatch, 2, 28)
    with pytest.raises(atomic_io.CheckpointWriteError, match="is full") as info:
        save_adapters(model, tmp_path)
    assert "the previous file is unchanged" in str(info.value)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    load_adapters(tiny_llama(), tmp_path)  # the kept pair still loads (its tensors match its manifest)


def _replace_failing_on_call(monkeypatch: pytest.MonkeyPatch, failing_call: int, code: int) -> list:
    """``os.replace`` that raises ``OSError(code)`` on its ``failing_call``-th call (counted from now)."""
    import os

    real_replace, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        calls.append((src, dst))
        if len(calls) == failing_call:
            raise OSError(code, os.strerror(code))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    return calls


@pytest.mark.parametrize("second_existed", [True, False])
def test_a_failed_second_replace_puts_the_first_file_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second_existed: bool
) -> None:
    import errno

    from layermoe.checkpointing.atomic_io import atomic_save_all

    first, second = tmp_path / "weights.bin", tmp_path / "manifest.json"
    first.write_bytes(b"old weights")
    if second_existed:
        second.write_bytes(b"old manifest")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write = lambda obj, handle: handle.write(obj)  # noqa: E731
    calls = _replace_failing_on_call(monkeypatch, 2, errno.EIO)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_save_all([(b"new weights", first, write), (b"new manifest", second, write)])
    monkeypatch.undo()
    assert [Path(dst) for _, dst in calls[:2]] == [first, second]  # the first rename did happen
    # both files as they were, and no temporary file (staged or kept previous) left
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    atomic_save_all([(b"new weights", first, write), (b"new manifest", second, write)])
    assert (first.read_bytes(), second.read_bytes()) == (b"new weights", b"new manifest")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "weights.bin"]


def _temp_name(target: Path, pid: int, host: str | None) -> Path:
    writer = f"{host}-{pid}" if host is not None else str(pid)  # None: the name format without a host
    return target.with_name(f".{target.name}.tmp-{writer}-0123abcd")


def test_a_save_sweeps_only_temporary_files_of_writers_that_are_gone(tmp_path: Path) -> None:
    from layermoe.checkpointing.atomic_io import _this_host

    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(ended.stdout)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        path = tmp_path / "last.ckpt"
        host = _this_host()
        kept = [
            _temp_name(path, live.pid, host),  # another process on this host, still writing
            _temp_name(path, live.pid, None),
            _temp_name(path, dead_pid, "another-host"),  # a writer elsewhere on a shared folder: unknown
        ]
        swept = [_temp_name(path, dead_pid, host), _temp_name(path, dead_pid, None)]
        for temp in kept + swept:
            temp.write_bytes(b"half a checkpoint")
        assert stale_temp_files(path) == sorted(swept)
        AtomicCheckpointIO().save_checkpoint(_ckpt(1.0), path)
        assert sorted(p for p in tmp_path.iterdir() if p != path) == sorted(kept)
        assert torch.load(path, weights_only=True)["step"] == 1
    finally:
        live.kill()
        live.wait()
    # once that writer has ended, its files are stale too (the other host's file stays)
    assert stale_temp_files(path) == sorted(kept[:2])


def test_a_failed_put_back_is_named_with_where_the_previous_file_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the message said "Nothing was written (the previous file is unchanged)" while the first
    target held the new file and its previous one sat under a temporary name."""
    import errno
    import os

    from layermoe.checkpointing.atomic_io import CheckpointWriteError, atomic_save_all

    first, second = tmp_path / "weights.bin", tmp_path / "manifest.json"
    first.write_bytes(b"old weights")
    second.write_bytes(b"old manifest")
    write = lambda obj, handle: handle.write(obj)  # noqa: E731
    real_replace, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):  # the second rename fails (disk full), then the put-back
        calls.append((src, dst))
        if len(calls) in (2, 3):
            raise OSError(errno.ENOSPC if len(calls) == 2 else errno.EIO, "refused")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointWriteError) as info:
        atomic_save_all([(b"new weights", first, write), (b"new manifest", second, write)])
    monkeypatch.undo()
    message = str(info.value)
    assert "Nothing was written" not in message
    previous = Path(calls[2][0])  # where the put-back tried to move the previous file from
    assert f"{first} holds the new file of this failed save" in message
    assert f"mv {previous} {first}" in message
    assert first.read_bytes() == b"new weights" and previous.read_bytes() == b"old weights"
    assert second.read_bytes() == b"old manifest"
