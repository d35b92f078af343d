"""Crash-safe checkpoint files: a checkpoint on disk is either the old one or the complete new one.

Why not Lightning's stock ``TorchCheckpointIO``: it goes through an fsspec transaction, which for local
paths writes to a temporary file from ``tempfile.mkstemp()`` (the system temp folder) and then
``shutil.move``s it. When the temp folder sits on another filesystem, ``shutil.move`` copies into the
destination in place, so a process killed mid-copy leaves a truncated ``last.ckpt``; nothing is fsynced
either, so a power loss can leave an empty file after a "successful" save, and a killed writer leaks its
temp file outside the run folder.

Here the bytes go to a hidden temporary file in the destination folder, are flushed and fsynced, and
the file is then renamed over the destination with ``os.replace`` (atomic on POSIX within one
filesystem); finally the folder is fsynced so the rename itself survives a power loss.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .integrity import (
    check_finite_state,
    read_verified_checkpoint,
    verify_loaded_checkpoint,
    with_checksum,
)

CheckpointPath = str | os.PathLike  # what Lightning passes as a checkpoint path (its own alias is private)

log = logging.getLogger(__name__)

_TMP_MARK = ".tmp-"


def _this_host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def _temp_path_for(path: Path) -> Path:
    # Hidden, and not ending in ".ckpt": ModelCheckpoint's "last"/top-k discovery never picks it up. The
    # host and pid name the writer, so a sweep can tell a dead writer's leftover from a live one's file.
    return path.with_name(f".{path.name}{_TMP_MARK}{_this_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(folder: Path) -> None:
    """Persist a rename/unlink in ``folder``; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temp_files(path: CheckpointPath) -> list[Path]:
    """Temporary files next to ``path`` whose writer is gone (killed before its rename): written on this
    host by a process id that no longer runs. Files of a live writer (another process saving into the same
    folder, or this one) are never listed, nor files written on another host (a shared network folder:
    whether that writer runs cannot be told from here). Names without a host (written by layermoe before it
    recorded one) count as this host's. A dead writer whose pid was reused by a running process keeps its
    file until that process ends."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = f".{path.name}{_TMP_MARK}"
    return sorted(
        p for p in path.parent.iterdir() if p.name.startswith(prefix) and _writer_gone(p.name[len(prefix) :])
    )


def _writer_gone(suffix: str) -> bool:
    """Whether the writer named by a temporary file's ``[host-]pid-token`` suffix is known to have ended."""
    parts = suffix.rsplit("-", 2)
    host, pid = (parts[0], parts[1]) if len(parts) == 3 else (None, parts[0])
    if (host is not None and host != _this_host()) or not pid.isdigit():
        return False
    return not _process_runs(int(pid))


def _process_runs(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill there terminates the process instead of probing it: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it runs under another user
        return True
    return True


class CheckpointWriteError(OSError):
    """A checkpoint or artifact could not be written (full disk, read-only or forbidden folder); nothing
    was written: the previous files are unchanged and no temporary file is left."""


# errno -> (what is wrong with the folder, what to do)
_WRITE_FAILURES = {
    errno.ENOSPC: (
        "the disk holding {folder} is full",
        "free space there (delete old step=*.ckpt files,"
        " lower ModelCheckpoint's save_top_k) or write to a folder on another disk",
    ),
    errno.EDQUOT: (
        "the disk quota for {folder} is exhausted",
        "free space in your quota or write to another folder",
    ),
    errno.EROFS: ("{folder} is on a read-only filesystem", "write to a writable folder"),
    errno.EACCES: (
        "this process may not write to {folder}",
        "fix the folder's permissions or write to another folder",
    ),
    errno.EPERM: (
        "this process may not write to {folder}",
        "fix the folder's permissions or write to another folder",
    ),
}
_WHERE = (
    " (the run's folder: trainer.default_root_dir or ModelCheckpoint's dirpath; for save_adapters its"
    " folder argument)"
)


def _write_error(err: OSError, path: Path) -> OSError:
    """``err`` as a ``CheckpointWriteError`` naming the folder, the cause and the fix, when it is one of
    the errors a user fixes on the machine; else ``err`` itself."""
    if err.errno not in _WRITE_FAILURES:
        return err
    cause, fix = _WRITE_FAILURES[err.errno]
    unrestored = getattr(err, "__notes__", None)
    if unrestored:
        outcome = " ".join(unrestored)
    else:
        kept = "the previous file is unchanged" if path.is_file() else "no partial file is left"
        outcome = f"Nothing was written ({kept})."
    return CheckpointWriteError(
        err.errno,
        f"cannot write {path}: {cause.format(folder=path.parent)} ({err.strerror}). {outcome} Fix: {fix}"
        f"{_WHERE}; a fit can then resume from its last complete checkpoint.",
    )


def _stage(obj: Any, path: Path, save_fn: Callable[[Any, Any], None]) -> Path:
    """The bytes of ``obj`` in a flushed, fsynced temporary file next to ``path`` (removed on failure)."""
    tmp = _temp_path_for(path)
    try:
        with open(tmp, "wb") as handle:
            save_fn(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_save_all(items: list[tuple[Any, CheckpointPath, Callable[[Any, Any], None] | None]]) -> None:
    """Write each ``(obj, path, save_fn)`` such that no ``path`` ever holds a partial file, and either every
    ``path`` holds its new file or each holds what it held before: no file is replaced unless every file
    could be staged (a full disk fails before anything changes), and when a rename fails after earlier
    ones succeeded, those files are put back (:func:`_replace_all`).

    ``save_fn(obj, file_object)`` does the serialization (default ``torch.save``, looked up at call time).
    """
    staged: list[tuple[Path, Path]] = []
    path = Path(items[0][1])
    renaming = False
    try:
        for obj, target, save_fn in items:
            path = Path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            staged.append((_stage(obj, path, torch.save if save_fn is None else save_fn), path))
        renaming = True
        _replace_all(staged)
    except BaseException as err:
        if renaming:  # the failed rename is the first whose temporary file is still there
            path = next((target for tmp, target in staged if tmp.exists()), path)
        # Any failure (including KeyboardInterrupt) leaves the previous files as they were.
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _write_error(err, path) from err
        raise
    for folder in sorted({target.parent for _, target in staged}):
        _fsync_dir(folder)
    # Leftovers of writers that were SIGKILLed before their rename (another live writer's files stay).
    for _, target in staged:
        for leftover in stale_temp_files(target):
            leftover.unlink(missing_ok=True)


def _replace_all(staged: list[tuple[Path, Path]]) -> None:
    """Rename each staged temporary file over its target. With several files, each target's previous file
    is first kept under a temporary name (a hard link, or a copy where the filesystem has none), and a
    failed rename puts back the targets already replaced (or removes them where there was none), so the
    set stays all-or-nothing for a failure this process sees; a kill between two renames can still leave
    the first new file beside the second old one (``load_adapters`` then refuses the pair by checksum)."""
    if len(staged) == 1:
        tmp, target = staged[0]
        os.replace(tmp, target)
        return
    kept: dict[Path, Path | None] = {}
    replaced: list[Path] = []
    try:
        for _, target in staged:
            kept[target] = _keep_previous(target)
        for tmp, target in staged:
            os.replace(tmp, target)
            replaced.append(target)
    except BaseException as err:
        for target in reversed(replaced):
            if problem := _put_back(target, kept):
                err.add_note(problem)
        raise
    finally:
        for previous in kept.values():
            if previous is not None:
                previous.unlink(missing_ok=True)


def _keep_previous(target: Path) -> Path | None:
    """A temporary name holding ``target``'s current file, or None when there is no file there."""
    if not target.is_file():
        return None
    previous = _temp_path_for(target)
    try:
        os.link(target, previous)
    except OSError:
        try:
            shutil.copy2(target, previous)
        except BaseException:
            previous.unlink(missing_ok=True)
            raise
    return previous


def _put_back(target: Path, kept: dict[Path, Path | None]) -> str | None:
    """Restore ``target``'s previous file (or remove the new one where there was none); what is left to do
    by hand when that fails, else None."""
    previous = kept[target]
    try:
        if previous is None:
            target.unlink(missing_ok=True)
        else:
            os.replace(previous, target)
            kept[target] = None
    except OSError as err:
        kept[target] = None  # keep the only copy of the previous file where it is
        log.error("could not restore %s from %s after a failed save: %s", target, previous, err)
        if previous is None:
            return f"{target} holds the new file of this failed save and could not be removed ({err}); delete it."
        return (
            f"{target} holds the new file of this failed save: its previous file could not be put back"
            f" ({err}) and is at {previous}; move it back by hand (mv {previous} {target})."
        )
    return None


def atomic_torch_save(
    obj: Any, path: CheckpointPath, save_fn: Callable[[Any, Any], None] | None = None
) -> None:
    """``torch.save(obj, path)`` such that ``path`` never holds a partial file (:func:`atomic_save_all`)."""
    atomic_save_all([(obj, path, save_fn)])


class AtomicCheckpointIO(TorchCheckpointIO):
    """A Lightning ``CheckpointIO`` whose saves and removals are all-or-nothing on local disks.

    Use it with ``Trainer(plugins=[AtomicCheckpointIO()])``. Every checkpoint it writes carries a content
    checksum (``layermoe_checksum``), and one whose weights hold NaN or infinity is refused instead of
    written. Loading names the file when it is empty, truncated or corrupt (checksum mismatch, non-finite
    weights) and checks the MoE-LoRA layout (``validate_checkpoint_layout``), all before Lightning hands
    the weights to the module. URL paths
    (``s3://``, ``file://``, ...) are saved by Lightning's stock fsspec code (object-store uploads are
    all-or-nothing there).
    """

    def load_checkpoint(
        self,
        path: CheckpointPath,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not _is_remote(path):
            return read_verified_checkpoint(
                path, map_location=map_location, weights_only=weights_only, lightning=False
            )
        checkpoint = super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        verify_loaded_checkpoint(checkpoint, f"checkpoint {path}")
        return checkpoint

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: CheckpointPath, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint got storage_options={storage_options!r}, which it does"
                " not use; call Trainer.save_checkpoint(path) without storage_options."
            )
        check_finite_state(checkpoint, f"checkpoint {path}", "write")
        checkpoint = with_checksum(checkpoint)
        if _is_remote(path):
            super().save_checkpoint(checkpoint, path)
            return
        log.debug("Saving checkpoint atomically: %s", path)
        atomic_torch_save(checkpoint, path)

    def remove_checkpoint(self, path: CheckpointPath) -> None:
        """Delete ``path``; the unlink is atomic, and fsyncing the folder makes it durable."""
        if _is_remote(path):
            super().remove_checkpoint(path)
            return
        path = Path(path)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except IsADirectoryError:
            # A sharded checkpoint folder: not written by this plugin, removed as Lightning would.
            super().remove_checkpoint(path)
            return
        _fsync_dir(path.parent)
        log.debug("Removed checkpoint: %s", path)


def _is_remote(path: CheckpointPath) -> bool:
    return "://" in str(path)
