"""gateway/app/serve.py: one gateway process run until a signal, in this process, with real signals.

Alone, ``serve_forever`` talks to systemd itself (a real notify socket here): READY=1 with the port once
the listener accepts, WATCHDOG=1 pings, SIGHUP gives RELOADING=1 then READY=1 around a reload, SIGTERM
gives STOPPING=1 and a clean stop with the signal handlers put back.  As a supervisor's worker it reports
on its status pipe instead (R ready, . alive, H reloaded), serves the socket it is handed and leaves
delivery to worker 0.  ``bind_probe`` names the key of a port that cannot be bound.  The daemon as a real
process is tested in tests/test_systemd.py and tests/app/test_supervisor.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import socket
from collections.abc import Iterator

import pytest

from gateway import logs
from gateway.app.serve import bind_probe, serve_forever
from gateway.app.supervisor import listen
from gateway.config import load as config_mod
from gateway.errors import ConfigError
from gateway.operations import instance
from tests.helpers import eventually, log_events
from tests.helpers.daemon import NotifySocket


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    logs.configure("info", stream)
    yield stream
    logs.configure("debug")


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


async def stopped(task: asyncio.Task[None]) -> None:
    """SIGTERM to this process (the running serve_forever handles it), and its clean return."""
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(task, 60)


# --- alone, under systemd ----------------------------------------------------------------------------------


async def test_alone_it_tells_systemd_and_stops_on_sigterm(tmp_path, monkeypatch, log_lines):
    inst = instance.init(tmp_path / "gw", port=0)
    with NotifySocket.open() as ns:
        monkeypatch.setenv("NOTIFY_SOCKET", ns.address)
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        task = asyncio.create_task(serve_forever(config_mod.load(inst.config)))
        try:
            ready = await asyncio.to_thread(ns.wait_for, "READY=1", 0, 60)
            status = ns.messages[ready].fields["STATUS"]
            assert status.startswith("serving on port "), status
            port = int(status.removeprefix("serving on port "))
            assert port and await asyncio.to_thread(accepts, port)  # READY=1 only once the listener accepts
            assert any(t.get_name() == "delivery" for t in asyncio.all_tasks())  # alone, it delivers
            await asyncio.to_thread(ns.wait_for, "WATCHDOG=1", ready, 5)

            mark = len(ns.since(0))
            os.kill(os.getpid(), signal.SIGHUP)
            reloading = await asyncio.to_thread(ns.wait_for, "RELOADING=1", mark, 30)
            assert ns.messages[reloading].fields.get("MONOTONIC_USEC", "").isdigit()
            await asyncio.to_thread(ns.wait_for, "READY=1", reloading + 1, 30)
            await eventually(lambda: log_events(log_lines, "config.reloaded"), "config.reloaded in the log")
            assert not task.done()

            mark = len(ns.since(0))
            await stopped(task)
            await asyncio.to_thread(ns.wait_for, "STOPPING=1", mark, 5)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    assert task.result() is None
    assert log_events(log_lines, "gateway.stopped")
    assert not await asyncio.to_thread(accepts, port)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a later signal no longer reaches the stopped gateway
        assert signal.getsignal(sig) == signal.SIG_DFL, sig


# --- as a supervisor's worker ------------------------------------------------------------------------------


async def test_a_worker_reports_on_its_pipe_serves_the_socket_it_is_handed_and_does_not_deliver(tmp_path, monkeypatch,
                                                                                                 log_lines):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    inst = instance.init(tmp_path / "gw", port=0)
    sock = listen("127.0.0.1", 0, 16)
    port = sock.getsockname()[1]
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    got = bytearray()

    def pipe() -> bytes:
        with contextlib.suppress(BlockingIOError):
            got.extend(os.read(read_fd, 1024))
        return bytes(got)

    task = asyncio.create_task(serve_forever(config_mod.load(inst.config), worker=1, sock=sock, status_fd=write_fd))
    try:
        await eventually(lambda: b"R" in pipe(), "R (ready) on the status pipe", 60)
        assert pipe().startswith(b"R")  # ready before anything else
        assert await asyncio.to_thread(accepts, port)
        assert not any(t.get_name() == "delivery" for t in asyncio.all_tasks())  # only worker 0 delivers
        await eventually(lambda: b"." in pipe(), ". (alive) on the status pipe")
        os.kill(os.getpid(), signal.SIGHUP)
        await eventually(lambda: b"H" in pipe(), "H (reloaded) on the status pipe", 30)
        await stopped(task)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        os.close(read_fd)
        os.close(write_fd)
    assert set(bytes(got)) <= set(b"RH.")
    assert log_events(log_lines, "config.reloaded") and log_events(log_lines, "gateway.stopped")


# --- bind_probe ----------------------------------------------------------------------------------------------


def test_bind_probe_names_the_key_of_a_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as caught:
            bind_probe("127.0.0.1", port)
        assert caught.value.message.startswith(f"https.listen_port: cannot listen on 127.0.0.1:{port} (")
        with pytest.raises(ConfigError) as caught:
            bind_probe("127.0.0.1", port, "smtp.listen_port")
        assert caught.value.message.startswith(f"smtp.listen_port: cannot listen on 127.0.0.1:{port} (")


def test_bind_probe_leaves_a_free_port_free():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    bind_probe("127.0.0.1", port)
    assert not accepts(port)  # nothing left listening
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # and it can be bound at once


def test_bind_probe_takes_an_ipv6_host():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        with socket.socket(socket.AF_INET6) as taken:
            taken.bind(("::1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(ConfigError, match=rf"^https.listen_port: cannot listen on ::1:{port} \("):
                bind_probe("::1", port)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here ({exc})")
