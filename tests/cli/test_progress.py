"""gateway/cli/progress.py: a status line on a real pseudo-terminal, and silence on anything else.

The terminal is a real pty (``os.openpty``): what the reporter writes to its slave side is read back
from the master side, carriage returns and all.
"""

from __future__ import annotations

import argparse
import io
import os
import select
from collections.abc import Iterator
from typing import TextIO

import pytest

from gateway.cli.progress import Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def tty() -> Iterator[tuple[TextIO, int]]:
    """(the terminal as the command sees it, the master side the test reads)."""
    master, slave = os.openpty()
    stream = open(slave, "w", encoding="utf-8")  # noqa: SIM115 (closed below)
    try:
        yield stream, master
    finally:
        stream.close()
        os.close(master)


def read_all(master: int) -> str:
    out = b""
    while select.select([master], [], [], 0.2)[0]:
        chunk = os.read(master, 65536)
        if not chunk:
            break
        out += chunk
    return out.decode().replace("\r\n", "\n")  # the terminal turns a newline into CR LF


def test_on_a_terminal_the_line_is_redrawn_rate_limited_and_ended(tty):
    stream, master = tty
    clock = Clock()
    progress = Progress(stream, clock=clock)
    assert progress.enabled
    with progress:
        progress.update("re-sealing", 1, 300)
        for n in range(2, 100):  # within one interval: not drawn
            progress.update("re-sealing", n, 300)
        clock.now += 0.25
        progress.update("re-sealing", 100, 300)
        clock.now += 0.01
        progress.update("re-sealing", 150, 300)  # too soon: drawn only by finish()
    assert read_all(master) == ("\rre-sealing: 1 of 300 (0%)\rre-sealing: 100 of 300 (33%)"
                                "\rre-sealing: 150 of 300 (50%)\n")


def test_the_last_step_is_always_drawn_and_a_shorter_line_wipes_the_longer(tty):
    stream, master = tty
    progress = Progress(stream, clock=Clock())
    progress.update("copying files", 10 * 1024 * 1024, 20 * 1024 * 1024, size=True)
    progress.update("copying files", 20 * 1024 * 1024, 20 * 1024 * 1024, size=True)  # done: drawn at once
    progress.update("hashing", 3)
    progress.finish()
    progress.finish()  # a second finish adds nothing
    text = read_all(master)
    assert text.startswith("\rcopying files: 10.0 MiB of 20.0 MiB (50%)\rcopying files: 20.0 MiB of 20.0 MiB (100%)")
    assert text.endswith("\rhashing: 3" + " " * (len("copying files: 20.0 MiB of 20.0 MiB (100%)") - len("hashing: 3")) + "\n")


def test_nothing_drawn_nothing_ended(tty):
    stream, master = tty
    Progress(stream).finish()
    assert read_all(master) == ""


def test_json_mode_is_quiet_on_a_terminal(tty):
    stream, master = tty
    assert Progress.for_command(argparse.Namespace(), stream).enabled
    quiet = Progress.for_command(argparse.Namespace(json=True), stream)
    with quiet:
        quiet.update("x", 1, 1)
    assert not quiet.enabled and read_all(master) == ""


def test_not_a_terminal_is_quiet():
    for stream in (io.StringIO(), open(os.devnull, "w")):  # noqa: SIM115
        progress = Progress.for_command(argparse.Namespace(), stream)
        with progress:
            progress.update("x", 5, 10)
            progress(what="y", done=1)
        assert not progress.enabled
        if isinstance(stream, io.StringIO):
            assert stream.getvalue() == ""
        stream.close()
    r, w = os.pipe()
    with open(w, "w") as pipe:
        with Progress.for_command(argparse.Namespace(), pipe) as p:
            p.update("x", 1, 2)
    with open(r) as reader:
        assert reader.read() == ""
