"""What runs for years beside the traffic: certificate expiry, audit checkpoints, retention.

``inventory`` lists every certificate the gateway depends on (its own and each partner's);
``Housekeeping`` runs in the delivering process only and, on its own schedule, warns of expiring
certificates (once per threshold), seals the audit chain with a signed checkpoint, and deletes
invoices delivered longer ago than the retention period.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography import x509

from .. import logs
from ..clock import Clock, SystemClock, now
from ..config.model import Config
from ..model import stamp
from ..partners.directory import PartnerDirectory
from ..stages.signature import SigningKey
from ..storage.base import Store
from ..tls import spki_sha256
from . import audit

EXPIRY_CHECK_S = 3600.0  # certificates are checked hourly (and at start)
RETENTION_CHECK_S = 600.0
RETENTION_BATCH = 500  # invoices deleted per transaction, so intake never waits long for the write lock

log = logs.get("lifecycle")


@dataclass(frozen=True, slots=True)
class CertEntry:
    owner: str  # "gateway" or the partner's name
    purpose: str  # tls-server, signing, client, document-signing
    subject: str
    spki_sha256: str
    not_after: datetime

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400


def _load(path: Any) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None


def inventory(config: Config, directory: PartnerDirectory) -> list[CertEntry]:
    out = []
    own = [("tls-server", config.https.certificate)] + ([("signing", config.signing.certificate)] if config.signing else []) \
        + ([("smime", config.smtp.certificate)] if config.smtp else [])
    for purpose, path in own:
        cert = _load(path)
        if cert is not None:
            out.append(CertEntry("gateway", purpose, cert.subject.rfc4514_string(), spki_sha256(cert), cert.not_valid_after_utc))
    for p in directory.partners:
        for purpose, spkis in (("client", p.client_spki), ("document-signing", p.signing_spki), ("smime", p.smime_spki)):
            for spki in sorted(spkis):
                info = directory.certificates.get(spki)
                if info is not None:
                    out.append(CertEntry(p.name, purpose, info.subject, spki, info.not_after))
    return out


def expiring(entries: list[CertEntry], within_days: int, now: datetime | None = None) -> list[tuple[CertEntry, float]]:
    """Certificates that expire within ``within_days`` (or have expired), soonest first."""
    now = now or datetime.now(UTC)
    found = [(e, e.days_left(now)) for e in entries if e.days_left(now) < within_days]
    return sorted(found, key=lambda x: x[1])


class ExpiryWarnings:
    """Logs each certificate once per threshold it crosses (30, 14, 7 days by default), and once when expired."""

    def __init__(self, thresholds: tuple[int, ...], count: Callable[[str], None] = lambda t: None):
        self.thresholds = sorted(thresholds)
        self.count = count
        self._said: set[tuple[str, str, int]] = set()

    def check(self, entries: list[CertEntry], now: datetime | None = None) -> None:
        now = now or datetime.now(UTC)
        for e in entries:
            days = e.days_left(now)
            crossed = 0 if days <= 0 else next((t for t in self.thresholds if days <= t), None)
            if crossed is None or (e.owner, e.spki_sha256, crossed) in self._said:
                continue
            self._said.add((e.owner, e.spki_sha256, crossed))
            fields = dict(owner=e.owner, purpose=e.purpose, subject=e.subject, spki_sha256=e.spki_sha256,
                          not_after=e.not_after.isoformat(), days_left=round(days, 1))
            if crossed == 0:
                log.error("certificate.expired", **fields)
            else:
                log.warning("certificate.expiring", threshold_days=crossed, **fields)
            self.count(str(crossed))


class Housekeeping:
    def __init__(self, config: Config, store: Store, executor: Executor, directory: Callable[[], PartnerDirectory],
                 signer: Callable[[], SigningKey | None], warnings: ExpiryWarnings, clock: Clock | None = None):
        self.config = config
        self.clock = clock or SystemClock()
        self.store = store
        self.executor = executor
        self.directory = directory  # the current partner directory (it changes on reload)
        self.signer = signer
        self.warnings = warnings

    async def run(self) -> None:
        ops = self.config.operations
        # Every job is scheduled whatever the configuration says now: a reload may turn retention on or off.
        jobs: list[tuple[float, Callable[[], Any]]] = [(EXPIRY_CHECK_S, self.check_expiry),
                                                        (ops.audit_checkpoint_s, self.checkpoint),
                                                        (RETENTION_CHECK_S, self.expire)]
        due = [self.clock.monotonic()] * len(jobs)
        while True:
            now = self.clock.monotonic()
            for i, (every, job) in enumerate(jobs):
                if now >= due[i]:
                    due[i] = now + every
                    try:
                        await job()
                    except Exception:  # housekeeping must outlive a failing store; it tries again next time
                        log.exception("housekeeping.failed", job=job.__name__)
            await self.clock.sleep(max(0.05, min(due) - self.clock.monotonic()))

    async def check_expiry(self) -> None:
        entries = await asyncio.get_running_loop().run_in_executor(
            self.executor, inventory, self.config, self.directory())
        self.warnings.check(entries, now(self.clock))

    async def checkpoint(self) -> int | None:
        signer = self.signer()
        if signer is None:
            return None
        return await self.store.audit.checkpoint(lambda seq, head: audit.checkpoint_detail(signer, seq, head))

    async def expire(self) -> int:
        if self.config.operations.retention_days <= 0:  # 0: keep them
            return 0
        cutoff = stamp(now(self.clock) - timedelta(days=self.config.operations.retention_days))
        total = 0
        while True:
            ids = await self.store.retention.expire(cutoff, RETENTION_BATCH)
            total += len(ids)
            if len(ids) < RETENTION_BATCH:
                break
            await asyncio.sleep(0)
        if total:
            log.info("retention.deleted", invoices=total, delivered_before=cutoff)
        return total

    async def final_checkpoint(self) -> None:
        with contextlib.suppress(Exception):
            await self.checkpoint()
