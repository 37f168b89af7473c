"""Progress of a long command on a terminal: one line on stderr, redrawn at most a few times a second.

Only a person watching a terminal gets it: nothing is written when stderr is not a TTY (a pipe, a
file, cron, systemd) or the command prints ``--json``, so scripts and logs see results only.  The
line ends with a newline once the work is done, so that the next output starts on a line of its own.

    with Progress.for_command(args) as progress:
        for n, item in enumerate(items, 1):
            ...
            progress.update("re-sealing", n, len(items))
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO

INTERVAL_S = 0.2  # at most five redraws a second: a terminal over SSH keeps up, the work is not slowed
MIB = 1024 * 1024


class Progress:
    """``update(what, done, total)`` redraws one status line (rate-limited); ``finish()`` ends it."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None, interval: float = INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_tty(self.stream) if enabled is None else enabled
        self.interval = interval
        self.clock = clock
        self._last = float("-inf")
        self._shown = ""
        self._pending = ""

    @classmethod
    def for_command(cls, args: Any, stream: TextIO | None = None) -> Progress:
        """Shown on a terminal only, never with ``--json``."""
        stream = stream if stream is not None else sys.stderr
        return cls(stream, enabled=_is_tty(stream) and not getattr(args, "json", False))

    def update(self, what: str, done: int, total: int | None = None, *, size: bool = False) -> None:
        """``what``: done of total (percent); ``size``: the counts are bytes, shown in MiB."""
        if not self.enabled:
            return
        count = (lambda n: f"{n / MIB:.1f} MiB") if size else str
        line = f"{what}: {count(done)}" + (f" of {count(total)} ({100 * done // total if total else 100}%)"
                                           if total is not None else "")
        self._pending = line
        now = self.clock()
        if now - self._last >= self.interval or (total is not None and done >= total):
            self._draw(line)
            self._last = now

    def _draw(self, line: str) -> None:
        pad = " " * max(0, len(self._shown) - len(line))  # wipe what a longer line left behind
        self.stream.write(f"\r{line}{pad}")
        self.stream.flush()
        self._shown = line

    def finish(self) -> None:
        """The last state drawn and the line ended; nothing when nothing was shown."""
        if not self.enabled or not self._pending:
            return
        if self._pending != self._shown:
            self._draw(self._pending)
        self.stream.write("\n")
        self.stream.flush()
        self._shown = self._pending = ""
        self._last = float("-inf")

    def __call__(self, what: str, done: int, total: int | None = None, *, size: bool = False) -> None:
        """As the callback lower layers report to (gateway/operations/backup.py)."""
        self.update(what, done, total, size=size)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.finish()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or detached stream
        return False
