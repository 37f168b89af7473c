"""Time, for what runs on a schedule (housekeeping, retention, reloads): injectable, so tests can move it.

``SystemClock`` is the real one.  A test passes a clock it advances by hand, and a schedule of days
runs in milliseconds without a real sleep.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock time, epoch seconds (what is stored and compared with stored times)."""

    def monotonic(self) -> float:
        """Seconds that only ever grow (what schedules are measured in)."""

    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def now(clock: Clock) -> datetime:
    return datetime.fromtimestamp(clock.time(), UTC)
