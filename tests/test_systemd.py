"""The sd_notify protocol seen from systemd's side: a real AF_UNIX datagram socket receives what the
real daemon (``python -m gateway serve``, alone or with worker processes) sends.

READY=1 only once the HTTPS listener answers; WATCHDOG=1 at half of WATCHDOG_USEC; SIGHUP gives
RELOADING=1 (with MONOTONIC_USEC) then READY=1; SIGTERM gives STOPPING=1 and exit 0.  Every message
comes from the main process (systemd's default NotifyAccess=main ignores the others).

``Daemon`` and ``NotifySocket`` are reused by test_reload.py and test_admin.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from gateway.operations import instance
from gateway.tls import client_context
from tests.cli.test_main import ENV, free_port

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def set_workers(inst: instance.Instance, workers: int) -> None:
    text = inst.config.read_text()
    assert "workers = 0" in text
    inst.config.write_text(text.replace("workers = 0", f"workers = {workers}", 1))


def set_admin(inst: instance.Instance, port: int, host: str = "127.0.0.1", token_file: Path | None = None) -> None:
    """Point the [admin] table at ``host:port`` (and a token file)."""
    text = inst.config.read_text()
    head, sep, tail = text.partition("[admin]\n")
    assert sep, "the config has no [admin] table"
    lines = tail.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("listen_host = "):
            lines[i] = f'listen_host = "{host}"'
        elif line.startswith("listen_port = "):
            lines[i] = f"listen_port = {port}"
        elif line.startswith("# token_file = ") and token_file is not None:
            lines[i] = f'token_file = "{token_file}"'
        elif line.startswith("["):
            break
    inst.config.write_text(head + sep + "\n".join(lines))


def make_instance(tmp_path: Path, workers: int, admin_port: int = 0) -> instance.Instance:
    """An instance on a free port with ``workers`` processes and the admin listener on ``admin_port`` (0: off)."""
    inst = instance.init(tmp_path / "gw", port=free_port())
    set_workers(inst, workers)
    set_admin(inst, admin_port)
    return inst


# --- the systemd side -------------------------------------------------------------------------------


@dataclass
class Message:
    at: float  # time.monotonic() when received
    pid: int  # the sender (SCM_CREDENTIALS)
    fields: dict[str, str]

    def __contains__(self, item: str) -> bool:
        key, _, value = item.partition("=")
        return self.fields.get(key) == value


@dataclass
class NotifySocket:
    """What systemd listens on: a datagram socket that is always drained (a full queue would block the
    sender), recording each message with its sender's pid."""

    address: str  # as put in NOTIFY_SOCKET: a path, or "@name" for an abstract socket
    sock: socket.socket
    messages: list[Message] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    @contextlib.contextmanager
    def open(cls, abstract: bool = False) -> Iterator[NotifySocket]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        with tempfile.TemporaryDirectory(prefix="sd-", dir="/tmp") as folder:  # short: sun_path holds 108 bytes
            if abstract:
                name = f"einvoice-test-{uuid.uuid4().hex}"
                sock.bind("\0" + name)
                address = "@" + name
            else:
                address = os.path.join(folder, "notify")
                sock.bind(address)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.settimeout(0.1)
            ns = cls(address, sock)
            ns.thread = threading.Thread(target=ns._drain, name="notify-socket", daemon=True)
            ns.thread.start()
            try:
                yield ns
            finally:
                ns.stop.set()
                ns.thread.join(5)
                sock.close()

    def _drain(self) -> None:
        while not self.stop.is_set():
            try:
                data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            except OSError:
                return
            pid = 0
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
            with self.cond:
                self.messages.append(Message(time.monotonic(), pid, fields))
                self.cond.notify_all()

    def wait_for(self, state: str, after: int = 0, timeout: float = START_TIMEOUT_S, proc: subprocess.Popen | None = None
                 ) -> int:
        """The index of the first message at or after ``after`` that carries ``state`` (KEY=value)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for i in range(after, len(self.messages)):
                    if state in self.messages[i]:
                        return i
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {state} within {timeout} s; received: {[m.fields for m in self.messages]}")
                if proc is not None and proc.poll() is not None:
                    pytest.fail(f"the daemon exited with {proc.returncode} before sending {state}")
                self.cond.wait(min(left, 0.2))

    def since(self, index: int) -> list[Message]:
        with self.cond:
            return list(self.messages[index:])


# --- the daemon ---------------------------------------------------------------------------------------


class Daemon:
    """``python -m gateway serve`` as a subprocess; its JSON log lines are collected by a thread."""

    def __init__(self, inst: instance.Instance, env: dict[str, str] | None = None):
        self.inst = inst
        self.events: list[dict] = []
        self.stderr: list[str] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(inst.config)],
                                     env={**ENV, **(env or {})}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "(not json)", "line": line}
            with self.cond:
                self.events.append(event)
                self.cond.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def named(self, event: str) -> list[dict]:
        with self.cond:
            return [e for e in self.events if e.get("event") == event]

    def wait_event(self, event: str, count: int = 1, timeout: float = START_TIMEOUT_S) -> list[dict]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [e for e in self.events if e.get("event") == event]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    pytest.fail(f"{count} x {event} not logged (exit code {self.proc.poll()}); "
                                f"events: {[e.get('event') for e in self.events]}; stderr: {''.join(self.stderr)[-2000:]}")
                self.cond.wait(min(left, 0.2))

    def wait_ready(self, workers: int, timeout: float = START_TIMEOUT_S) -> None:
        """Without a notify socket: wait for every process's gateway.started (and the port)."""
        self.wait_event("gateway.started", count=workers, timeout=timeout)
        wait_accepting(self.inst, timeout)

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._finish()
        return code

    def kill(self) -> None:
        """Always called in finally: whatever is still running (the daemon and its workers) is killed."""
        if self.proc.poll() is None:
            workers = children(self.proc.pid)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                for pid in [self.proc.pid, *workers]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.wait()
        self._finish()

    def _finish(self) -> None:
        for t in self._threads:
            t.join(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()


def wait_accepting(inst: instance.Instance, timeout: float = START_TIMEOUT_S) -> None:
    port = int(inst.https_url.rsplit(":", 1)[1])
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def answers_https(inst: instance.Instance, timeout: float = 5.0) -> int:
    """A whole mutual-TLS request right now: the status of GET on an unknown message id (404)."""
    async def get() -> int:
        ctx = client_context(inst.ca.cert, inst.demo_client.cert, inst.demo_client.key)
        async with aiohttp.ClientSession(inst.https_url, connector=aiohttp.TCPConnector(ssl=ctx),
                                         timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(f"/v1/invoices/{uuid.uuid4()}") as r:
                await r.read()
                status = r.status
        await asyncio.sleep(0.05)  # let the TLS transport finish closing
        return status

    return asyncio.run(get())


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# --- the tests ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_ready_watchdog_reload_and_stop(tmp_path, workers):
    inst = make_instance(tmp_path, workers)
    with NotifySocket.open() as ns:
        daemon = Daemon(inst, {"NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": "2000000"})
        try:
            ready = ns.wait_for("READY=1", proc=daemon.proc)
            # Right after READY=1, the listener does the whole mutual-TLS exchange at once (not after the
            # seconds a worker process takes to start).
            t0 = time.monotonic()
            assert answers_https(inst) == 404
            assert time.monotonic() - t0 < 2.0
            if workers == 2:
                assert len(children(daemon.pid)) == 2
                assert len(daemon.wait_event("gateway.started", count=2)) == 2  # every worker had started
            assert not any("STOPPING=1" in m or "RELOADING=1" in m for m in ns.since(0))

            # The watchdog is fed at half of WATCHDOG_USEC (1 s): at least two pings within 3.5 s.
            first = ns.wait_for("WATCHDOG=1", after=ready, timeout=5)
            second = ns.wait_for("WATCHDOG=1", after=first + 1, timeout=3.5)
            pings = [m for m in ns.since(ready) if "WATCHDOG=1" in m]
            gap = ns.messages[second].at - ns.messages[first].at
            assert 0.5 < gap < 2.0, f"watchdog pings {gap:.2f} s apart (want about 1 s)"

            # SIGHUP: RELOADING=1 with the monotonic time it began, then READY=1 once reloaded.
            mark = len(ns.since(0))
            before = monotonic_usec()
            daemon.proc.send_signal(signal.SIGHUP)
            reloading = ns.wait_for("RELOADING=1", after=mark, timeout=15)
            usec = ns.messages[reloading].fields.get("MONOTONIC_USEC", "")
            assert usec.isdigit(), ns.messages[reloading].fields
            assert before <= int(usec) <= monotonic_usec()
            ns.wait_for("READY=1", after=reloading + 1, timeout=30)
            assert len(daemon.wait_event("config.reloaded", count=workers, timeout=10)) == workers
            assert answers_https(inst) == 404

            # SIGTERM: STOPPING=1, then a clean exit.
            mark = len(ns.since(0))
            assert daemon.terminate() == 0, "".join(daemon.stderr)[-2000:]
            ns.wait_for("STOPPING=1", after=mark, timeout=5)
            after_stop = ns.since(ns.wait_for("STOPPING=1", after=mark, timeout=1))
            assert not any("READY=1" in m for m in after_stop)
            everything = ns.since(0)
            # Only the main process speaks to systemd (worker processes do not inherit NOTIFY_SOCKET).
            assert {m.pid for m in everything} == {daemon.pid}
            assert sum("READY=1" in m for m in everything) == 2  # start and reload, never once per worker
            assert len(pings) >= 2
            assert daemon.named("gateway.stopped")
        finally:
            daemon.kill()


def test_supervisor_refuses_an_invalid_reload_without_reloading(tmp_path):
    """With workers, the supervisor checks the configuration first: an invalid one gives no RELOADING=1
    and the workers never see the signal; a later valid reload works."""
    inst = make_instance(tmp_path, 2)
    good = inst.config.read_text()
    with NotifySocket.open() as ns:
        daemon = Daemon(inst, {"NOTIFY_SOCKET": ns.address})
        try:
            ns.wait_for("READY=1", proc=daemon.proc)
            mark = len(ns.since(0))
            inst.config.write_text(good.replace("[https]\n", "[https]\nlisten_prot = 1\n", 1))
            daemon.proc.send_signal(signal.SIGHUP)
            [failed] = daemon.wait_event("config.reload_failed", timeout=15)
            assert "https.listen_prot" in failed["reason"]
            time.sleep(1.0)
            assert not any("RELOADING=1" in m for m in ns.since(mark))
            assert daemon.named("config.reloaded") == []  # the workers were not signalled
            assert answers_https(inst) == 404

            inst.config.write_text(good)
            daemon.proc.send_signal(signal.SIGHUP)
            reloading = ns.wait_for("RELOADING=1", after=mark, timeout=15)
            ns.wait_for("READY=1", after=reloading + 1, timeout=30)
            assert daemon.terminate() == 0
            assert len(daemon.named("config.reload_failed")) == 1
        finally:
            daemon.kill()


def test_abstract_notify_socket(tmp_path):
    """NOTIFY_SOCKET=@name: the Linux abstract namespace (as systemd uses for some services)."""
    inst = make_instance(tmp_path, 1)
    with NotifySocket.open(abstract=True) as ns:
        assert ns.address.startswith("@")
        daemon = Daemon(inst, {"NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": "2000000"})
        try:
            ready = ns.wait_for("READY=1", proc=daemon.proc)
            assert answers_https(inst) == 404
            ns.wait_for("WATCHDOG=1", after=ready, timeout=5)
            mark = len(ns.since(0))
            assert daemon.terminate() == 0
            ns.wait_for("STOPPING=1", after=mark, timeout=5)
            assert {m.pid for m in ns.since(0)} == {daemon.pid}
        finally:
            daemon.kill()


def test_watchdog_for_another_pid_is_not_fed(tmp_path):
    """WATCHDOG_PID names the process systemd watches: another process sends no WATCHDOG=1."""
    inst = make_instance(tmp_path, 1)
    with NotifySocket.open() as ns:
        daemon = Daemon(inst, {"NOTIFY_SOCKET": ns.address, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
        try:
            ready = ns.wait_for("READY=1", proc=daemon.proc)
            time.sleep(1.5)
            assert not any("WATCHDOG=1" in m for m in ns.since(ready))
            assert daemon.terminate() == 0
        finally:
            daemon.kill()
