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

import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from . import logs
from .config import Config
from .store import SqliteStore

RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0
STOP_GRACE_S = 45.0  # a worker gets this long after SIGTERM (its own request grace is 30 s)

log = logs.get("supervisor")


def worker_count(configured: int) -> int:
    return configured if configured > 0 else max(1, os.cpu_count() or 1)


def listen(host: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=backlog)
    sock.set_inheritable(True)
    return sock


def _spawn(config: Config, index: int, sock: socket.socket) -> subprocess.Popen[Any]:
    fd = sock.fileno()
    argv = [sys.executable, "-m", "gateway", "serve", "-c", str(config.source), "--worker", str(index), "--listen-fd", str(fd)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, pass_fds=(fd,))


def supervise(config: Config, workers: int, backlog: int) -> int:
    # Create (or migrate) the database once, before several processes open it at the same moment:
    # switching a new database to WAL needs it to itself.
    SqliteStore(config.state_dir).close()
    sock = listen(config.https.host, config.https.port, backlog)
    port = sock.getsockname()[1]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    procs = {i: _spawn(config, i, sock) for i in range(workers)}
    log.info("supervisor.started", workers=workers, port=port, pid=os.getpid())
    restarts: list[float] = []
    code = 0
    try:
        while not stopping:
            time.sleep(0.2)
            for i, proc in list(procs.items()):
                if proc.poll() is None or stopping:
                    continue
                now = time.monotonic()
                restarts = [t for t in restarts if now - t < RESTART_WINDOW_S] + [now]
                log.error("supervisor.worker_died", worker=i, exit_code=proc.returncode, restarts=len(restarts))
                if len(restarts) > RESTART_LIMIT:
                    log.error("supervisor.giving_up", reason="workers keep dying")
                    stopping, code = True, 1
                    break
                procs[i] = _spawn(config, i, sock)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = 1
            if proc.returncode not in (0, -signal.SIGTERM):
                code = code or 1
        sock.close()
        log.info("supervisor.stopped", exit_code=code)
    return code


