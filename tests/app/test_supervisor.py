"""Several worker processes behind one port: shared state, a dying worker replaced, clean stop."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.cli.demo import SAMPLE
from gateway.operations import instance
from tests.helpers import ENV, free_port, numbered, wait_for_port
from tests.helpers.daemon import children, post_many, set_workers


@pytest.fixture
def served(tmp_path: Path):
    port = free_port()
    inst = instance.init(tmp_path / "gw", port=port)
    set_workers(inst, 2)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(inst.config)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, proc)
        yield inst, proc, until_ready(proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        if proc.stdout and not proc.stdout.closed:
            proc.communicate(timeout=60)  # also closes the pipes


def until_ready(proc: subprocess.Popen) -> str:
    """The log output up to the supervisor's "every worker is ready" (a worker still starting when the
    test sends SIGTERM would never log gateway.started).  Read from the pipe itself, unbuffered, so
    ``communicate()`` later returns exactly the rest."""
    assert proc.stdout is not None
    fd, out = proc.stdout.fileno(), b""
    deadline = time.monotonic() + 30
    while b'"supervisor.ready"' not in out:
        assert time.monotonic() < deadline, f"the supervisor did not report ready within 30 s: {out.decode()}"
        assert proc.poll() is None, f"serve exited early with {proc.returncode}: {out.decode()}"
        if select.select([fd], [], [], 0.2)[0]:
            out += os.read(fd, 65536)
    return out.decode()


@pytest.mark.slow
def test_workers_share_one_store_and_stop_cleanly(served):
    inst, proc, head = served
    assert len(children(proc.pid)) == 2
    same = asyncio.run(post_many(inst, [SAMPLE] * 30))
    assert {s for s, _ in same} == {202}
    assert len({r["message_id"] for _, r in same}) == 1  # one acceptance across both processes
    assert sum(not r["duplicate"] for _, r in same) == 1
    distinct = [numbered(f"W-{i}") for i in range(20)]
    replies = asyncio.run(post_many(inst, distinct))
    assert [s for s, _ in replies] == [202] * 20
    deadline = time.monotonic() + 10  # worker 0 delivers what both accepted
    while len(list(inst.delivery_folder.glob("*.xml"))) < 21 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(inst.delivery_folder.glob("*.xml"))) == 21
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    events = [json.loads(line) for line in (head + out).splitlines() if line.strip()]
    assert sum(e["event"] == "gateway.started" for e in events) == 2, [e["event"] for e in events]
    assert sum(e["event"] == "gateway.stopped" for e in events) == 2
    assert events[-1]["event"] == "supervisor.stopped"


@pytest.mark.slow
def test_a_dead_worker_is_replaced(served):
    inst, proc, _ = served
    victim = children(proc.pid)[0]
    subprocess.run(["kill", "-9", str(victim)], check=True)
    deadline = time.monotonic() + 15
    while (victim in children(proc.pid) or len(children(proc.pid)) < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert victim not in children(proc.pid) and len(children(proc.pid)) == 2
    replies = asyncio.run(post_many(inst, [SAMPLE] * 6))
    assert {s for s, _ in replies} == {202}
