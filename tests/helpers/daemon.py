"""A real daemon in its own process (``python -m gateway serve``) and systemd's notification socket beside it."""

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
from typing import Any

import aiohttp
import pytest

from gateway.operations import instance
from gateway.tls import client_context
from tests.helpers import ENV, free_port, post

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


async def post_many(inst: instance.Instance, bodies: list[bytes]) -> list[tuple[int, Any]]:
    """All at once, each on its own connection, so the kernel spreads them over the workers."""
    ctx = client_context(inst.ca.cert, inst.demo_client.cert, inst.demo_client.key)
    async with aiohttp.ClientSession(inst.https_url, connector=aiohttp.TCPConnector(ssl=ctx, limit=len(bodies))) as s:

        replies = [tuple(a) for a in await asyncio.gather(*(post(s, b) for b in bodies))]
    await asyncio.sleep(0.1)  # let the TLS transports finish closing
    return replies
