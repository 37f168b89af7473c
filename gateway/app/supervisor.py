"""`serve` with several worker processes sharing one listening socket.

Each worker is a whole gateway process (its own event loop, stage threads and GIL), so CPU-bound
stages — signature checks, later the business rules — use every core without contending for one
interpreter lock.  Worker 0 also runs delivery.  All workers share the one SQLite store (WAL; its
write lock serialises their group commits) and each watches the partners file.

The supervisor opens the listening socket and hands it to every worker (so port 0 resolves once,
and the port stays open while a worker restarts).  All workers accept from the one queue, so a
busy worker simply accepts fewer connections; with SO_REUSEPORT the kernel would hash a handful
of keep-alive connections onto the workers unevenly (measured: one worker saturated in about half
of the benchmark runs).  The supervisor forwards SIGTERM/SIGINT and restarts a worker that dies,
at most RESTART_LIMIT times per RESTART_WINDOW_S; past that it stops everything and exits 1 so
that systemd can act.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from .. import logs, systemd
from ..config.load import load as load_config
from ..config.model import Config
from ..errors import ConfigError
from ..metrics import MULTIPROC_ENV, prepare_directory
from ..storage.factory import open_store

RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 45.0  # a worker gets this long after SIGTERM (its own request grace is 30 s)
POLL_S = 0.2
RELOAD_WAIT_S = 120.0  # a reload that recompiles rule packs takes a while; READY=1 follows at the latest then
HEARTBEAT_STALE_S = 20.0  # a worker silent this long (it reports every 2 s) holds back the watchdog

log = logs.get("supervisor")


def worker_count(configured: int) -> int:
    return configured if configured > 0 else max(1, os.cpu_count() or 1)


def listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    sock.set_inheritable(True)
    return sock


class Worker:
    """A worker process and the pipe on which it reports: R ready, H reloaded, . alive."""

    def __init__(self, config: Config, index: int, sock: socket.socket, env: dict[str, str],
                 smtp_sock: socket.socket | None = None):
        self.index = index
        self.status, write = os.pipe()
        os.set_blocking(self.status, False)
        fd = sock.fileno()
        argv = [sys.executable, "-m", "gateway", "serve", "-c", str(config.source), "--worker", str(index),
                "--listen-fd", str(fd), "--status-fd", str(write)]
        fds = [fd, write]
        if smtp_sock is not None:
            argv += ["--smtp-fd", str(smtp_sock.fileno())]
            fds.append(smtp_sock.fileno())
        self.proc: subprocess.Popen[Any] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=fds, env=env)
        os.close(write)
        self.ready = False
        self.reloaded = False
        self.seen = time.monotonic()

    def read(self) -> None:
        try:
            data = os.read(self.status, 4096)
        except BlockingIOError:
            return
        if data:
            self.seen = time.monotonic()
            self.ready = self.ready or b"R" in data
            self.reloaded = self.reloaded or b"H" in data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.status)


def supervise(config: Config, workers: int, backlog: int) -> int:
    # Create (or migrate) the database once, before several processes open it at the same moment:
    # switching a new database to WAL needs it to itself.
    asyncio.run(open_store(config).close())
    sock = listen(config.https.host, config.https.port, backlog)
    port = sock.getsockname()[1]
    smtp_sock = listen(config.smtp.host, config.smtp.port, backlog) if config.smtp is not None else None
    env = systemd.child_environment() | {MULTIPROC_ENV: str(prepare_directory(config.state_dir))}
    signals: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        signals.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    procs = {i: Worker(config, i, sock, env, smtp_sock) for i in range(workers)}
    log.info("supervisor.started", workers=workers, port=port, pid=os.getpid(),
             smtp_port=smtp_sock.getsockname()[1] if smtp_sock is not None else None)
    restarts: list[float] = []
    code = 0
    stopping = ready = False
    reloading: float | None = None  # since when a reload waits for every worker to report
    reload_again = False  # a SIGHUP came during a reload: the file may have changed since, so reload once more
    watchdog = systemd.watchdog_interval_s()
    last_ping = 0.0
    try:
        while not stopping:
            readable, _, _ = select.select([w.status for w in procs.values()], [], [], POLL_S)
            for w in procs.values():
                if w.status in readable:
                    w.read()
            while signals:
                signum = signals.pop(0)
                if signum == signal.SIGHUP and reloading is not None:
                    reload_again = True
                elif signum == signal.SIGHUP:
                    reloading = _reload(config, procs)
                else:
                    stopping = True
            now = time.monotonic()
            if not ready and all(w.ready for w in procs.values()):
                ready = True
                systemd.notify("READY=1", f"STATUS=serving on port {port} with {workers} workers")
                log.info("supervisor.ready", workers=workers)
            if reloading is not None and (all(w.reloaded for w in procs.values()) or now - reloading > RELOAD_WAIT_S):
                reloading = None
                systemd.notify("READY=1", f"STATUS=serving on port {port} with {workers} workers")
                if reload_again:
                    reload_again, reloading = False, _reload(config, procs)
            # The watchdog is fed only while every worker has reported recently: a hung worker
            # (stuck event loop) then makes systemd restart the service.
            if watchdog and now - last_ping >= watchdog and all(now - w.seen < HEARTBEAT_STALE_S for w in procs.values()):
                systemd.notify("WATCHDOG=1")
                last_ping = now
            for i, w in list(procs.items()):
                if w.proc.poll() is None or stopping:
                    continue
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                log.error("supervisor.worker_died", worker=i, exit_code=w.proc.returncode, restarts=len(restarts))
                w.close()
                if len(restarts) > RESTART_LIMIT:
                    log.error("supervisor.giving_up", reason="workers keep dying")
                    stopping, code = True, 1
                    break
                procs[i] = Worker(config, i, sock, env, smtp_sock)
    finally:
        systemd.notify("STOPPING=1")
        for w in procs.values():
            if w.proc.poll() is None:
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for w in procs.values():
            try:
                w.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
                code = 1
            if w.proc.returncode not in (0, -signal.SIGTERM):
                code = code or 1
            w.close()
        sock.close()
        if smtp_sock is not None:
            smtp_sock.close()
        log.info("supervisor.stopped", exit_code=code)
    return code


def _reload(config: Config, procs: dict[int, Worker]) -> float | None:
    """Check the new configuration here first: an invalid one is refused once, in one log line,
    and the workers never see the signal."""
    try:
        new = load_config(config.source)
    except ConfigError as exc:
        log.error("config.reload_failed", reason=exc.message, kept="the running configuration")
        return None
    if (new.https.host, new.https.port, new.https.workers) != (config.https.host, config.https.port, config.https.workers):
        log.warning("config.restart_needed", settings=["https.listen_host/listen_port", "https.workers"],
                    reason="the supervisor's socket and worker count change at the next restart")
    systemd.reloading()
    for w in procs.values():
        w.reloaded = False
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGHUP)
    return time.monotonic()
