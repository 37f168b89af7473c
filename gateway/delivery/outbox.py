"""Delivery: the outbox worker that takes stored invoices to their destinations, exactly once in effect.

    outbox.claim() ─▶ open the sealed object ─▶ Sender.send() ─▶ delivered | retry later | dead letter
                                                                       └─▶ outbox.record()

Jobs were written in the transaction that accepted the invoice.  This worker claims due jobs with a
lease (a node that dies leaves them to others when the lease lapses; the same node gives its own
back at start), at most ``concurrency`` per destination, and never for a destination whose circuit
breaker is open: one dead ERP does not starve the others.  A transient failure (5xx, 408, 429, a
timeout, a refused connection) is retried with capped exponential backoff and jitter until the
horizon (default 72 h, SECURITY-TESTS.md decision 4), then dead-lettered with an ERROR event; a
permanent one (another 4xx) is dead-lettered at once with its reason.  Nothing is dropped silently.
Every attempt for a job carries the same idempotency key (the message id), so an ERP that keeps
the keys it has seen books each invoice once even when the gateway had to resend.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from .. import logs
from ..config.model import DeliveryConfig
from ..errors import StorageUnavailable, VaultError
from ..model import stamp
from ..storage.base import OutboxStore
from ..storage.records import Job, NoticeJob
from ..vault import Vault
from .replies import ReplySender
from .sender import DeliveryFailed, Sender

STOP_LOOP_WAIT_S = 5.0  # at shutdown, for a claim transaction under way
POLL_S = 0.25  # also woken at once after each acceptance in this process (other workers: by polling)
# An outcome whose write failed (the store busy or full) is written again at once, then after these pauses:
# left alone, the job would stay leased, neither delivered nor retried, for the whole lease.
RECORD_RETRY_S = (0.05, 0.25, 1.0, 4.0)

log = logs.get("delivery")


def backoff(attempts: int, base: float, cap: float, rand: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt: exponential, capped, with full jitter in the upper half."""
    ceiling: float = min(cap, base * 2.0 ** min(attempts, 30))
    return ceiling / 2 + rand() * ceiling / 2


@dataclass
class Breaker:
    """Per destination: after ``threshold`` consecutive transient failures, stop sending for a
    cooldown (doubling while it keeps failing, up to ``cap``), then let one probe through."""

    threshold: int
    cooldown: float
    cap: float
    failures: int = 0
    open_until: float = 0.0
    pause: float = 0.0

    def slots(self, now: float, concurrency: int) -> int:
        if self.failures < self.threshold:
            return concurrency
        return 1 if now >= self.open_until else 0  # half-open: one probe

    def success(self) -> bool:
        """Returns True if this closed an open breaker."""
        was_open = self.failures >= self.threshold
        self.failures, self.pause = 0, 0.0
        return was_open

    def failure(self, now: float) -> bool:
        """Returns True if this opened (or re-opened) the breaker."""
        self.failures += 1
        if self.failures < self.threshold:
            return False
        if self.failures > self.threshold and now < self.open_until:
            return False  # an attempt that started before the breaker opened: no longer pause
        self.pause = min(self.cap, self.pause * 2 if self.pause else self.cooldown)
        self.open_until = now + self.pause
        return True


class Outbox:
    def __init__(self, store: OutboxStore, vault: Vault, senders: dict[str, Sender], cfg: DeliveryConfig, executor: Executor,
                 *, owner: str | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 on_outcome: Callable[[str, str], None] = lambda destination, outcome: None,
                 replies: ReplySender | None = None):
        self.store = store
        self.replies = replies  # sends the notices (the SMTP listener's replies); None: they wait
        self.on_outcome = on_outcome  # (destination, delivered | retry | dead_letter): the metrics counter
        self.vault = vault
        self.senders = senders
        self.cfg = cfg
        self.executor = executor
        self.owner = owner or socket.gethostname()  # stable across restarts: a node takes back its own leases
        self.clock = clock  # wall time: schedules are stored and outlive the process
        self.monotonic = monotonic  # breakers live in memory only
        self.wake = asyncio.Event()
        self.breakers = {name: Breaker(cfg.breaker_failures, cfg.breaker_cooldown_s, cfg.retry_cap_s)
                         for name in self._lanes()}
        self.in_flight: dict[str, int] = dict.fromkeys(self._lanes(), 0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._run_task: asyncio.Task[Any] | None = None
        self._stopping = False
        self.record_retry_s = RECORD_RETRY_S

    def reconfigure(self, senders: dict[str, Sender], cfg: DeliveryConfig, vault: Vault) -> list[Sender]:
        """Take a reloaded configuration; attempts in flight finish with the sender they started with.
        Returns the senders no longer used, for the caller to close once those attempts are done."""
        old, self.senders, self.cfg, self.vault = self.senders, senders, cfg, vault
        for name in self._lanes():
            self.breakers.setdefault(name, Breaker(cfg.breaker_failures, cfg.breaker_cooldown_s, cfg.retry_cap_s))
            self.in_flight.setdefault(name, 0)
        self.wake.set()
        return [s for name, s in old.items() if senders.get(name) is not s]

    async def run(self) -> None:
        self._run_task = asyncio.current_task()
        released = await self.store.release(self.owner)
        if released:
            log.info("delivery.resumed", jobs=released, owner=self.owner)
        depth = await self.store.pending_by_destination()
        for name, jobs in sorted(depth.items()):
            if name not in self._lanes():  # never claimed, so never dead-lettered either: say so loudly
                log.error("delivery.unknown_destination", destination=name, jobs=jobs,
                          reason="jobs wait for a destination that is no longer configured; add it back to deliver them")
        while not self._stopping:
            self.wake.clear()  # before the fill: a wake-up during it (a slot freed, a new job) is kept
            try:
                started = await self.fill()
            except Exception:  # the loop must outlive a failing store; the jobs stay pending
                log.exception("delivery.loop_error")
                started = 0
            if started == 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), POLL_S)

    def _wanted(self) -> dict[str, int]:
        now = self.monotonic()
        return {name: self.breakers[name].slots(now, concurrency) - self.in_flight[name]
                for name, concurrency in self._lanes().items()}

    def _lanes(self) -> dict[str, int]:
        """Each destination the outbox sends to, and how many attempts it may have in flight."""
        lanes = {name: s.concurrency for name, s in self.senders.items()}
        return lanes | ({self.replies.name: self.replies.concurrency} if self.replies is not None else {})

    async def fill(self) -> int:
        """Claim what the free slots allow and start delivering it; returns how many started."""
        wanted = {k: v for k, v in self._wanted().items() if v > 0}
        if not wanted:
            return 0
        now = self.clock()
        if not await self.store.due(now, 1):
            return 0  # nothing due: no write transaction just to find that out
        jobs = await self.store.claim(self.owner, now, wanted, self.cfg.lease_s)
        for job in jobs:
            self.in_flight[job.destination] += 1
            task = asyncio.create_task(self._attempt(job), name=f"deliver {job.message_id} to {job.destination}")
            self._tasks.add(task)
            task.add_done_callback(self._done)
        return len(jobs)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.wake.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery.task_failed", error=repr(task.exception()))

    async def run_once(self) -> int:
        """Attempt everything due now, each job once, and wait for the attempts (for tests and tools)."""
        total = 0
        while True:
            self.wake.clear()
            started = await self.fill()
            total += started
            if self._tasks:
                await asyncio.wait(list(self._tasks), return_when=asyncio.FIRST_COMPLETED)
            elif not started and not self.wake.is_set():  # (an attempt that ended during the fill freed a slot)
                return total

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; let attempts in flight finish for up to ``grace_s``, then give the rest back."""
        self._stopping = True
        self.wake.set()
        if self._run_task is not None:  # let a claim under way finish, so that its jobs are tracked below
            await asyncio.wait([self._run_task], timeout=STOP_LOOP_WAIT_S)
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.store.release(self.owner)
        for sender in self.senders.values():
            await sender.close()
        if self.replies is not None:
            await self.replies.close()

    async def _open(self, job: Job) -> bytes:
        sealed = await self.store.load_sealed(job.message_id)
        if sealed is None:
            raise VaultError("the stored object is missing")
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._unseal, sealed, job)

    def _unseal(self, sealed: bytes, job: Job) -> bytes:
        document = self.vault.open(sealed, job.message_id, job.sha256)
        if hashlib.sha256(document).hexdigest() != job.sha256:
            raise VaultError("cannot open sealed object")
        return document

    async def _send(self, job: Job, document: bytes) -> str:
        if isinstance(job, NoticeJob):
            assert self.replies is not None  # (claimed only when there is a reply sender)
            return await self.replies.send(job, document)
        return await self.senders[job.destination].send(job, document)

    async def _attempt(self, job: Job) -> None:
        bound = log.bind(message_id=job.message_id, partner=job.partner, destination=job.destination)
        breaker = self.breakers[job.destination]
        try:
            try:
                document = await self._open(job)
                note = await self._send(job, document)
            except VaultError:
                # Corruption at rest (SECURITY-TESTS.md D-09): retrying cannot help; park it loudly.
                bound.error("delivery.dead_letter", reason="STORED_OBJECT_UNREADABLE", attempts=job.attempts + 1)
                self.on_outcome(job.destination, "dead_letter")
                await self._record(job, error="the stored object failed authentication or is missing", dead=True)
                return
            except DeliveryFailed as exc:
                await self._failed(job, exc, bound)
                return
            except Exception as exc:  # a bug or a foreign error type: still an attempt that failed, recorded
                bound.exception("delivery.attempt_error")
                await self._failed(job, DeliveryFailed(f"internal error: {exc.__class__.__name__}: {exc}"), bound)
                return
            if breaker.success():
                bound.info("delivery.breaker_closed")
            self.on_outcome(job.destination, "delivered")
            await self._record(job, delivered_at=stamp())
            bound.info("delivery.delivered", attempts=job.attempts + 1, result=note,
                       latency_s=round(self.clock() - job.created_at, 3))
        finally:
            self.in_flight[job.destination] -= 1

    async def _failed(self, job: Job, exc: DeliveryFailed, bound: Any) -> None:
        now = self.clock()
        if exc.permanent:
            bound.error("delivery.dead_letter", reason="REFUSED", attempts=job.attempts + 1, error=exc.error)
            self.on_outcome(job.destination, "dead_letter")
            await self._record(job, error=exc.error, dead=True)
            return
        if self.breakers[job.destination].failure(self.monotonic()):
            bound.warning("delivery.breaker_open", pause_s=round(self.breakers[job.destination].pause, 1),
                          failures=self.breakers[job.destination].failures)
        if now - job.created_at >= self.cfg.horizon_s:
            bound.error("delivery.dead_letter", reason="HORIZON_EXCEEDED", attempts=job.attempts + 1, error=exc.error)
            self.on_outcome(job.destination, "dead_letter")
            await self._record(job, error=exc.error, dead=True)
            return
        delay = backoff(job.attempts, self.cfg.retry_base_s, self.cfg.retry_cap_s)
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self.cfg.retry_cap_s))
        bound.warning("delivery.retry", attempts=job.attempts + 1, retry_in_s=round(delay, 1), error=exc.error)
        self.on_outcome(job.destination, "retry")
        await self._record(job, error=exc.error, next_attempt_at=now + delay)

    async def _record(self, job: Job, *, delivered_at: str | None = None, error: str | None = None,
                      next_attempt_at: float | None = None, dead: bool = False) -> None:
        for pause in (*self.record_retry_s, None):
            try:
                await self.store.record(job, delivered_at=delivered_at, next_attempt_at=next_attempt_at, error=error,
                                        dead=dead, owner=self.owner)
                return
            except StorageUnavailable as exc:
                bound = log.bind(message_id=job.message_id, destination=job.destination, error=str(exc))
                if pause is None:  # the lease lapses in time and the job is offered again (to any node)
                    bound.error("delivery.record_failed", tries=len(self.record_retry_s) + 1,
                                outcome="delivered" if delivered_at else "dead_letter" if dead else "retry")
                    return
                bound.warning("delivery.record_retry", retry_in_s=pause)
                await asyncio.sleep(pause)
