"""The outbox over HTTPS, for the delivery tests: fake ERPs (``tests.helpers.erp.Erp``) with a PKI of
their own, and ``Env``: a real store and vault, a fake wall clock (schedules) and a fake monotonic
clock (breakers), accepting invoices straight into the store and building outboxes whose senders
POST to the ERPs.  The fixtures that make them (``pki``, ``start_erp``, ``env``) are in
tests/delivery/conftest.py.
"""

from __future__ import annotations

import hashlib
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway import devpki
from gateway.config.model import DeliveryConfig, Destination
from gateway.delivery.outbox import Outbox
from gateway.delivery.sender import Sender
from gateway.delivery.webhook import HttpsSender
from gateway.model import AcceptedInvoice, DocumentType, InvoiceFacts
from gateway.storage.records import DeliveryJob
from gateway.storage.sqlite.store import SqliteStore
from gateway.vault import Vault
from tests.helpers import SetTime, audit_of, numbered
from tests.helpers.erp import Erp

CFG = DeliveryConfig(horizon_s=3600.0)  # the outboxes' configuration unless a test gives its own


async def stored(store: SqliteStore, vault: Vault, body: bytes, message_id: str, destinations: tuple[str, ...] = ("erp",),
                 partner: str = "acme") -> str:
    """``body`` accepted straight into the store (sealed by ``vault``) with a delivery job per destination."""
    sha = hashlib.sha256(body).hexdigest()
    sealed, key_id = vault.seal(body, message_id, sha)
    facts = InvoiceFacts(DocumentType.UBL_INVOICE, message_id, "2.1", ("0088:1",), (), "urn:c", "urn:p", "2026-11-02")
    await store.intake.put(AcceptedInvoice(message_id, partner, sha, "2026-11-20T00:00:00.000000Z", len(body), facts,
                                           sealed, key_id, destinations=destinations))
    return message_id


def committed_row(store: SqliteStore, query: str, *args: Any) -> Any:
    """One row, read on a connection of the test's own (what was committed, as another process sees it)."""
    conn = sqlite3.connect(store.path)
    try:
        with conn:
            return conn.execute(query, args).fetchone()
    finally:
        conn.close()


@dataclass(frozen=True)
class Pki:
    """The fake ERPs' CA, their server certificate (127.0.0.1, localhost), and a client certificate from the CA."""

    ca: devpki.Issued
    server: devpki.Issued
    client: devpki.Issued


StartErp = Callable[..., Awaitable[Erp]]  # start_erp(*, mtls=False, path="/erp"): a fake ERP, its url set


@dataclass
class Env:
    store: SqliteStore
    vault: Vault
    clock: SetTime
    mono: SetTime
    executor: ThreadPoolExecutor
    pki: Pki
    folder: Path
    hmac_key: Path
    outboxes: list[Outbox] = field(default_factory=list)

    async def accept(self, destinations: tuple[str, ...] = ("erp",), partner: str = "acme") -> str:
        message_id = str(uuid.uuid4())
        return await stored(self.store, self.vault, numbered(message_id), message_id, destinations, partner)

    def body(self, message_id: str) -> bytes:
        return numbered(message_id)

    def https(self, url: str, name: str = "erp", **kw: Any) -> Destination:
        return Destination(name, "https", url=url, ca=self.pki.ca.cert, hmac_key_file=self.hmac_key, **kw)

    def outbox(self, *destinations: Destination, cfg: DeliveryConfig = CFG, owner: str = "n1") -> Outbox:
        senders: dict[str, Sender] = {d.name: HttpsSender(d, clock=self.clock) for d in destinations}
        box = Outbox(self.store.outbox, self.vault, senders, cfg, self.executor, owner=owner, clock=self.clock,
                     monotonic=self.mono)
        self.outboxes.append(box)
        return box

    def sql(self, query: str, *args: Any) -> Any:
        return committed_row(self.store, query, *args)

    def job(self, message_id: str, destination: str = "erp") -> dict[str, Any]:
        keys = ("state", "attempts", "created_at", "next_attempt_at", "last_error", "lease_owner", "lease_until")
        row = self.sql(f"SELECT {', '.join(keys)} FROM deliveries WHERE message_id = ? AND destination = ?",
                       message_id, destination)
        return dict(zip(keys, row, strict=True))

    def due(self, message_id: str, seconds: float = 1.0) -> None:
        """Set the wall clock ``seconds`` after the job's acceptance."""
        self.clock.now = self.sql("SELECT max(created_at) FROM deliveries WHERE message_id = ?", message_id)[0] + seconds

    async def jobs(self, owner: str, now: float, wanted: dict[str, int], lease_s: float = 300.0) -> list[DeliveryJob]:
        return await self.store.outbox.claim(owner, now, wanted, lease_s)

    async def audit(self, action: str, message_id: str) -> list[dict[str, Any]]:
        """The audit records of one action for one message, detail parsed (``audit_of``)."""
        return [r for r in await audit_of(self.store, action) if r["message_id"] == message_id]
