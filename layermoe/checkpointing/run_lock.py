"""One fit per output folder: ``train.py fit`` holds an exclusive lock on each folder it writes to.

Why: two fits writing into one folder at once delete and overwrite each other's checkpoints (Lightning's
top-k bookkeeping and ``last.ckpt`` assume one writer): one run dies with a raw ``FileNotFoundError``, the
other ends with the first run's checkpoints mixed into its own. The lock is an OS file lock
(``filelock.FileLock``: released by the kernel when the process ends, so a killed run never leaves a stale
lock), and a sidecar file records who holds it, so the refused run can name the other process.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_NAME = ".layermoe-fit.lock"
OWNER_SUFFIX = ".owner.json"


class RunFolderBusyError(RuntimeError):
    """Another process is fitting into the same output folder."""


def _owner_path(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + OWNER_SUFFIX)


def _describe_owner(lock_path: Path) -> str:
    try:
        owner = json.loads(_owner_path(lock_path).read_text())
        return (
            f"process {owner['pid']} on host {owner['host']}, started {owner['started']}"
            f" (command: {owner['command']})"
        )
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not recorded its pid and host yet)"


def _record_owner(lock_path: Path) -> None:
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    temp = lock_path.with_name(f"{lock_path.name}.{os.getpid()}.tmp")
    temp.write_text(json.dumps(owner))
    os.replace(temp, _owner_path(lock_path))


@contextlib.contextmanager
def run_folder_lock(folders: Iterable[str | os.PathLike]) -> Iterator[list[Path]]:
    """Hold ``LOCK_NAME`` in each folder for the ``with`` block; all or none. Folders made for the lock
    are removed again at the end when nothing was written in them.

    Raises ``RunFolderBusyError`` naming the folder and the process holding it (pid, host, start time,
    command) when another process holds one; nothing of this process is then written there.
    """
    paths = sorted({Path(folder).resolve() for folder in folders})
    held: list[FileLock] = []
    created: list[Path] = []  # folders made here, removed again at the end if nothing was written in them
    try:
        for folder in paths:
            created += reversed([p for p in (folder, *folder.parents) if not p.exists()])
            folder.mkdir(parents=True, exist_ok=True)
            lock_path = folder / LOCK_NAME
            lock = FileLock(lock_path, timeout=0)
            try:
                lock.acquire()
            except Timeout:
                raise RunFolderBusyError(
                    f"{folder} is in use by {_describe_owner(lock_path)}: two fits writing into one folder"
                    " overwrite each other's checkpoints. Wait for that run to finish (or stop it), or give"
                    " this run another folder (trainer.default_root_dir and the ModelCheckpoint dirpath)."
                ) from None
            held.append(lock)
            _record_owner(lock_path)
        yield paths
    finally:
        for lock in reversed(held):
            with contextlib.suppress(OSError):
                _owner_path(Path(lock.lock_file)).unlink()
            lock.release()
        for folder in reversed(created):  # deepest first
            with contextlib.suppress(OSError):
                if [entry.name for entry in folder.iterdir()] in ([], [LOCK_NAME]):
                    (folder / LOCK_NAME).unlink(missing_ok=True)
                    folder.rmdir()
