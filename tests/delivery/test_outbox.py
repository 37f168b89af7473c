"""The outbox (gateway/delivery/outbox.py) over HTTPS: a real TLS listener on 127.0.0.1 plays the ERP; a
real store and vault; a fake wall clock (schedules) and a fake monotonic clock (breakers), so no test
sleeps for a backoff.

``Erp`` (tests/helpers/erp.py) records every request and answers from a script; ``Env``
(tests/helpers/outbox.py) accepts invoices straight into the store and builds outboxes whose senders
POST to the listeners; the fixtures ``pki``, ``start_erp`` and ``env`` are in tests/delivery/conftest.py.
What the HTTPS sender puts in the request, and how it classifies the ERP's replies, is
tests/delivery/test_webhook.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway import logs
from gateway.config.model import DeliveryConfig
from gateway.delivery.outbox import Breaker, Outbox
from gateway.errors import StorageUnavailable
from gateway.storage.base import NotHeld
from gateway.storage.records import DeliveryJob
from tests.helpers import eventually
from tests.helpers.erp import HANG
from tests.helpers.outbox import CFG, Env, StartErp


@pytest.fixture
def log_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    stream = io.StringIO()
    logs.configure("debug", stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    logs.configure("debug")


async def drain(box: Outbox) -> int:
    """run_once until nothing more starts."""
    total = 0
    while started := await box.run_once():
        total += started
    return total


# --- an error no sender should raise --------------------------------------------------------------------


async def test_a_sender_error_outside_the_known_ones_is_still_recorded(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    token = env.folder / "erp.token"
    token.write_text("first-line\nsecond-line\n")  # config.load accepts it (mode 0600); strip() keeps the inner newline
    token.chmod(0o600)
    box = env.outbox(env.https(erp.url, bearer_token_file=token))
    mid = await env.accept()
    env.due(mid)
    assert await box.run_once() == 1
    assert erp.seen == []
    job = env.job(mid)
    assert (job["attempts"], job["lease_owner"]) == (1, None) and job["last_error"]


# --- an outcome the store could not take (issue 20, item 13) -----------------------------------------------


class FailingRecords:
    """The outbox's store, whose next ``failures`` writes of an outcome fail as a full or busy store's do."""

    def __init__(self, store: Any, failures: int):
        self.store, self.failures = store, failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def record(self, *args: Any, **kwargs: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise StorageUnavailable("the invoice could not be stored durably; retry later")
        await self.store.record(*args, **kwargs)


async def test_an_outcome_whose_write_failed_is_written_again_at_once(env: Env, start_erp: StartErp,
                                                                      log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    erp = await start_erp()
    box = env.outbox(env.https(erp.url))
    box.store, box.record_retry_s = FailingRecords(box.store, 2), (0.0, 0.0, 0.0, 0.0)
    mid = await env.accept()
    env.due(mid)
    assert await box.run_once() == 1
    job = env.job(mid)
    assert (job["state"], job["attempts"], job["lease_owner"]) == ("delivered", 1, None)
    assert len(erp.seen) == 1
    assert [e["event"] for e in log_lines() if e["event"].startswith("delivery.record")] == ["delivery.record_retry"] * 2


async def test_an_outcome_that_cannot_be_written_is_logged_and_left_to_the_lease(
        env: Env, start_erp: StartErp, log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    erp = await start_erp()
    box = env.outbox(env.https(erp.url))
    box.store, box.record_retry_s = FailingRecords(box.store, 99), (0.0, 0.0)
    mid = await env.accept()
    env.due(mid)
    assert await box.run_once() == 1  # nothing escapes the attempt
    assert env.job(mid)["lease_owner"] == "n1"  # offered again when the lease lapses
    [failed] = [e for e in log_lines() if e["event"] == "delivery.record_failed"]
    assert (failed["tries"], failed["outcome"], failed["message_id"], failed["level"]) == (3, "delivered", mid, "error")


# --- retries: backoff and Retry-After ------------------------------------------------------------------


async def test_backoff_grows_and_stays_under_the_cap(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.default = (503, "", {})
    cfg = DeliveryConfig(horizon_s=10**7, retry_base_s=5.0, retry_cap_s=60.0, breaker_failures=100)
    box = env.outbox(env.https(erp.url), cfg=cfg)
    mid = await env.accept()
    env.due(mid)
    for attempts in range(8):
        now = env.clock.now
        assert await box.run_once() == 1
        delay = env.job(mid)["next_attempt_at"] - now
        ceiling = min(60.0, 5.0 * 2**attempts)
        assert ceiling / 2 <= delay <= ceiling, (attempts, delay)
        env.clock.now = env.job(mid)["next_attempt_at"]
    assert env.job(mid)["attempts"] == 8


async def test_retry_after_lengthens_the_delay(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.script = [(503, "maintenance", {"Retry-After": "120"})]
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    env.due(mid)
    now = env.clock.now
    await box.run_once()
    job = env.job(mid)
    assert job["state"] == "pending"
    assert job["next_attempt_at"] - now == pytest.approx(120.0)  # the backoff alone would be <= 5 s
    env.clock.now = now + 119
    assert await box.run_once() == 0


async def test_retry_after_is_capped(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.script = [(503, "", {"Retry-After": "120"})]
    box = env.outbox(env.https(erp.url), cfg=DeliveryConfig(horizon_s=3600.0, retry_base_s=5.0, retry_cap_s=60.0))
    mid = await env.accept()
    env.due(mid)
    now = env.clock.now
    await box.run_once()
    assert env.job(mid)["next_attempt_at"] - now == pytest.approx(60.0)


# --- the horizon ---------------------------------------------------------------------------------------


async def test_before_the_horizon_a_failure_is_retried(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.default = (503, "", {})
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    env.due(mid, CFG.horizon_s - 1)
    await box.run_once()
    assert env.job(mid)["state"] == "pending"


async def test_past_the_horizon_a_transient_failure_dead_letters(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.default = (503, "down", {})
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    env.due(mid, CFG.horizon_s + 1)
    assert await box.run_once() == 1
    job = env.job(mid)
    assert (job["state"], job["attempts"], job["last_error"]) == ("dead", 1, "HTTP 503: down")
    assert len(await env.audit("delivery.dead_letter", mid)) == 1
    erp.default = (200, "", {})
    env.clock.now += 100 * CFG.horizon_s
    assert await box.run_once() == 0  # parked for an operator; never attempted again
    assert len(erp.seen) == 1 and env.job(mid)["state"] == "dead"


# --- concurrency and the breaker -----------------------------------------------------------------------


async def test_at_most_concurrency_requests_per_destination(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.gate = asyncio.Event()
    box = env.outbox(env.https(erp.url, concurrency=3))
    mids = [await env.accept() for _ in range(10)]
    env.due(mids[-1])
    task = asyncio.create_task(box.run_once())
    await erp.until(lambda: erp.active == 3)
    assert box.in_flight == {"erp": 3}
    assert env.sql("SELECT count(*) FROM deliveries WHERE lease_owner = 'n1'")[0] == 3
    erp.gate.set()
    assert await asyncio.wait_for(task, 20) == 10
    assert erp.peak == 3
    assert sorted(erp.keys) == sorted(mids)
    assert all(env.job(m)["state"] == "delivered" for m in mids)


async def test_an_open_breaker_stops_one_destination_only(env: Env, start_erp: StartErp) -> None:
    dead_erp, good_erp = await start_erp(path="/a"), await start_erp(path="/b")
    dead_erp.default = (503, "down", {})
    cfg = DeliveryConfig(horizon_s=72 * 3600.0, breaker_failures=3, breaker_cooldown_s=30.0)
    box = env.outbox(env.https(dead_erp.url, "a", concurrency=1), env.https(good_erp.url, "b"), cfg=cfg)
    to_a = [await env.accept(("a",)) for _ in range(5)]
    to_b = [await env.accept(("b",)) for _ in range(3)]
    env.due(to_b[-1])
    assert await drain(box) == 6  # three to A (then its breaker opened), three to B
    assert len(dead_erp.seen) == 3
    assert all(env.job(m, "b")["state"] == "delivered" for m in to_b)
    assert sorted(env.job(m, "a")["attempts"] for m in to_a) == [0, 0, 1, 1, 1]
    opened = env.mono.now

    env.clock.now += 10_000  # every job of A is due again; the breaker is not
    env.mono.now = opened + 29.9
    assert await drain(box) == 0
    assert len(dead_erp.seen) == 3

    env.mono.now = opened + 30  # half-open: one probe
    assert await drain(box) == 1
    assert len(dead_erp.seen) == 4
    reopened = env.mono.now
    env.mono.now = reopened + 59.9  # the probe failed: the pause doubled
    assert await drain(box) == 0
    assert len(dead_erp.seen) == 4

    dead_erp.default = (200, "", {})
    env.clock.now += 10_000  # the failed probe's job is due again too
    env.mono.now = reopened + 60
    assert await drain(box) == 5  # the probe succeeds, the breaker closes, the rest follows
    assert all(env.job(m, "a")["state"] == "delivered" for m in to_a)
    assert box.breakers["a"].failures == 0
    assert len(dead_erp.seen) == 9


async def test_the_first_pause_is_the_cooldown_even_with_concurrent_failures(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.default = (503, "", {})
    cfg = DeliveryConfig(horizon_s=72 * 3600.0, breaker_failures=2, breaker_cooldown_s=30.0)
    box = env.outbox(env.https(erp.url, concurrency=4), cfg=cfg)
    mids = [await env.accept() for _ in range(4)]
    env.due(mids[-1])
    assert await box.run_once() == 4  # all four were in flight together, all four failed
    opened = env.mono.now
    env.clock.now += 10_000
    env.mono.now = opened + cfg.breaker_cooldown_s  # "breaker_cooldown_s: first pause of an open breaker"
    assert await box.run_once() == 1

async def test_run_once_attempts_what_an_attempt_finishing_meanwhile_frees(
        env: Env, start_erp: StartErp, monkeypatch: pytest.MonkeyPatch) -> None:
    erp_a, erp_b = await start_erp(path="/a"), await start_erp(path="/b")
    erp_a.gate = asyncio.Event()
    box = env.outbox(env.https(erp_a.url, "a", concurrency=1), env.https(erp_b.url, "b"))
    first, second = await env.accept(("a",)), await env.accept(("a",))
    env.due(await env.accept(("b",)))
    real_claim = env.store.outbox.claim
    calls: list[dict[str, int]] = []

    async def slow_claim(owner: str, now: float, wanted: dict[str, int], lease_s: float) -> list[DeliveryJob]:
        calls.append(dict(wanted))
        if len(calls) != 2:
            return await real_claim(owner, now, wanted, lease_s)
        # B's attempt is done and A's is in flight: A's finishes while this claim is under way.
        assert erp_a.gate is not None
        erp_a.gate.set()
        await eventually(lambda: not box.in_flight["a"], "A's attempt to finish", 10)
        return await real_claim(owner, now, wanted, lease_s)

    monkeypatch.setattr(env.store.outbox, "claim", slow_claim)
    await box.run_once()
    assert "a" not in calls[1]  # the scenario happened as described
    assert env.job(first, "a")["state"] == "delivered"
    assert env.job(second, "a")["attempts"] == 1  # "attempt everything due now"


def test_breaker_opens_doubles_caps_and_closes() -> None:
    b = Breaker(threshold=2, cooldown=10.0, cap=35.0)
    assert b.slots(0.0, 4) == 4
    assert b.failure(0.0) is False and b.slots(0.0, 4) == 4
    assert b.failure(0.0) is True
    assert (b.pause, b.open_until) == (10.0, 10.0)
    assert b.slots(9.99, 4) == 0
    assert b.slots(10.0, 4) == 1  # half-open: a single probe, whatever the concurrency
    assert b.failure(10.0) is True and (b.pause, b.open_until) == (20.0, 30.0)
    assert b.failure(30.0) is True and (b.pause, b.open_until) == (35.0, 65.0)  # capped
    assert b.failure(65.0) is True and b.pause == 35.0
    assert b.success() is True
    assert (b.failures, b.pause) == (0, 0.0) and b.slots(65.0, 4) == 4
    assert b.success() is False
    assert b.failure(70.0) is False  # counting starts again
    assert b.failure(70.0) is True and b.pause == 10.0  # and the pause from the cooldown


# --- leases ---------------------------------------------------------------------------------------------


async def test_leases_keep_a_job_with_one_node_until_they_lapse(env: Env) -> None:
    mid = await env.accept()
    t0 = env.job(mid)["created_at"] + 1
    [job] = await env.jobs("n1", t0, {"erp": 5})
    assert job.message_id == mid and job.attempts == 0 and job.partner == "acme"
    assert (env.job(mid)["lease_owner"], env.job(mid)["lease_until"]) == ("n1", t0 + 300)
    assert await env.store.outbox.due(t0 + 10, 10) == []
    assert await env.jobs("n2", t0 + 10, {"erp": 5}) == []
    assert await env.jobs("n1", t0 + 10, {"erp": 5}) == []  # not twice to the same node either
    [again] = await env.jobs("n2", t0 + 301, {"erp": 5})
    assert again.message_id == mid and env.job(mid)["lease_owner"] == "n2"

    # n1 comes back with a failure: it no longer holds the job, so it must not push it back.
    await env.store.outbox.record(job, delivered_at=None, next_attempt_at=t0 + 5000, error="HTTP 503", owner="n1")
    row = env.job(mid)
    assert (row["state"], row["attempts"], row["lease_owner"], row["last_error"]) == ("pending", 0, "n2", None)
    assert row["next_attempt_at"] < t0 + 5000

    # A success counts, whoever reports it.
    await env.store.outbox.record(job, delivered_at="2026-11-20T00:00:01.000000Z", next_attempt_at=None, error=None,
                                  owner="n1")
    row = env.job(mid)
    assert (row["state"], row["attempts"], row["lease_owner"]) == ("delivered", 1, None)
    # n2's late failure cannot undo it.
    await env.store.outbox.record(again, delivered_at=None, next_attempt_at=t0 + 5000, error="late", owner="n2")
    assert env.job(mid)["state"] == "delivered" and env.job(mid)["last_error"] is None


async def test_the_holder_records_its_failure(env: Env) -> None:
    mid = await env.accept()
    t0 = env.job(mid)["created_at"] + 1
    [job] = await env.jobs("n1", t0, {"erp": 1})
    await env.store.outbox.record(job, delivered_at=None, next_attempt_at=t0 + 60, error="HTTP 503", owner="n1")
    row = env.job(mid)
    assert (row["state"], row["attempts"], row["next_attempt_at"], row["last_error"], row["lease_owner"]) == (
        "pending", 1, t0 + 60, "HTTP 503", None)


async def test_a_stale_dead_letter_leaves_no_audit_record(env: Env) -> None:
    mid = await env.accept()
    t0 = env.job(mid)["created_at"] + 1
    [job] = await env.jobs("n1", t0, {"erp": 1})
    await env.jobs("n2", t0 + 301, {"erp": 1})
    await env.store.outbox.record(job, delivered_at=None, next_attempt_at=None, error="HTTP 400", dead=True,
                                  owner="n1")
    assert env.job(mid)["state"] == "pending"  # correctly not dead-lettered by the stale owner…
    assert await env.audit("delivery.dead_letter", mid) == []  # …and so the audit log must not say it was


async def test_release_gives_back_one_nodes_jobs(env: Env) -> None:
    first, second = await env.accept(), await env.accept()
    t0 = env.job(second)["created_at"] + 1
    assert {j.message_id for j in await env.jobs("n1", t0, {"erp": 1})} == {first}
    assert {j.message_id for j in await env.jobs("n2", t0, {"erp": 1})} == {second}
    assert await env.store.outbox.release("n1") == 1
    assert (env.job(first)["lease_owner"], env.job(first)["lease_until"]) == (None, None)
    assert env.job(second)["lease_owner"] == "n2"  # others' leases stay
    assert [j.message_id for j in await env.jobs("n3", t0 + 1, {"erp": 5})] == [first]
    assert await env.store.outbox.release("nobody") == 0


async def test_run_takes_back_its_own_leases_at_start(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    box = env.outbox(env.https(erp.url), owner="n1")
    mid = await env.accept()
    env.due(mid)
    await env.jobs("n1", env.clock.now, {"erp": 1})  # as if n1 crashed holding it
    assert await box.run_once() == 0  # the lease still holds it
    task = asyncio.create_task(box.run())
    try:
        await erp.until(lambda: len(erp.seen) == 1)
    finally:
        await box.stop(5.0)
        await asyncio.wait_for(task, 5)
    job = env.job(mid)
    assert (job["state"], job["attempts"], job["lease_owner"]) == ("delivered", 1, None)
    assert erp.keys == [mid]


async def test_run_says_loudly_when_jobs_wait_for_an_unconfigured_destination(
        env: Env, start_erp: StartErp, log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    erp = await start_erp()
    box = env.outbox(env.https(erp.url))
    await env.accept(("gone",))
    await env.accept(("gone",))
    mid = await env.accept()
    env.due(mid)
    task = asyncio.create_task(box.run())
    try:
        await erp.until(lambda: len(erp.seen) == 1)
    finally:
        await box.stop(5.0)
        await asyncio.wait_for(task, 5)
    events = [e for e in log_lines() if e.get("event") == "delivery.unknown_destination"]
    assert [(e["destination"], e["jobs"], e["level"]) for e in events] == [("gone", 2, "error")]
    assert env.job(mid)["state"] == "delivered"
    assert env.sql("SELECT count(*) FROM deliveries WHERE destination = 'gone' AND state = 'pending'")[0] == 2

async def test_stop_cancels_a_slow_attempt_and_gives_the_job_back(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.script = [(HANG, "", {})]
    box = env.outbox(env.https(erp.url), owner="n1")
    mid = await env.accept()
    env.due(mid)
    task = asyncio.create_task(box.run())
    await erp.until(lambda: len(erp.seen) == 1)
    assert env.job(mid)["lease_owner"] == "n1"
    started = time.monotonic()
    await box.stop(0.2)
    assert time.monotonic() - started < 3
    await asyncio.wait_for(task, 5)
    job = env.job(mid)
    assert (job["state"], job["attempts"], job["lease_owner"], job["lease_until"]) == ("pending", 0, None, None)
    # Nothing lost: the next worker delivers it, with the same idempotency key.
    assert await env.outbox(env.https(erp.url), owner="n2").run_once() == 1
    assert env.job(mid)["state"] == "delivered"
    assert erp.keys == [mid, mid]


# --- operators: retry, requeue, listings ----------------------------------------------------------------


async def test_retry_makes_a_waiting_job_due_now(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.script = [(503, "", {"Retry-After": "1000"})]
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    env.due(mid)
    await box.run_once()
    assert env.job(mid)["next_attempt_at"] > env.clock.now + 900
    assert await box.run_once() == 0
    assert await env.store.outbox.retry(mid, None, "alice") == ["erp"]
    assert env.job(mid)["next_attempt_at"] <= time.time()
    [record] = await env.audit("delivery.retried", mid)
    assert (record["actor"], record["partner"], record["detail"]) == ("alice", "acme", {"destinations": ["erp"], "reason": ""})
    assert await box.run_once() == 1
    assert env.job(mid)["state"] == "delivered"


async def test_requeue_puts_a_dead_letter_back_with_a_fresh_horizon(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.script = [(422, "unknown buyer", {})]
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    before = env.job(mid)["created_at"]
    env.due(mid)
    await box.run_once()
    assert env.job(mid)["state"] == "dead"
    with pytest.raises(NotHeld) as err:  # retry is for waiting jobs, not dead ones
        await env.store.outbox.retry(mid, None, "alice")
    assert err.value.code == "NOTHING_TO_RETRY" and "erp: dead" in err.value.message
    assert await env.store.outbox.retry(mid, "erp", "bob", requeue=True, reason="buyer added in the ERP") == ["erp"]
    job = env.job(mid)
    assert (job["state"], job["attempts"], job["lease_owner"]) == ("pending", 0, None)
    assert job["created_at"] > before and job["next_attempt_at"] == job["created_at"]
    [record] = await env.audit("delivery.requeued", mid)
    assert record["actor"] == "bob" and record["detail"] == {"destinations": ["erp"], "reason": "buyer added in the ERP"}
    env.clock.now = time.time() + 1
    assert await box.run_once() == 1
    assert env.job(mid)["state"] == "delivered"
    assert erp.keys == [mid, mid]


async def test_retry_and_requeue_refuse_when_nothing_matches(env: Env) -> None:
    mid = await env.accept()
    with pytest.raises(NotHeld) as err:
        await env.store.outbox.retry(mid, None, "a", requeue=True)
    assert err.value.code == "NOTHING_TO_RETRY" and "dead-lettered" in err.value.message
    with pytest.raises(NotHeld) as err:
        await env.store.outbox.retry(mid, "elsewhere", "a")
    assert err.value.code == "NOTHING_TO_RETRY" and "'elsewhere'" in err.value.message
    with pytest.raises(NotHeld) as err:
        await env.store.outbox.retry(str(uuid.uuid4()), None, "a")
    assert err.value.code == "NOTHING_TO_RETRY" and "no such message" in err.value.message
    assert env.job(mid)["state"] == "pending"
    assert [r for r in await env.store.audit.newest() if r.action.startswith("delivery.")] == []


async def test_dead_letters_filter_by_partner_destination_and_time(env: Env) -> None:
    one = await env.accept(("a",), partner="acme")
    two = await env.accept(("b",), partner="globex")
    pending = await env.accept(("a",), partner="acme")
    for mid, dest in ((one, "a"), (two, "b")):
        [job] = [j for j in await env.jobs("n1", time.time() + 1, {dest: 5}) if j.message_id == mid]
        await env.store.outbox.record(job, delivered_at=None, next_attempt_at=None, error=f"HTTP 400: {dest}",
                                      dead=True, owner="n1")
    await env.store.outbox.release("n1")
    env.sql("UPDATE deliveries SET updated_at = 1000 WHERE message_id = ?", one)
    env.sql("UPDATE deliveries SET updated_at = 2000 WHERE message_id = ?", two)

    async def ids(**kw: Any) -> list[str]:
        return [d.message_id for d in await env.store.reports.dead_letters(**kw)]

    assert await ids() == [two, one]  # newest first; the pending one is not a dead letter
    assert pending not in await ids()
    assert await ids(partner="acme") == [one]
    assert await ids(destination="b") == [two]
    assert await ids(since=1500) == [two]
    assert await ids(until=1500) == [one]
    assert await ids(since=1000, until=2000) == [one]
    assert await ids(partner="acme", destination="b") == []
    [entry] = await env.store.reports.dead_letters(partner="globex")
    assert (entry.destination, entry.attempts, entry.error, entry.direction) == ("b", 1, "HTTP 400: b", "in")
    assert entry.dead_at == "1970-01-01T00:33:20.000000Z"


async def test_messages_and_message_show_deliveries_and_history(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    box = env.outbox(env.https(erp.url))
    delivered, dead, waiting = await env.accept(), await env.accept(), await env.accept()
    erp.script = [(200, "", {}), (400, "bad buyer", {}), (503, "", {})]
    env.due(waiting)
    for mid in (delivered, dead, waiting):  # one at a time, so that the script meets them in order
        env.sql("UPDATE deliveries SET next_attempt_at = next_attempt_at + 100000 WHERE message_id != ?", mid)
        await box.run_once()
        env.sql("UPDATE deliveries SET next_attempt_at = next_attempt_at - 100000 WHERE message_id != ?", mid)
    assert [env.job(m)["state"] for m in (delivered, dead, waiting)] == ["delivered", "dead", "pending"]

    async def ids(status: str) -> set[str]:
        return {m.message_id for m in await env.store.reports.messages(status=status)}

    assert await ids("delivered") == {delivered}
    assert await ids("dead-letter") == await ids("dead") == {dead}
    assert await ids("pending") == {waiting}
    assert await ids("accepted") == {waiting}
    assert len(await env.store.reports.messages()) == 3
    assert len(await env.store.reports.messages(limit=2)) == 2

    shown = await env.store.reports.message(dead)
    assert shown is not None
    assert shown.status == "dead-letter" and shown.partner == "acme" and shown.invoice_number == dead
    [d] = shown.deliveries
    assert (d.destination, d.state, d.attempts, d.last_error, d.next_attempt_at) == (
        "erp", "dead", 1, "HTTP 400: bad buyer", None)
    assert [h.action for h in shown.history] == ["invoice.accepted", "delivery.dead_letter"]
    await env.store.outbox.retry(dead, None, "carol", requeue=True, reason="fixed")
    shown = await env.store.reports.message(dead)
    assert shown is not None
    assert [(h.action, h.actor) for h in shown.history] == [("invoice.accepted", "gateway"), ("delivery.dead_letter", "gateway"),
                                                            ("delivery.requeued", "carol")]
    assert shown.deliveries[0].state == "pending" and shown.deliveries[0].next_attempt_at is not None
    assert await env.store.reports.message(str(uuid.uuid4())) is None


# --- corruption at rest ---------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "missing"])
async def test_an_unreadable_blob_is_dead_lettered_unsent(env: Env, start_erp: StartErp, damage: str,
                                                          log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    erp = await start_erp()
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    env.due(mid)
    if damage == "flip":
        stored = await env.store.outbox.load_sealed(mid)
        assert stored is not None
        sealed = bytearray(stored)
        sealed[len(sealed) // 2] ^= 0x01
        env.sql("UPDATE blobs SET sealed = ? WHERE message_id = ?", bytes(sealed), mid)
    else:
        env.sql("DELETE FROM blobs WHERE message_id = ?", mid)
    assert await box.run_once() == 1
    job = env.job(mid)
    assert (job["state"], job["attempts"]) == ("dead", 1)
    assert "failed authentication or is missing" in job["last_error"]
    assert erp.seen == []
    events = [e for e in log_lines() if e.get("event") == "delivery.dead_letter"]
    assert [(e["reason"], e["message_id"], e["level"]) for e in events] == [("STORED_OBJECT_UNREADABLE", mid, "error")]
    assert len(await env.audit("delivery.dead_letter", mid)) == 1
    env.clock.now += 10 * CFG.horizon_s
    assert await box.run_once() == 0


