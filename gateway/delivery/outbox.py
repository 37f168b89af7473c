"""Delivery: the outbox worker that takes stored invoices to their destinations, exactly once in effect.

    store.claim() ─▶ open the sealed object ─▶ Sender.send() ─▶ delivered | retry later | dead letter
                                                                      └─▶ store.record_delivery()

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
import hmac
import json
import os
import random
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from .. import logs
from ..config.load import DeliveryConfig, Destination
from ..errors import VaultError
from ..model import Partner, PartnerStatus
from ..partners.directory import PartnerBook
from ..storage.sqlite import DeliveryJob, Store
from ..tls import client_context, encryptable
from ..vault import Vault

if TYPE_CHECKING:
    from .smarthost import Mailer

STOP_LOOP_WAIT_S = 5.0  # at shutdown, for a claim transaction under way
POLL_S = 0.25  # also woken at once after each acceptance in this process (other workers: by polling)
MAX_ERROR_CHARS = 300  # of a reason kept with a job (an ERP's error body, an exception)
MAX_REPLY_BYTES = 16_384  # read of a destination's reply body, for the reason of a refusal

log = logs.get("delivery")


class DeliveryFailed(Exception):
    """An attempt that did not deliver.  ``permanent``: retrying cannot help (dead-letter now)."""

    def __init__(self, error: str, *, permanent: bool = False, retry_after: float | None = None):
        super().__init__(error)
        self.error = error[:MAX_ERROR_CHARS]
        self.permanent = permanent
        self.retry_after = retry_after


class Sender(Protocol):
    name: str
    concurrency: int

    async def send(self, job: DeliveryJob, document: bytes) -> str:
        """Deliver or raise DeliveryFailed; returns a short note for the log (e.g. "HTTP 201")."""
        ...

    async def close(self) -> None: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectorySender:
    """Writes ``<message_id>.json`` then ``<message_id>.xml`` (``.pdf`` for a Factur-X PDF) into an ERP's inbox folder.

    Each file is written under a dot-name, fsynced and renamed into place, then the folder is
    fsynced: a reader sees a whole file or none.  The document appears last, so when it is
    there its sidecar is too.  A redelivery after a crash rewrites the same names with the same bytes.
    """

    def __init__(self, dest: Destination, executor: Executor):
        assert dest.path is not None
        self.name = dest.name
        self.concurrency = dest.concurrency
        self.folder = dest.path
        self.executor = executor

    def _write(self, name: str, data: bytes) -> None:
        tmp = self.folder / f".{name}.{uuid.uuid4().hex}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        os.fchmod(fd, 0o640)  # readable by the ERP's group even under the service's UMask=0077
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.folder / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def write(self, message_id: str, document: bytes, metadata: dict[str, object]) -> None:
        self._write(f"{message_id}.json", json.dumps(metadata, indent=2, sort_keys=True).encode() + b"\n")
        self._write(f"{message_id}.{'pdf' if metadata.get('media_type') == 'application/pdf' else 'xml'}", document)
        _fsync_dir(self.folder)

    async def send(self, job: DeliveryJob, document: bytes) -> str:
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.write, job.message_id, document,
                                                             job.metadata)
        except OSError as exc:
            raise DeliveryFailed(f"cannot write to {self.folder}: {exc.strerror or exc}") from exc
        return "written"

    async def close(self) -> None:
        pass


def signature_header(key: bytes, timestamp: int, message_id: str, body: bytes) -> str:
    """``v1=<hex>``: HMAC-SHA256 over "<timestamp>.<message id>.<body>", so that an ERP can check the
    origin, refuse stale replays (the timestamp) and trust the idempotency key (the message id)."""
    mac = hmac.new(key, f"{timestamp}.{message_id}.".encode(), hashlib.sha256)
    mac.update(body)
    return f"v1={mac.hexdigest()}"


def classify(status: int, retry_after: str | None, reply: str) -> DeliveryFailed | None:
    """None for success (2xx); otherwise whether the refusal is worth retrying."""
    if 200 <= status < 300:
        return None
    reason = f"HTTP {status}" + (f": {reply.strip()}" if reply.strip() else "")
    if status in (408, 429) or status >= 500:
        after = None
        if retry_after and retry_after.strip().isdigit():
            after = float(retry_after.strip())
        return DeliveryFailed(reason, retry_after=after)
    if 300 <= status < 400:
        return DeliveryFailed(f"{reason} (redirects are not followed; correct the destination's url)", permanent=True)
    return DeliveryFailed(reason, permanent=True)


class _HttpSender:
    """What the ERP and partner senders share: one TLS session pool, bounded replies, error mapping."""

    def __init__(self, dest: Destination):
        self.name = dest.name
        self.concurrency = dest.concurrency
        self.dest = dest
        self.ssl = client_context(dest.ca, dest.client_certificate, dest.client_key)
        self.timeout = aiohttp.ClientTimeout(total=dest.timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ssl, limit=self.concurrency), timeout=self.timeout)
        return self._session

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        try:
            async with self.session().post(url, data=body, headers=headers, allow_redirects=False) as resp:
                reply = await resp.content.read(MAX_REPLY_BYTES)
                failure = classify(resp.status, resp.headers.get("Retry-After"), self.reason(reply))
                if failure is not None:
                    raise failure
                return resp.status, reply.decode("utf-8", "replace")
        except DeliveryFailed:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            text = str(exc) or exc.__class__.__name__
            raise DeliveryFailed(f"{exc.__class__.__name__}: {text}") from exc

    @staticmethod
    def reason(reply: bytes) -> str:
        return reply.decode("utf-8", "replace").replace("\n", " ")[:MAX_ERROR_CHARS]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class HttpsSender(_HttpSender):
    """POSTs the invoice to an ERP endpoint: the document as the body, the facts in headers, an
    HMAC signature header, optionally a bearer token and a client certificate."""

    def __init__(self, dest: Destination, clock: Callable[[], float] = time.time):
        super().__init__(dest)
        assert dest.hmac_key_file is not None
        self.key = dest.hmac_key_file.read_bytes()
        self.token = dest.bearer_token_file.read_text(encoding="utf-8").strip() if dest.bearer_token_file else None
        self.clock = clock

    def headers(self, job: DeliveryJob, document: bytes) -> dict[str, str]:
        ts = int(self.clock())
        meta = job.metadata
        headers = {
            "Content-Type": str(meta.get("media_type") or "application/xml"),
            "Idempotency-Key": job.message_id,
            "X-Einvoice-Message-Id": job.message_id,
            "X-Einvoice-Partner": job.partner,
            "X-Einvoice-Direction": str(meta.get("direction", "in")),
            "X-Einvoice-Sha256": job.sha256,
            "X-Einvoice-Document-Type": str(meta.get("document_type", "")),
            "X-Einvoice-Timestamp": str(ts),
            "X-Einvoice-Signature": signature_header(self.key, ts, job.message_id, document),
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def send(self, job: DeliveryJob, document: bytes) -> str:
        status, _ = await self.post(self.dest.url, document, self.headers(job, document))
        return f"HTTP {status}"


class PartnerSender(_HttpSender):
    """POSTs an invoice to a trading partner's registered endpoint over mutual TLS (another
    einvoice-gateway answers 202 with its receipt, and a resend of the same bytes with the same
    receipt, so a retry never books twice there either)."""

    def __init__(self, dest: Destination, partners: PartnerBook, mailer: Callable[[], Mailer | None] = lambda: None):
        super().__init__(dest)
        self.partners = partners
        self.mailer = mailer  # the current one, for partners whose endpoint is mailto: (None: no [smarthost])

    async def send(self, job: DeliveryJob, document: bytes) -> str:
        name = self.dest.partner or job.partner
        partner = self.partners.current.get(name)
        if partner is None or not partner.endpoint:
            raise DeliveryFailed(f"partner {name!r} has no endpoint registered (partners edit {name} --endpoint URL)")
        if partner.status is not PartnerStatus.ACTIVE:
            raise DeliveryFailed(f"partner {name!r} is {partner.status.value}; retried until the horizon "
                                 f"({'partners resume' if partner.status is PartnerStatus.SUSPENDED else 'partners activate'} {name})")
        if partner.endpoint.startswith("mailto:"):
            return await self._mail(job, document, partner)
        headers = {"Content-Type": str(job.metadata.get("media_type") or "application/xml"),
                   "Idempotency-Key": job.message_id}
        status, reply = await self.post(partner.endpoint, document, headers)
        try:
            receipt = json.loads(reply)
            return f"HTTP {status} {receipt.get('status', '')} message_id={receipt.get('message_id', '')}"
        except (ValueError, AttributeError):
            return f"HTTP {status}"

    async def _mail(self, job: DeliveryJob, document: bytes, partner: Partner) -> str:
        mailer = self.mailer()
        if mailer is None:
            raise DeliveryFailed(f"partner {partner.name!r} receives invoices by e-mail and there is no [smarthost] (or no "
                                 "[smtp] identity) to send them with; retried until the horizon")
        now = datetime.now(UTC)
        certs = [c for c in self.partners.current.certificates.values() if c.spki_sha256 in partner.smime_spki
                 and encryptable(c.cert) and partner.refusal(c.spki_sha256, now, "smime") is None]
        if not certs:
            raise DeliveryFailed(f"partner {partner.name!r} has no S/MIME certificate with an RSA key to encrypt to "
                                 f"(partners edit {partner.name} --smime-cert PEM)")
        newest = max(certs, key=lambda c: c.not_after)  # during a rollover, the certificate that lasts longest
        if newest.not_after < datetime.now(UTC):
            raise DeliveryFailed(f"partner {partner.name!r}: its S/MIME certificate expired on {newest.not_after.date()}; "
                                 f"register its new one (partners edit {partner.name} --smime-cert PEM)")
        return await mailer.send_invoice(job, document, partner.endpoint.removeprefix("mailto:"), newest.cert, "aes-256-gcm")

    @staticmethod
    def reason(reply: bytes) -> str:
        """Another gateway's refusal, condensed: its code, message and first details."""
        try:
            body = json.loads(reply)
            details = "; ".join(str(d.get("message", "")) for d in body.get("details", [])[:3])
            return f"{body['error']}: {body['message']}" + (f" ({details})" if details else "")
        except (ValueError, KeyError, TypeError, AttributeError):
            return _HttpSender.reason(reply)


def make_sender(dest: Destination, partners: PartnerBook, executor: Executor,
                mailer: Callable[[], Mailer | None] = lambda: None) -> Sender:
    if dest.type == "directory":
        return DirectorySender(dest, executor)
    if dest.type == "https":
        return HttpsSender(dest)
    if dest.type == "email":
        from .smarthost import EmailSender  # (smarthost.py builds on this module)

        return EmailSender(dest, mailer)
    return PartnerSender(dest, partners, mailer)


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
    def __init__(self, store: Store, vault: Vault, senders: dict[str, Sender], cfg: DeliveryConfig, executor: Executor,
                 *, owner: str | None = None, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 on_outcome: Callable[[str, str], None] = lambda destination, outcome: None):
        self.store = store
        self.on_outcome = on_outcome  # (destination, delivered | retry | dead_letter): the metrics counter
        self.vault = vault
        self.senders = senders
        self.cfg = cfg
        self.executor = executor
        self.owner = owner or socket.gethostname()  # stable across restarts: a node takes back its own leases
        self.clock = clock  # wall time: schedules are stored and outlive the process
        self.monotonic = monotonic  # breakers live in memory only
        self.wake = asyncio.Event()
        self.breakers = {name: Breaker(cfg.breaker_failures, cfg.breaker_cooldown_s, cfg.retry_cap_s) for name in senders}
        self.in_flight: dict[str, int] = dict.fromkeys(senders, 0)
        self._tasks: set[asyncio.Task[None]] = set()
        self._run_task: asyncio.Task[Any] | None = None
        self._stopping = False

    def reconfigure(self, senders: dict[str, Sender], cfg: DeliveryConfig, vault: Vault) -> list[Sender]:
        """Take a reloaded configuration; attempts in flight finish with the sender they started with.
        Returns the senders no longer used, for the caller to close once those attempts are done."""
        old, self.senders, self.cfg, self.vault = self.senders, senders, cfg, vault
        for name in senders:
            self.breakers.setdefault(name, Breaker(cfg.breaker_failures, cfg.breaker_cooldown_s, cfg.retry_cap_s))
            self.in_flight.setdefault(name, 0)
        self.wake.set()
        return [s for name, s in old.items() if senders.get(name) is not s]

    async def run(self) -> None:
        self._run_task = asyncio.current_task()
        released = await asyncio.wrap_future(self.store.release(self.owner))
        if released:
            log.info("delivery.resumed", jobs=released, owner=self.owner)
        depth = await asyncio.get_running_loop().run_in_executor(self.executor, self.store.pending_by_destination)
        for name, jobs in sorted(depth.items()):
            if name not in self.senders:  # never claimed, so never dead-lettered either: say so loudly
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
        return {name: self.breakers[name].slots(now, s.concurrency) - self.in_flight[name]
                for name, s in self.senders.items()}

    async def fill(self) -> int:
        """Claim what the free slots allow and start delivering it; returns how many started."""
        wanted = {k: v for k, v in self._wanted().items() if v > 0}
        if not wanted:
            return 0
        loop = asyncio.get_running_loop()
        now = self.clock()
        if not await loop.run_in_executor(self.executor, self.store.due_deliveries, now, 1):
            return 0  # nothing due: no write transaction just to find that out
        jobs = await asyncio.wrap_future(self.store.claim(self.owner, now, wanted, self.cfg.lease_s))
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
            await asyncio.wrap_future(self.store.release(self.owner))
        for sender in self.senders.values():
            await sender.close()

    def _open(self, job: DeliveryJob) -> bytes:
        try:
            sealed = self.store.load_sealed(job.message_id)
        except KeyError:
            raise VaultError("the stored object is missing") from None
        document = self.vault.open(sealed, job.message_id, job.sha256)
        if hashlib.sha256(document).hexdigest() != job.sha256:
            raise VaultError("cannot open sealed object")
        return document

    async def _attempt(self, job: DeliveryJob) -> None:
        bound = log.bind(message_id=job.message_id, partner=job.partner, destination=job.destination)
        breaker = self.breakers[job.destination]
        try:
            try:
                document = await asyncio.get_running_loop().run_in_executor(self.executor, self._open, job)
                note = await self.senders[job.destination].send(job, document)
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
            await self._record(job, delivered_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"))
            bound.info("delivery.delivered", attempts=job.attempts + 1, result=note,
                       latency_s=round(self.clock() - job.created_at, 3))
        finally:
            self.in_flight[job.destination] -= 1

    async def _failed(self, job: DeliveryJob, exc: DeliveryFailed, bound: Any) -> None:
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

    async def _record(self, job: DeliveryJob, *, delivered_at: str | None = None, error: str | None = None,
                      next_attempt_at: float | None = None, dead: bool = False) -> None:
        await asyncio.wrap_future(self.store.record_delivery(
            job, delivered_at=delivered_at, next_attempt_at=next_attempt_at, error=error, dead=dead, owner=self.owner))
