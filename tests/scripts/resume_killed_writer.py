"""Write a checkpoint through AtomicCheckpointIO and SIGKILL this process halfway through the bytes.

Usage: python resume_killed_writer.py PATH VALUE. The checkpoint would be {"value": tensor(VALUE)};
the test checks that PATH still holds the previous checkpoint afterwards.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch

from layermoe.checkpointing import AtomicCheckpointIO

_real_save = torch.save


def _save_half_then_die(obj, handle) -> None:
    buffer = io.BytesIO()
    _real_save(obj, buffer)
    data = buffer.getvalue()
    handle.write(data[: len(data) // 2])
    handle.flush()
    os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    path, value = sys.argv[1], float(sys.argv[2])
    torch.save = _save_half_then_die
    AtomicCheckpointIO().save_checkpoint({"value": torch.full((256,), value)}, path)
    raise SystemExit("unreachable: the save should have been killed")


if __name__ == "__main__":
    main()
