"""The token bucket per key (gateway/ratelimit.py)."""

from gateway.ratelimit import RateLimiter


def test_rate_limiter_burst_then_refusal_then_refill():
    rl = RateLimiter(burst=3, every_s=10.0)
    assert [rl.allow("10.0.0.1", now=100.0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow("10.0.0.2", now=100.0)  # another address has its own bucket
    assert not rl.allow("10.0.0.1", now=105.0)  # half a token is not an attempt
    assert rl.allow("10.0.0.1", now=110.0)  # one refilled
    assert not rl.allow("10.0.0.1", now=110.0)
    # a long pause refills up to the burst, not beyond
    assert [rl.allow("10.0.0.1", now=10_000.0) for _ in range(4)] == [True, True, True, False]


def test_rate_limiter_forgets_idle_addresses():
    rl = RateLimiter(burst=2, every_s=1.0)
    rl.MAX_KEYS = 100  # type: ignore[misc]
    for i in range(100):
        assert rl.allow(f"a{i}", now=0.0)
    for i in range(50):  # much later: the idle buckets (full again) are dropped, not kept forever
        assert rl.allow(f"b{i}", now=1000.0)
    assert len(rl._buckets) <= rl.MAX_KEYS


def test_rate_limiter_stays_bounded_under_a_flood_of_addresses():
    rl = RateLimiter(burst=10, every_s=6.0)
    rl.MAX_KEYS = 100  # type: ignore[misc]
    for i in range(1000):
        rl.allow(f"2001:db8::{i:x}", now=float(i) / 1000)
    assert len(rl._buckets) <= rl.MAX_KEYS
