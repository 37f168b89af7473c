"""The login back-off (``gateway/console/throttle.py``) on its own: counts in, waits out, no I/O and no
clock but the ``now`` it is given.  Over HTTP it is tested in tests/console/test_login.py."""

from __future__ import annotations

import pytest

from gateway.config.model import ConsoleConfig
from gateway.console.throttle import BASE_S, BROWSER, FORGET_S, Attempt, Backoff, Throttle, sources
from gateway.storage.records import SHARED_SOURCE, Failures

NOW = 1_800_000_000.0
THROTTLE = Throttle(Backoff(5, 900.0), Backoff(50, 900.0))


def attempt(own: int = 0, shared: int = 0, *, ago: float = 0.0, browser: bool = False) -> Attempt:
    keys = sources("192.0.2.7", "ab" * 32 if browser else None)
    counts = {}
    if own:
        counts[keys[0]] = Failures(own, NOW - ago)
    if shared:
        counts[SHARED_SOURCE] = Failures(shared, NOW - ago)
    return Attempt(keys, counts, NOW)


def test_sources_are_a_known_browser_alone_or_an_address_and_the_shared_count() -> None:
    assert sources("192.0.2.7", None) == ("192.0.2.7", SHARED_SOURCE)
    assert sources("192.0.2.7", "ab" * 32) == (BROWSER + "ab" * 32,)
    assert sources("", None) == ("unknown", SHARED_SOURCE)  # no peer address (a Unix socket): still one source


@pytest.mark.parametrize(("failures", "ago", "wait"), [
    (0, 0.0, 0.0), (4, 0.0, 0.0),  # free failures
    (5, 0.0, BASE_S), (5, 10.0, BASE_S - 10), (5, BASE_S, 0.0),  # the first wait, running down
    (6, 0.0, 2 * BASE_S), (8, 0.0, 8 * BASE_S),  # doubling
    (9, 0.0, 16 * BASE_S), (10, 0.0, 900.0), (400, 0.0, 900.0),  # up to the longest wait, however many failures
    (400, 899.0, 1.0), (400, 900.0, 0.0),  # a wait always ends
    (400, FORGET_S, 0.0),  # a count with no failure for a day is forgotten
])
def test_a_backoff_doubles_up_to_its_longest_wait_and_always_ends(failures: int, ago: float, wait: float) -> None:
    rule = Backoff(5, 900.0)
    assert rule.wait(Failures(failures, NOW - ago) if failures else None, NOW) == pytest.approx(wait)


def test_an_attempt_waits_for_the_longer_of_its_source_and_the_shared_count() -> None:
    assert THROTTLE.wait(attempt(4, 49)) == 0.0
    assert THROTTLE.wait(attempt(5, 0)) == BASE_S  # its own source
    assert THROTTLE.wait(attempt(0, 52)) == 4 * BASE_S  # the account's shared count, from an address it is new to
    assert THROTTLE.wait(attempt(6, 50)) == 2 * BASE_S


def test_a_known_browser_ignores_the_shared_count() -> None:
    a = attempt(0, 400, browser=True)
    assert a.sources == (BROWSER + "ab" * 32,) and THROTTLE.wait(a) == 0.0
    assert THROTTLE.wait(attempt(5, 400, browser=True)) == BASE_S  # its own failures still count


def test_an_address_adds_to_the_shared_count_only_its_free_failures() -> None:
    """One address alone can never set off the account's shared wait, which would slow everybody else."""
    assert THROTTLE.counted(attempt(0)) == ("192.0.2.7", SHARED_SOURCE)
    assert THROTTLE.counted(attempt(4)) == ("192.0.2.7", SHARED_SOURCE)
    assert THROTTLE.counted(attempt(5)) == ("192.0.2.7",)
    assert THROTTLE.counted(attempt(500)) == ("192.0.2.7",)
    assert THROTTLE.counted(attempt(500, ago=FORGET_S)) == ("192.0.2.7", SHARED_SOURCE)  # forgotten: a new start
    assert THROTTLE.counted(attempt(3, browser=True)) == (BROWSER + "ab" * 32,)
    # However long one address keeps failing, the shared count it makes stays below the account's rule.
    shared = own = 0
    for _ in range(1000):
        a = Attempt(("192.0.2.7", SHARED_SOURCE), {"192.0.2.7": Failures(own, NOW), SHARED_SOURCE: Failures(shared, NOW)}
                    if own else {}, NOW)
        counted = THROTTLE.counted(a)
        own, shared = own + 1, shared + (SHARED_SOURCE in counted)
    assert shared == THROTTLE.source.after < THROTTLE.account.after


def test_started_names_the_counts_whose_wait_begins() -> None:
    assert THROTTLE.started({"192.0.2.7": 4, SHARED_SOURCE: 49}) == []
    assert THROTTLE.started({"192.0.2.7": 5, SHARED_SOURCE: 5}) == ["192.0.2.7"]
    assert THROTTLE.started({"192.0.2.7": 2, SHARED_SOURCE: 50}) == [SHARED_SOURCE]
    assert THROTTLE.started({"192.0.2.7": 6}) == []  # already waiting: said once


def test_the_throttle_follows_the_console_settings() -> None:
    t = Throttle.of(ConsoleConfig(backoff_after=3, backoff_max_s=120.0, account_backoff_after=12))
    assert t == Throttle(Backoff(3, 120.0), Backoff(12, 120.0))
    assert Throttle.of(ConsoleConfig()) == THROTTLE
