"""Progress that shows in a terminal and in a log: tqdm bars on a terminal, dated lines elsewhere.

A tqdm bar redraws one line with carriage returns, which a log file or a pipe (``make quickstart | tee``,
CI) shows only at the next newline: a long phase then looks like a hang. :func:`progress_bar` returns a
plain tqdm on a terminal and a :class:`LineTqdm` otherwise, which writes the same status as whole lines,
at most one per ``interval`` seconds. :func:`heartbeat` covers phases with no steps to count (a model
conversion inside a library call).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

from tqdm import tqdm

#: Seconds between two progress lines: under the 30 s a user waits before suspecting a hang.
LINE_INTERVAL_S = 20.0


def is_terminal(stream: IO[str] | None) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and closed streams)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):
        return False


class LineTqdm(tqdm):
    """A tqdm that prints its status as whole lines: the first after ``interval`` seconds, then at most
    one per ``interval``, and the final state at close when it printed before (a phase shorter than
    ``interval`` prints nothing). Redraws and clears, which need a terminal, write nothing."""

    def __init__(self, *args: Any, interval: float = LINE_INTERVAL_S, **kwargs: Any) -> None:
        self._interval = float(interval)
        self._shown_at = time.monotonic()
        self._shown_n: float | None = None
        super().__init__(*args, **kwargs)

    def _write_line(self) -> None:
        self._shown_at, self._shown_n = time.monotonic(), self.n
        self.fp.write(self.__str__() + "\n")
        self.fp.flush()

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is not None:  # tqdm clears (msg="") or writes a message over its line: nothing to redraw
            return False
        if time.monotonic() - self._shown_at >= self._interval:
            self._write_line()
        return True

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear: lines already written stay."""

    def close(self) -> None:
        if not self.disable and self._shown_n is not None and self._shown_n != self.n:
            self._write_line()
        self.leave = False  # the final line is written above; tqdm would add a blank line
        super().close()


def progress_bar(*, file: IO[str] | None = None, interval: float = LINE_INTERVAL_S, **kwargs: Any) -> tqdm:
    """A tqdm bar on ``file`` (default stderr): the usual bar on a terminal, :class:`LineTqdm` elsewhere."""
    file = sys.stderr if file is None else file
    if is_terminal(file):
        return tqdm(file=file, **kwargs)
    return LineTqdm(file=file, interval=interval, **kwargs)


@contextmanager
def heartbeat(label: str, interval: float = LINE_INTERVAL_S, file: IO[str] | None = None) -> Iterator[None]:
    """Print ``label: still running (N s)`` every ``interval`` seconds until the block ends."""
    stream = sys.stderr if file is None else file
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(interval):
            print(f"{label}: still running ({time.monotonic() - start:.0f} s)", file=stream, flush=True)

    thread = threading.Thread(target=beat, name=f"heartbeat: {label}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
