"""gateway/clock.py: time for what runs on a schedule, behind a small protocol a test can replace.

``SystemClock`` reads the real wall clock and the real monotonic clock and sleeps on the event loop;
``now(clock)`` is the clock's wall time as an aware UTC datetime, so that everything that stores or
compares times follows the clock it was given (a FakeClock in tests), not the machine's.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from gateway.clock import Clock, SystemClock, now
from gateway.model import stamp
from tests.helpers import FakeClock


def test_system_clock_reads_the_real_wall_clock() -> None:
    before = time.time()
    read = SystemClock().time()
    after = time.time()
    assert before <= read <= after


def test_system_clock_monotonic_is_the_process_monotonic_clock_and_never_goes_back() -> None:
    clock = SystemClock()
    before = time.monotonic()
    readings = [clock.monotonic() for _ in range(100)]
    after = time.monotonic()
    assert readings == sorted(readings)
    assert before <= readings[0] and readings[-1] <= after


async def test_system_clock_sleep_yields_to_the_event_loop() -> None:
    """A schedule that sleeps lets the rest of the gateway run meanwhile (no blocking time.sleep)."""
    ran = asyncio.Event()

    async def other() -> None:
        ran.set()

    task = asyncio.create_task(other())
    await SystemClock().sleep(0)
    assert ran.is_set()
    await task


async def test_system_clock_sleep_waits_on_the_loop(monkeypatch) -> None:
    """The sleep is the event loop's: a test that patches asyncio.sleep sees the seconds asked for."""
    asked: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        asked.append(seconds)

    with monkeypatch.context() as m:
        m.setattr(asyncio, "sleep", fake_sleep)
        await SystemClock().sleep(86400.0)
    assert asked == [86400.0]


def test_now_is_the_given_clocks_time_in_utc() -> None:
    clock: Clock = FakeClock(start=1_790_000_000.25)
    at = now(clock)
    assert at.tzinfo is UTC
    assert at == datetime(2026, 9, 21, 14, 13, 20, 250000, tzinfo=UTC)
    assert at.timestamp() == clock.time()


async def test_now_follows_a_clock_moved_by_hand() -> None:
    """Not the machine's time: a FakeClock a test advances by a day moves ``now`` by exactly a day."""
    clock = FakeClock(start=0.0)
    assert now(clock) == datetime(1970, 1, 1, tzinfo=UTC)
    await clock.advance(86400.5)
    assert now(clock) - datetime(1970, 1, 1, tzinfo=UTC) == timedelta(days=1, milliseconds=500)


def test_now_of_the_system_clock_is_current() -> None:
    before = datetime.now(UTC)
    at = now(SystemClock())
    after = datetime.now(UTC)
    assert at.tzinfo is UTC and before <= at <= after


def test_now_stamps_as_the_clocks_epoch_seconds_do() -> None:
    """What is stored from ``now(clock)`` and from ``clock.time()`` is the same text."""
    clock = FakeClock(start=1_790_000_000.5)
    assert stamp(now(clock)) == stamp(clock.time()) == "2026-09-21T14:13:20.500000Z"
