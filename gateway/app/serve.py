"""Running one gateway process until a signal: systemd notifications, reload on SIGHUP, the supervisor's pipe."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket

from .. import memory, systemd
from ..config.model import Config
from ..errors import ConfigError
from .build import Parts
from .gateway import Gateway

HEARTBEAT_S = 2.0  # a worker tells the supervisor it is alive this often (the watchdog depends on it)


async def serve_forever(config: Config, parts: Parts | None = None, *, worker: int | None = None,
                        sock: socket.socket | None = None, status_fd: int | None = None,
                        smtp_sock: socket.socket | None = None) -> None:
    """Run one gateway process; as worker N of several (``worker`` set), serve the supervisor's
    listening socket, let only worker 0 deliver, and report to the supervisor on ``status_fd``
    (R: ready, H: reloaded, .: alive).  Alone, it talks to systemd itself (gateway/systemd.py)."""
    memory.map_large_blocks_separately()  # what a large body took goes back when it is freed
    gw = Gateway(config, parts, sock=sock, run_delivery=not worker, smtp_sock=smtp_sock)
    await gw.start()
    loop = asyncio.get_running_loop()

    def report(code: bytes) -> None:
        if status_fd is not None:
            with contextlib.suppress(OSError):
                os.write(status_fd, code)

    async def reload() -> None:
        if status_fd is None:
            systemd.reloading()
        await gw.reload()
        report(b"H")
        if status_fd is None:
            systemd.notify("READY=1", f"STATUS=serving on port {gw.port}")

    async def heartbeat() -> None:
        interval = systemd.watchdog_interval_s() if status_fd is None else HEARTBEAT_S
        while interval:
            report(b".")
            if status_fd is None:
                systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    stop = asyncio.Event()
    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        task = asyncio.create_task(reload(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    beat = asyncio.create_task(heartbeat(), name="heartbeat")
    report(b"R")
    systemd.notify("READY=1", f"STATUS=serving on port {gw.port}")
    try:
        await stop.wait()
    finally:
        systemd.notify("STOPPING=1")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        beat.cancel()
        for task in (beat, *reloads):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await gw.stop()


def bind_probe(host: str, port: int, key: str = "https.listen_port") -> None:
    """Fail early, naming the key, when the port cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{key}: cannot listen on {host}:{port} ({exc.strerror})") from None
