"""How long a login must wait after failed ones: a back-off by source and account, never a lock.

An attempt on an account (a password, a second factor, a re-authentication) is judged by counts of
its failed attempts, which storage keeps (``AccountStore.failures``) and this module reads without
any I/O of its own:

- its *source*'s count: the browser's, when it carries the cookie of a login it completed as this
  account in the last ``KNOWN_BROWSER_S`` (a known browser), else its address's;
- from an address, also the account's *shared* count (``SHARED_SOURCE``) over every source it has not
  logged in from.  An address adds to it only its first ``after`` failures: one address alone never
  slows the account for anybody else, and many addresses at once slow each other, never a known
  browser (OWASP's "device cookie" scheme).

Below ``after`` failures a count asks no wait; from then on the next attempt waits ``BASE_S`` after
the latest failure, doubling with every further one up to ``max_s``.  An attempt made while it must
wait is refused without being counted (at the password step: answered exactly as a wrong password),
so every wait ends on its own.  A count with no failure for ``FORGET_S`` is forgotten, and a completed
login clears its own source's count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..config.model import ConsoleConfig
from ..storage.records import SHARED_SOURCE, Failures

BASE_S = 30.0  # the first wait once the free failures are spent; it doubles with every further failure
FORGET_S = 86_400.0  # a count with no failure for a day starts again from zero (longer than any wait)
KNOWN_BROWSER_S = 30 * 86_400.0  # a browser stays known this long after its latest completed login
BROWSER = "browser:"  # a known browser's source: this and its token's SHA-256


@dataclass(frozen=True, slots=True)
class Backoff:
    """One count's rule."""

    after: int  # failures that ask no wait
    max_s: float  # the longest wait

    def count(self, failures: Failures | None, now: float) -> int:
        """The failures still counted (none once forgotten)."""
        if failures is None or now - failures.last_at >= FORGET_S:
            return 0
        return failures.count

    def wait(self, failures: Failures | None, now: float) -> float:
        """Seconds before the next attempt may be judged (0: now)."""
        beyond = self.count(failures, now) - self.after
        if failures is None or beyond < 0:
            return 0.0
        return max(0.0, failures.last_at + min(self.max_s, BASE_S * 2.0 ** min(beyond, 32)) - now)


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt on an account is judged by."""

    sources: tuple[str, ...]  # its own source first, then SHARED_SOURCE when that is an address
    counts: Mapping[str, Failures]  # the account's counts from those sources
    now: float


def sources(address: str, browser: str | None) -> tuple[str, ...]:
    """The counts an attempt is judged by: a known browser's (its token's SHA-256) alone, or its
    address's and the account's shared one."""
    if browser is not None:
        return (BROWSER + browser,)
    return (address or "unknown", SHARED_SOURCE)


@dataclass(frozen=True, slots=True)
class Throttle:
    source: Backoff  # for each source's count
    account: Backoff  # for the account's shared count

    @classmethod
    def of(cls, cfg: ConsoleConfig) -> Throttle:
        return cls(Backoff(cfg.backoff_after, cfg.backoff_max_s), Backoff(cfg.account_backoff_after, cfg.backoff_max_s))

    def wait(self, attempt: Attempt) -> float:
        """Seconds before this attempt may be judged (0: judge it now)."""
        own = self.source.wait(attempt.counts.get(attempt.sources[0]), attempt.now)
        if SHARED_SOURCE not in attempt.sources:
            return own
        return max(own, self.account.wait(attempt.counts.get(SHARED_SOURCE), attempt.now))

    def counted(self, attempt: Attempt) -> tuple[str, ...]:
        """The counts a failure of this attempt adds to: its source's, and the shared one only while
        that source had free failures left."""
        own = attempt.sources[0]
        if SHARED_SOURCE in attempt.sources and self.source.count(attempt.counts.get(own), attempt.now) < self.source.after:
            return attempt.sources
        return (own,)

    def started(self, counts: Mapping[str, int]) -> list[str]:
        """Of the counts a failure just raised to ``counts``, those whose waits begin with it."""
        return [s for s, n in counts.items() if n == (self.account if s == SHARED_SOURCE else self.source).after]
