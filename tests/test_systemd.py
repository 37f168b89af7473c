"""The sd_notify protocol seen from systemd's side: a real AF_UNIX datagram socket receives what the
real daemon (``python -m gateway serve``, alone or with worker processes) sends.

READY=1 only once the HTTPS listener answers; WATCHDOG=1 at half of WATCHDOG_USEC; SIGHUP gives
RELOADING=1 (with MONOTONIC_USEC) then READY=1; SIGTERM gives STOPPING=1 and exit 0.  Every message
comes from the main process (systemd's default NotifyAccess=main ignores the others).

``Daemon`` and ``NotifySocket`` are in tests/helpers/daemon.py (tests/app/test_gateway.py and
tests/operations/test_admin.py use them too).
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.helpers.daemon import (
    Daemon,
    NotifySocket,
    answers_https,
    children,
    make_instance,
)

# --- the systemd side -------------------------------------------------------------------------------


# --- the daemon ---------------------------------------------------------------------------------------


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# --- the tests ------------------------------------------------------------------------------------------


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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
