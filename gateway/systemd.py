"""The sd_notify protocol (sd_notify(3)): one datagram per state change to $NOTIFY_SOCKET.

READY=1 once the listeners accept, RELOADING=1 … READY=1 around a reload, STOPPING=1 at shutdown,
WATCHDOG=1 at half the interval systemd asked for (WatchdogSec=).  Without $NOTIFY_SOCKET (not
started by systemd) every call does nothing.
"""

from __future__ import annotations

import os
import socket
import time

NOTIFY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")  # what worker processes must not inherit


def notify(*states: str) -> bool:
    """Send ``KEY=value`` lines; returns False when there is no notify socket or sending failed."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "/@":  # (vsock addresses are not used by this service)
        return False
    if address[0] == "@":  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError:
        return False
    return True


def reloading() -> bool:
    # systemd 253+ wants the time with RELOADING=1, so that it can tell this reload from a later one.
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def watchdog_interval_s() -> float | None:
    """Half the watchdog timeout systemd set for this process (None: no watchdog)."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def child_environment() -> dict[str, str]:
    """The environment for worker processes: only the main process talks to systemd."""
    return {k: v for k, v in os.environ.items() if k not in NOTIFY_ENV}
