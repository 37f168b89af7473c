"""Delivery: reads what was stored and hands it to the configured destinations, exactly once.

Minimal by design (the router issue replaces the fan-out rule): every accepted invoice goes to
every configured destination.  A failed attempt is retried with capped exponential backoff and
jitter; past the horizon (SECURITY-TESTS.md decision 4: 72 h) the job is dead-lettered with an
ERROR event, never dropped silently.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import UTC, datetime
from pathlib import Path

from . import logs
from .config import Destination
from .errors import VaultError
from .store import DeliveryJob, Store
from .vault import Vault

RETRY_BASE_S = 5.0
RETRY_CAP_S = 30 * 60.0
HORIZON_S = 72 * 3600.0
POLL_S = 0.25  # also woken at once after each acceptance in this process (other workers: by polling)
BATCH = 64

log = logs.get("delivery")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectoryDestination:
    """Writes ``<message_id>.json`` then ``<message_id>.xml`` (``.pdf`` for a Factur-X PDF) into an ERP's inbox folder.

    Each file is written under a dot-name, fsynced and renamed into place, then the folder is
    fsynced: a reader sees a whole file or none.  The document appears last, so when it is
    there its sidecar is too.  A redelivery after a crash rewrites the same names with the same bytes.
    """

    def __init__(self, dest: Destination):
        self.name = dest.name
        self.folder = dest.path

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.folder / f".{name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def deliver(self, message_id: str, document: bytes, metadata: dict[str, object]) -> None:
        self._write(f"{message_id}.json", json.dumps(metadata, indent=2, sort_keys=True).encode() + b"\n")
        self._write(f"{message_id}.{'pdf' if metadata.get('media_type') == 'application/pdf' else 'xml'}", document)
        _fsync_dir(self.folder)


def backoff(attempts: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt: exponential, capped, with full jitter in the upper half."""
    ceiling: float = min(RETRY_CAP_S, RETRY_BASE_S * 2.0 ** min(attempts, 20))
    return ceiling / 2 + rand() * ceiling / 2


class Deliverer:
    def __init__(self, store: Store, vault: Vault, destinations: list[Destination], executor: Executor,
                 clock: Callable[[], float] = time.time, horizon_s: float = HORIZON_S):
        self.store = store
        self.vault = vault
        self.destinations = {d.name: DirectoryDestination(d) for d in destinations}
        self.executor = executor
        self.clock = clock
        self.horizon_s = horizon_s
        self.wake = asyncio.Event()
        self._pass = asyncio.Lock()  # one delivery pass at a time in this process

    async def run(self) -> None:
        while True:
            try:
                delivered = await self.run_once()
            except Exception:  # the loop must outlive a failing store; the jobs stay pending
                log.exception("delivery.loop_error")
                delivered = 0
            if delivered == 0:
                self.wake.clear()
                try:
                    await asyncio.wait_for(self.wake.wait(), POLL_S)
                except TimeoutError:
                    pass

    async def run_once(self) -> int:
        async with self._pass:
            loop = asyncio.get_running_loop()
            jobs = await loop.run_in_executor(self.executor, self.store.due_deliveries, self.clock(), BATCH)
            for job in jobs:
                await self._attempt(job)
            return len(jobs)

    def _deliver_sync(self, job: DeliveryJob) -> None:
        dest = self.destinations.get(job.destination)
        if dest is None:
            raise LookupError(f"destination {job.destination!r} is no longer configured")
        document = self.vault.open(self.store.load_sealed(job.message_id), job.message_id, job.sha256)
        if hashlib.sha256(document).hexdigest() != job.sha256:
            raise VaultError("cannot open sealed object")
        dest.deliver(job.message_id, document, job.metadata)

    async def _attempt(self, job: DeliveryJob) -> None:
        loop = asyncio.get_running_loop()
        bound = log.bind(message_id=job.message_id, partner=job.partner, destination=job.destination)
        try:
            await loop.run_in_executor(self.executor, self._deliver_sync, job)
        except VaultError:
            # Corruption at rest (SECURITY-TESTS.md D-09): retrying cannot help; park it loudly.
            bound.error("delivery.dead_letter", reason="STORED_OBJECT_UNREADABLE")
            await asyncio.wrap_future(self.store.record_delivery(
                job, delivered_at=None, next_attempt_at=None, error="stored object failed authentication", dead=True))
            return
        except (OSError, LookupError) as exc:
            now = self.clock()
            error = f"{exc.__class__.__name__}: {exc}"[:300]
            if now - job.created_at >= self.horizon_s:
                bound.error("delivery.dead_letter", reason="HORIZON_EXCEEDED", attempts=job.attempts + 1, error=error)
                await asyncio.wrap_future(self.store.record_delivery(
                    job, delivered_at=None, next_attempt_at=None, error=error, dead=True))
            else:
                delay = backoff(job.attempts)
                bound.warning("delivery.retry", attempts=job.attempts + 1, retry_in_s=round(delay, 1), error=error)
                await asyncio.wrap_future(self.store.record_delivery(
                    job, delivered_at=None, next_attempt_at=now + delay, error=error))
            return
        delivered_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        await asyncio.wrap_future(self.store.record_delivery(
            job, delivered_at=delivered_at, next_attempt_at=None, error=None))
        bound.info("delivery.delivered", attempts=job.attempts + 1)
