"""A token bucket per key (an address): how often something may happen, bounded in memory."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per key (an address): ``burst`` attempts at once, then one every ``every_s``.
    In memory: the console runs in one process (the one that also delivers)."""

    MAX_KEYS = 10_000  # a flood from many addresses cannot grow this without bound

    def __init__(self, burst: int, every_s: float):
        self.burst, self.every_s = burst, every_s
        self._buckets: dict[str, Bucket] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        b = self._buckets.get(key)
        if b is None:
            if len(self._buckets) >= self.MAX_KEYS - 1:  # one place is kept for the overflow bucket
                self._buckets = {k: v for k, v in self._buckets.items() if now - v.at < self.burst * self.every_s}
            if len(self._buckets) >= self.MAX_KEYS - 1:  # every bucket is busy: new keys share one (fails closed)
                key = "\x00overflow"
                b = self._buckets.get(key)
            if b is None:
                b = self._buckets[key] = Bucket(float(self.burst), now)
        b.tokens = min(float(self.burst), b.tokens + (now - b.at) / self.every_s)
        b.at = now
        if b.tokens < 1:
            return False
        b.tokens -= 1
        return True
