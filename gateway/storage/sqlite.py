"""Durable storage: the encrypted invoices, their index, and the delivery outbox.

``Store`` is the narrow interface the rest of the gateway sees; ``SqliteStore`` is the embedded
default (a later backend puts the same interface on PostgreSQL and an object store).

SQLite in WAL mode with ``synchronous=FULL``: a commit returns only after the WAL is fsynced.
Sealed invoices live in the same database as their index row (blob-in-row), written by one writer
thread that commits whatever has queued up while the previous fsync ran (group commit): one fsync
covers many invoices, and an invoice, its index row and its delivery jobs become durable in one
transaction.  The README records the measurement that chose this over one file per blob.
"""

from __future__ import annotations

import abc
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ConfigError, Conflict, Detail, GatewayError, StorageUnavailable
from ..model import AcceptedInvoice, Receipt
from ..operations.audit import CHECKPOINT, GENESIS, record_hash

T = TypeVar("T")
SCHEMA_VERSION = 7
MAX_BATCH = 256  # operations per group commit
BUSY_TIMEOUT_MS = 30_000  # other processes (CLI, other workers) holding the write lock
# The writer waits for another process's write lock in short steps of its own: SQLite's busy
# handler sleeps up to 100 ms per step, which would show in every acknowledgement's latency.
LOCK_RETRY_MIN_S = 0.0002
LOCK_RETRY_MAX_S = 0.002

_DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS invoices (
    message_id      TEXT PRIMARY KEY,
    partner         TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    received_at     TEXT NOT NULL,
    document_type   TEXT NOT NULL,
    invoice_number  TEXT NOT NULL,
    ubl_version     TEXT NOT NULL,
    supplier_ids    TEXT NOT NULL,
    customer_ids    TEXT NOT NULL,
    customization_id TEXT NOT NULL,
    profile_id      TEXT NOT NULL,
    issue_date      TEXT NOT NULL,
    size            INTEGER NOT NULL,
    key_id          TEXT NOT NULL,
    signature       TEXT,
    media_type      TEXT NOT NULL DEFAULT 'application/xml',
    rules           TEXT,
    payable_amount  TEXT NOT NULL DEFAULT '',
    currency        TEXT NOT NULL DEFAULT '',
    kind            TEXT NOT NULL DEFAULT 'invoice',
    direction       TEXT NOT NULL DEFAULT 'in' CHECK (direction IN ('in', 'out')),
    source_sha256   TEXT NOT NULL DEFAULT '',
    route           TEXT NOT NULL DEFAULT '',
    status          TEXT NOT NULL DEFAULT 'accepted',  -- status_summary(), kept in step by restatus()
    UNIQUE (direction, partner, source_sha256),
    UNIQUE (direction, partner, kind, invoice_number, issue_date)
);
CREATE TABLE IF NOT EXISTS blobs (
    message_id TEXT PRIMARY KEY REFERENCES invoices(message_id),
    sealed     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS deliveries (
    message_id      TEXT NOT NULL REFERENCES invoices(message_id),
    destination     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('held', 'pending', 'delivered', 'dead', 'rejected')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT,
    delivered_at    TEXT,
    lease_owner     TEXT,  -- the node delivering it now (NULL: nobody)
    lease_until     REAL,  -- after this, another node may claim it (its holder died)
    updated_at      REAL,
    PRIMARY KEY (message_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS invoices_received ON invoices (received_at);
CREATE TABLE IF NOT EXISTS seller_accounts (
    partner     TEXT NOT NULL,
    account     TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('known', 'pending', 'rejected')),
    first_seen  TEXT NOT NULL,
    message_id  TEXT NOT NULL,
    PRIMARY KEY (partner, account)
);
CREATE TABLE IF NOT EXISTS quarantine (
    message_id  TEXT PRIMARY KEY REFERENCES invoices(message_id),
    partner     TEXT NOT NULL,
    reasons     TEXT NOT NULL,
    accounts    TEXT NOT NULL,  -- the payee accounts this invoice names (decided with it)
    state       TEXT NOT NULL CHECK (state IN ('held', 'released', 'rejected')),
    held_at     TEXT NOT NULL,
    decided_at  TEXT,
    decided_by  TEXT,
    note        TEXT
);
CREATE TABLE IF NOT EXISTS audit (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    at          TEXT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    partner     TEXT,
    message_id  TEXT,
    detail      TEXT NOT NULL,
    prev        TEXT NOT NULL DEFAULT '',  -- the hash of the record before (gateway/audit.py)
    hash        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS audit_message ON audit (message_id);
-- What retention leaves of a deleted invoice: enough to keep refusing it as a duplicate.
CREATE TABLE IF NOT EXISTS retired (
    message_id      TEXT PRIMARY KEY,
    direction       TEXT NOT NULL,
    partner         TEXT NOT NULL,
    source_sha256   TEXT NOT NULL,
    sha256          TEXT NOT NULL,
    kind            TEXT NOT NULL,
    invoice_number  TEXT NOT NULL,
    issue_date      TEXT NOT NULL,
    received_at     TEXT NOT NULL,
    deleted_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS retired_source ON retired (direction, source_sha256);
CREATE INDEX IF NOT EXISTS retired_number ON retired (direction, partner, kind, invoice_number, issue_date);
CREATE INDEX IF NOT EXISTS invoices_key ON invoices (key_id);
CREATE INDEX IF NOT EXISTS invoices_source ON invoices (direction, source_sha256);  -- the duplicate check at every intake
CREATE INDEX IF NOT EXISTS invoices_number ON invoices (invoice_number);
CREATE INDEX IF NOT EXISTS invoices_amount ON invoices (payable_amount);
CREATE INDEX IF NOT EXISTS deliveries_message_state ON deliveries (message_id, state);
CREATE INDEX IF NOT EXISTS deliveries_delivered ON deliveries (state, delivered_at);
CREATE INDEX IF NOT EXISTS invoices_partner ON invoices (partner, received_at);
CREATE INDEX IF NOT EXISTS invoices_status ON invoices (status, received_at);
CREATE INDEX IF NOT EXISTS audit_actor ON audit (actor, seq);
CREATE INDEX IF NOT EXISTS audit_action ON audit (action, seq);
-- The console's accounts (gateway/console/accounts.py).
CREATE TABLE IF NOT EXISTS users (
    name            TEXT PRIMARY KEY,
    password_hash   TEXT NOT NULL,
    roles           TEXT NOT NULL,             -- JSON list of admin | operator | auditor
    content         INTEGER NOT NULL DEFAULT 0,  -- may view invoice content
    state           TEXT NOT NULL CHECK (state IN ('active', 'disabled')),
    must_change     INTEGER NOT NULL DEFAULT 1,  -- the password was set by someone else
    totp_secret     TEXT,
    totp_last_step  INTEGER NOT NULL DEFAULT 0,  -- a TOTP code works once: this step and earlier ones are spent
    failures        INTEGER NOT NULL DEFAULT 0,  -- consecutive failed factors (password, TOTP, recovery code)
    locked_until    REAL NOT NULL DEFAULT 0,
    created_at      TEXT NOT NULL,
    created_by      TEXT NOT NULL,
    user_handle     TEXT NOT NULL              -- WebAuthn user id (random, not the name)
);
CREATE TABLE IF NOT EXISTS recovery_codes (
    user        TEXT NOT NULL REFERENCES users(name),
    code_hash   TEXT NOT NULL,
    used_at     TEXT,
    PRIMARY KEY (user, code_hash)
);
CREATE TABLE IF NOT EXISTS passkeys (
    credential_id TEXT PRIMARY KEY,  -- base64url
    user          TEXT NOT NULL REFERENCES users(name),
    public_key    BLOB NOT NULL,
    sign_count    INTEGER NOT NULL,
    label         TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    last_used_at  TEXT
);
CREATE TABLE IF NOT EXISTS console_sessions (
    id_hash     TEXT PRIMARY KEY,  -- SHA-256 of the cookie's token
    user        TEXT NOT NULL REFERENCES users(name),
    stage       TEXT NOT NULL CHECK (stage IN ('mfa', 'enroll', 'full')),
    csrf        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    seen_at     REAL NOT NULL,
    auth_at     REAL NOT NULL,     -- the last time the user proved both factors (fresh authentication)
    address     TEXT NOT NULL,
    agent       TEXT NOT NULL,
    pending     TEXT NOT NULL DEFAULT '{}'  -- a WebAuthn challenge, a TOTP secret being enrolled
);
CREATE TABLE IF NOT EXISTS approvals (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    kind          TEXT NOT NULL,
    target        TEXT NOT NULL,
    params        TEXT NOT NULL,
    reason        TEXT NOT NULL,
    requested_by  TEXT NOT NULL,
    requested_at  TEXT NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied', 'withdrawn', 'failed')),
    decided_by    TEXT,
    decided_at    TEXT,
    outcome       TEXT
);
"""
# Schema 2 → 3: the business-duplicate key becomes (partner, kind, number, issue date), and
# deliveries may be held.  3 → 4: invoices have a direction (outbound ones are keyed by recipient)
# and deliveries carry a claim lease.  4 → 5: audit records are hash-chained.  5 → 6: the console's
# tables (new tables only).  6 → 7: invoices keep their status summary (a column, filled once).
# SQLite changes constraints only by rebuilding the table.
def _rebuild(conn: sqlite3.Connection, table: str, fill: dict[str, str] | None = None) -> None:
    """Recreate ``table`` from the current DDL, keeping every row (foreign keys off meanwhile);
    ``fill`` gives new columns an expression over the old row.

    Built under a new name and renamed over the old one: renaming the old table instead would make
    SQLite rewrite the other tables' references to follow it.
    """
    ddl = _table_ddl(table).replace(f"IF NOT EXISTS {table} (", f"{table}_new (", 1)
    conn.execute(ddl)
    old = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    new = {r[1] for r in conn.execute(f"PRAGMA table_info({table}_new)")}
    copied = {c: c for c in old if c in new} | (fill or {})
    conn.execute(f"INSERT INTO {table}_new ({', '.join(copied)}) "  # noqa: S608 (our own names)
                 f"SELECT {', '.join(copied.values())} FROM {table}")
    conn.execute(f"DROP TABLE {table}")
    conn.execute(f"ALTER TABLE {table}_new RENAME TO {table}")


def _table_ddl(name: str) -> str:
    start = _DDL.index(f"CREATE TABLE IF NOT EXISTS {name} (")
    return _DDL[start:_DDL.index(");", start) + 2]


# What the sender is told about a quarantined invoice: that it is held, or rejected after review;
# never why (the reasons would tell a fraudster what to change).
_SENDER_STATUS = {"held": "held", "rejected": "rejected", "released": "accepted"}


class NotHeld(GatewayError):
    code = "NOT_HELD"


def _masked(account: str) -> str:
    """Enough of an account for an operator to recognise it in a log line; not the whole number."""
    return account if len(account) <= 8 else f"{account[:4]}…{account[-4:]}"


def _audit(conn: sqlite3.Connection, actor: str, action: str, partner: str | None, message_id: str | None,
           detail: dict[str, Any]) -> int:
    """Append an audit record, chained to the last one, in the caller's transaction (never invoice
    content).  The caller's write lock orders the chain across processes.  Returns its seq."""
    last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    record = {"seq": (last[0] + 1) if last else 1, "at": _now(), "actor": actor, "action": action, "partner": partner,
              "message_id": message_id, "detail": json.dumps(detail, sort_keys=True), "prev": last[1] if last else GENESIS}
    conn.execute("INSERT INTO audit (seq, at, actor, action, partner, message_id, detail, prev, hash) "
                 "VALUES (?,?,?,?,?,?,?,?,?)", (*record.values(), record_hash(record)))
    return (last[0] + 1) if last else 1


def _chain_existing(conn: sqlite3.Connection) -> None:
    """Schema 5: chain the records written before audit records were chained, in their order."""
    prev = GENESIS
    rows = conn.execute("SELECT seq, at, actor, action, partner, message_id, detail FROM audit ORDER BY seq").fetchall()
    for r in rows:
        record = dict(zip(_AUDIT_FIELDS[:7], r, strict=True)) | {"prev": prev}
        prev = record_hash(record)
        conn.execute("UPDATE audit SET prev = ?, hash = ? WHERE seq = ?", (record["prev"], prev, r[0]))


_AUDIT_FIELDS = ("seq", "at", "actor", "action", "partner", "message_id", "detail", "prev", "hash")
_AUDIT_SELECT = f"SELECT {', '.join(_AUDIT_FIELDS)} FROM audit"  # noqa: S608 (our own names)


def _audit_row(r: tuple[Any, ...]) -> dict[str, Any]:
    return dict(zip(_AUDIT_FIELDS, r, strict=True))


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# status_summary() in SQL, for the messages named (or all): run in every transaction that changes a
# message's quarantine or delivery state, so the console can filter by status through an index.
_RESTATUS = """UPDATE invoices SET status = CASE
    WHEN (SELECT state FROM quarantine q WHERE q.message_id = invoices.message_id) IN ('held', 'rejected')
        THEN (SELECT state FROM quarantine q WHERE q.message_id = invoices.message_id)
    WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = invoices.message_id AND d.state = 'dead') THEN 'dead-letter'
    WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = invoices.message_id) AND NOT EXISTS (
        SELECT 1 FROM deliveries d WHERE d.message_id = invoices.message_id AND d.state != 'delivered') THEN 'delivered'
    ELSE 'accepted' END"""


def restatus(conn: sqlite3.Connection, message_id: str | None) -> None:
    if message_id is None:
        conn.execute(_RESTATUS)
    else:
        conn.execute(_RESTATUS + " WHERE message_id = ?", (message_id,))


SUMMARIES = ("accepted", "held", "delivered", "dead-letter", "rejected")


def status_summary(quarantine_state: str | None, states: set[str]) -> str:
    """One word for a message: what its sender (or ERP) is told."""
    if quarantine_state in ("held", "rejected"):
        return _SENDER_STATUS[quarantine_state]
    if "dead" in states:
        return "dead-letter"
    return "delivered" if states == {"delivered"} else "accepted"


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    message_id: str
    destination: str
    attempts: int
    created_at: float
    partner: str
    sha256: str
    metadata: dict[str, Any]


class Store(abc.ABC):
    """What the pipeline, delivery and the CLI need from storage; nothing more."""

    @abc.abstractmethod
    def find_accepted(self, partner: str | None, sha256: str, direction: str = "in") -> Receipt | None:
        """The earlier acceptance of identical content from this partner (None: any partner), if any."""

    @abc.abstractmethod
    def put(self, invoice: AcceptedInvoice, destinations: list[str]) -> Future[Receipt]:
        """Make the invoice and its delivery jobs durable; the future resolves after the commit.

        Resolves to a duplicate receipt if identical content was accepted meanwhile, or fails with
        Conflict (same number, different content) or StorageUnavailable.
        """

    @abc.abstractmethod
    def status(self, message_id: str, partner: str | None, direction: str = "in") -> dict[str, Any] | None:
        """Status for the partner that sent the message; None for anyone else."""

    @abc.abstractmethod
    def due_deliveries(self, now: float, limit: int) -> list[DeliveryJob]:
        """Due jobs that nobody holds; a read, for a cheap "anything to do?" before `claim`."""

    @abc.abstractmethod
    def claim(self, owner: str, now: float, wanted: dict[str, int], lease_s: float) -> Future[list[DeliveryJob]]:
        """Take up to ``wanted[destination]`` due jobs per destination for ``owner`` until now + lease_s."""

    @abc.abstractmethod
    def release(self, owner: str) -> Future[int]: ...

    @abc.abstractmethod
    def load_sealed(self, message_id: str) -> bytes: ...

    @abc.abstractmethod
    def record_delivery(self, job: DeliveryJob, *, delivered_at: str | None, next_attempt_at: float | None,
                        error: str | None, dead: bool = False, owner: str | None = None) -> Future[None]: ...

    @abc.abstractmethod
    def messages(self, *, direction: str | None = None, partner: str | None = None, status: str | None = None,
                 since: str | None = None, until: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Messages newest first; ``status`` is the summary the sender sees (accepted, held, delivered,
        dead-letter, rejected) or a delivery state (pending, dead: messages with such a delivery)."""

    @abc.abstractmethod
    def message(self, message_id: str) -> dict[str, Any] | None: ...

    @abc.abstractmethod
    def dead_letters(self, *, partner: str | None = None, destination: str | None = None, since: float | None = None,
                     until: float | None = None, limit: int = 100) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def retry(self, message_id: str, destination: str | None, actor: str, *, requeue: bool = False,
              reason: str = "") -> Future[list[str]]: ...

    @abc.abstractmethod
    def outbox_depth(self) -> tuple[int, float | None]: ...

    @abc.abstractmethod
    def discard(self, message_id: str, destination: str, actor: str, reason: str) -> Future[None]: ...

    @abc.abstractmethod
    def seller_accounts(self, partner: str) -> list[dict[str, Any]]:
        """The payee accounts seen for (or registered to) a partner, oldest first: account, state, first_seen, message_id."""

    @abc.abstractmethod
    def set_accounts(self, partner: str, known: list[str], blocked: list[str], actor: str, note: str) -> Future[None]:
        """Register payee accounts as the partner's own (invoices naming them are not held) and block
        others (invoices naming them are held), recorded in the audit log."""

    @abc.abstractmethod
    def pending_by_destination(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def counts(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def set_meta(self, key: str, value: str) -> Future[None]: ...

    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None: ...

    @abc.abstractmethod
    def key_usage(self) -> dict[str, int]:
        """How many stored objects each master key protects."""

    @abc.abstractmethod
    def sealed_under(self, key_ids: list[str], limit: int) -> list[tuple[str, str, bytes]]:
        """(message id, sha256, sealed) of objects sealed under any of these keys."""

    @abc.abstractmethod
    def replace_sealed(self, rows: list[tuple[str, bytes, bytes, str]]) -> Future[int]:
        """(message id, old sealed, new sealed, new key id): swap each object that still holds the old
        bytes (a concurrent change wins); returns how many were swapped."""

    @abc.abstractmethod
    def expire(self, delivered_before: str, limit: int, actor: str = "retention") -> Future[list[str]]:
        """Delete invoices (content, index row, delivery rows) whose every delivery succeeded before
        this time; keep a tombstone for duplicate detection and an audit record.  Returns their ids."""

    @abc.abstractmethod
    def quarantined(self, state: str | None = "held", partner: str | None = None, limit: int = 1000,
                    message_id: str | None = None) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def quarantine_entry(self, message_id: str) -> dict[str, Any] | None:
        """A quarantined message with the seller's whole account history beside it."""

    @abc.abstractmethod
    def decide(self, message_id: str, release: bool, actor: str, note: str,
               destinations: tuple[str, ...] = ()) -> Future[dict[str, Any]]: ...

    @abc.abstractmethod
    def audit(self, actor: str, action: str, partner: str | None, message_id: str | None,
              detail: dict[str, Any]) -> Future[None]: ...

    @abc.abstractmethod
    def audit_records(self, limit: int = 1000) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def audit_range(self, first: int | None = None, last: int | None = None, since: str | None = None,
                    until: str | None = None) -> Iterator[dict[str, Any]]:
        """Records in chain order, exactly as stored (``detail`` as its JSON text), for verify and export."""

    @abc.abstractmethod
    def audit_checkpoint(self, sign: Callable[[int, str], dict[str, Any]]) -> Future[int | None]:
        """Append a signed checkpoint over the chain's head, unless the head already is one."""

    @abc.abstractmethod
    def close(self) -> None: ...


class SqliteStore(Store):
    def __init__(self, state_dir: Path):
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = state_dir / "gateway.db"
        self._local = threading.local()
        self._queue: queue.SimpleQueue[tuple[Callable[[sqlite3.Connection], Any], Future[Any]] | None] = queue.SimpleQueue()
        conn = self._connect()
        self._migrate(conn)
        self._local.conn = conn
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA foreign_keys=OFF")  # while tables are rebuilt
        try:
            SqliteStore._begin(conn)
            try:
                exists = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() if exists else None
                version = int(row[0]) if row else SCHEMA_VERSION
                if version > SCHEMA_VERSION:
                    raise ConfigError(f"state_dir: the database has schema {version}, newer than this gateway "
                                      f"({SCHEMA_VERSION}); run the newer version")
                if version < 4 and exists:
                    columns = {r[1] for r in conn.execute("PRAGMA table_info(invoices)")}
                    if "signature" not in columns:  # schema 1
                        conn.execute("ALTER TABLE invoices ADD COLUMN signature TEXT")
                    _rebuild(conn, "invoices", {"source_sha256": "sha256"})
                    _rebuild(conn, "deliveries")
                    if version < 3:
                        conn.execute("UPDATE invoices SET kind = 'credit-note' WHERE document_type = 'ubl:CreditNote'")
                if version < 5 and exists:
                    conn.execute("ALTER TABLE audit ADD COLUMN prev TEXT NOT NULL DEFAULT ''")
                    conn.execute("ALTER TABLE audit ADD COLUMN hash TEXT NOT NULL DEFAULT ''")
                    _chain_existing(conn)
                if version < 7 and exists and "status" not in {r[1] for r in conn.execute("PRAGMA table_info(invoices)")}:
                    conn.execute("ALTER TABLE invoices ADD COLUMN status TEXT NOT NULL DEFAULT 'accepted'")
                for statement in _DDL.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                if version < 7 and exists:
                    restatus(conn, None)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        finally:
            conn.execute("PRAGMA foreign_keys=ON")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA secure_delete=ON")
        self.path.chmod(0o600)
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
        return conn

    # --- for the modules that keep their own tables here (gateway/console/accounts.py) -------------

    def write(self, op: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Run ``op`` in a write transaction (with ``audit_in`` for its audit records)."""
        return self._submit(op)

    def read(self) -> sqlite3.Connection:
        return self._reader()

    @staticmethod
    def audit_in(conn: sqlite3.Connection, actor: str, action: str, partner: str | None, message_id: str | None,
                 detail: dict[str, Any]) -> int:
        return _audit(conn, actor, action, partner, message_id, detail)

    # --- the writer: group commit --------------------------------------------------------------

    def _submit(self, op: Callable[[sqlite3.Connection], T]) -> Future[T]:
        fut: Future[T] = Future()
        if not self._writer.is_alive():
            fut.set_exception(StorageUnavailable("the store is closed"))
        else:
            self._queue.put((op, fut))
        return fut

    def _write_loop(self) -> None:
        conn = self._connect()
        conn.execute("PRAGMA busy_timeout=0")  # _begin() waits for the lock itself
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            # A running future can no longer be cancelled by its waiter; one cancelled while queued
            # (the request went away) is dropped: nobody was told it was stored.
            batch = [(op, fut) for op, fut in batch if fut.set_running_or_notify_cancel()]
            if batch:
                self._commit(conn, batch)
        conn.close()

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[Callable[[sqlite3.Connection], Any], Future[Any]]]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            self._begin(conn)
            for op, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op(conn)))
                    conn.execute("RELEASE op")
                except GatewayError as exc:  # a permanent verdict for this one operation only
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except Exception as exc:  # sqlite3.Error, or a bug in an operation: fail the batch, keep the writer
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            error = StorageUnavailable("the invoice could not be stored durably; retry later")
            error.__cause__ = exc
            for _, fut in batch:
                fut.set_exception(error)
            return
        for (ok, value), (_, fut) in zip(outcomes, batch, strict=True):
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    @staticmethod
    def _begin(conn: sqlite3.Connection) -> None:
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        delay = LOCK_RETRY_MIN_S
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, LOCK_RETRY_MAX_S)

    def close(self) -> None:
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # --- invoices ------------------------------------------------------------------------------

    def find_accepted(self, partner: str | None, sha256: str, direction: str = "in") -> Receipt | None:
        return self._earlier(self._reader(), partner, sha256, direction)

    @staticmethod
    def _earlier(conn: sqlite3.Connection, partner: str | None, source_sha256: str, direction: str) -> Receipt | None:
        row = conn.execute(
            "SELECT i.message_id, i.received_at, i.rules, q.state, i.sha256 FROM invoices i "
            "LEFT JOIN quarantine q USING (message_id) WHERE i.direction = ? AND i.source_sha256 = ? "
            "AND (? IS NULL OR i.partner = ?) ORDER BY i.received_at LIMIT 1",
            (direction, source_sha256, partner, partner)
        ).fetchone()
        if row is None:
            row = conn.execute(
                "SELECT message_id, received_at, sha256 FROM retired WHERE direction = ? AND source_sha256 = ? "
                "AND (? IS NULL OR partner = ?) ORDER BY received_at LIMIT 1",
                (direction, source_sha256, partner, partner)).fetchone()
            return None if row is None else Receipt(row[0], "delivered", row[2], row[1], duplicate=True)
        return Receipt(row[0], _SENDER_STATUS.get(row[3], "accepted"), row[4], row[1], duplicate=True,
                       rules=json.loads(row[2]) if row[2] else None)

    def put(self, invoice: AcceptedInvoice, destinations: list[str]) -> Future[Receipt]:
        def op(conn: sqlite3.Connection) -> Receipt:
            f = invoice.facts
            source_sha256 = invoice.source_sha256 or invoice.sha256
            # Outbound, the same bytes are the same submission whoever they were addressed to.
            earlier = self._earlier(conn, invoice.partner if invoice.direction == "in" else None, source_sha256,
                                    invoice.direction)
            if earlier is not None:
                return earlier
            row = conn.execute(
                "SELECT message_id FROM invoices WHERE direction = ? AND partner = ? AND kind = ? AND invoice_number = ? "
                "AND issue_date = ? UNION ALL SELECT message_id FROM retired WHERE direction = ? AND partner = ? "
                "AND kind = ? AND invoice_number = ? AND issue_date = ? LIMIT 1",
                (invoice.direction, invoice.partner, f.kind, f.invoice_number, f.issue_date) * 2,
            ).fetchone()
            if row:
                raise Conflict(
                    f"{f.kind} number {f.invoice_number!r} of {f.issue_date} was already accepted from you with different "
                    f"content (message {row[0]}); issue a new number, or a credit note to correct it",
                    [Detail(f"earlier message_id {row[0]}", path="invoice number (BT-1) and issue date (BT-2)")],
                    code="DUPLICATE_CONFLICT",
                )
            now_iso = _now()
            holds = list(invoice.holds) + (self._account_holds(conn, invoice, now_iso) if invoice.direction == "in" else [])
            conn.execute(
                "INSERT INTO invoices VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (invoice.message_id, invoice.partner, invoice.sha256, invoice.received_at, f.document_type.label,
                 f.invoice_number, f.ubl_version, json.dumps(f.supplier_ids), json.dumps(f.customer_ids),
                 f.customization_id, f.profile_id, f.issue_date, invoice.size, invoice.key_id,
                 json.dumps(invoice.signature) if invoice.signature else None, invoice.media_type,
                 json.dumps(invoice.rules) if invoice.rules is not None else None, f.payable_amount, f.currency, f.kind,
                 invoice.direction, source_sha256, invoice.route, "held" if holds else "accepted"),
            )
            conn.execute("INSERT INTO blobs VALUES (?, ?)", (invoice.message_id, invoice.sealed))
            now = time.time()
            conn.executemany(
                "INSERT INTO deliveries (message_id, destination, state, created_at, next_attempt_at, updated_at) "
                "VALUES (?,?,?,?,?,?)",
                [(invoice.message_id, d, "held" if holds else "pending", now, now, now) for d in destinations],
            )
            _audit(conn, "gateway", "invoice.accepted" if invoice.direction == "in" else "invoice.submitted",
                   invoice.partner, invoice.message_id,
                   {"sha256": invoice.sha256, "document_type": f.document_type.label, "size": invoice.size,
                    "key_id": invoice.key_id, "destinations": destinations, "held": bool(holds)})
            if holds:
                conn.execute("INSERT INTO quarantine (message_id, partner, reasons, accounts, state, held_at) "
                             "VALUES (?,?,?,?,'held',?)",
                             (invoice.message_id, invoice.partner, json.dumps(holds), json.dumps(invoice.accounts), now_iso))
                _audit(conn, "gateway", "quarantine.held", invoice.partner, invoice.message_id, {"reasons": holds})
            return Receipt(invoice.message_id, "held" if holds else "accepted", invoice.sha256, invoice.received_at,
                           rules=invoice.rules)

        return self._submit(op)

    @staticmethod
    def _account_holds(conn: sqlite3.Connection, invoice: AcceptedInvoice, now: str) -> list[str]:
        """Compare the payee accounts with the seller's history; record new ones (known for a new
        seller, pending review otherwise) and return the reason to hold, if any."""
        if not invoice.accounts:
            return []
        history = dict(conn.execute("SELECT account, state FROM seller_accounts WHERE partner = ?", (invoice.partner,)))
        new = [a for a in invoice.accounts if a not in history]
        first = not history
        conn.executemany("INSERT INTO seller_accounts VALUES (?,?,?,?,?)",
                         [(invoice.partner, a, "known" if first else "pending", now, invoice.message_id) for a in new])
        if first:
            _audit(conn, "gateway", "account.first_seen", invoice.partner, invoice.message_id,
                   {"accounts": [_masked(a) for a in new]})
            return []
        unknown = [a for a in invoice.accounts if history.get(a, "pending") != "known"]
        if not unknown:
            return []
        _audit(conn, "gateway", "account.changed", invoice.partner, invoice.message_id,
               {"accounts": [_masked(a) for a in unknown]})
        return [f"payee account {_masked(a)} was never used by this seller before" for a in unknown]

    def status(self, message_id: str, partner: str | None, direction: str = "in") -> dict[str, Any] | None:
        conn = self._reader()
        row = conn.execute(
            "SELECT i.message_id, i.sha256, i.received_at, i.document_type, i.invoice_number, i.signature, i.rules, "
            "q.state, i.partner FROM invoices i LEFT JOIN quarantine q USING (message_id) "
            "WHERE i.message_id = ? AND i.direction = ? AND (? IS NULL OR i.partner = ?)",
            (message_id, direction, partner, partner)
        ).fetchone()
        if row is None:
            return None
        deliveries = [
            {"destination": d, "status": s, "attempts": a, "delivered_at": at}
            for d, s, a, at in conn.execute(
                "SELECT destination, state, attempts, delivered_at FROM deliveries WHERE message_id = ? AND "
                "state NOT IN ('held', 'rejected') ORDER BY destination", (message_id,),
            )
        ]
        status = status_summary(row[7], {d["status"] for d in deliveries})
        return {
            "message_id": row[0], "status": status, "sha256": row[1], "received_at": row[2],
            **({"partner": row[8]} if direction == "out" else {}),
            "document_type": row[3], "invoice_number": row[4], "deliveries": deliveries,
            "signature": json.loads(row[5]) if row[5] else None, "rules": json.loads(row[6]) if row[6] else None,
        }

    # --- quarantine ------------------------------------------------------------------------------

    def quarantined(self, state: str | None = "held", partner: str | None = None, limit: int = 1000,
                    message_id: str | None = None) -> list[dict[str, Any]]:
        rows = self._reader().execute(
            "SELECT q.message_id, q.partner, q.state, q.reasons, q.held_at, q.decided_at, q.decided_by, q.note, "
            "i.invoice_number, i.issue_date, i.payable_amount, i.currency, i.document_type FROM quarantine q "
            "JOIN invoices i USING (message_id) WHERE (? IS NULL OR q.state = ?) AND (? IS NULL OR q.partner = ?) "
            "AND (? IS NULL OR q.message_id = ?) ORDER BY q.held_at LIMIT ?",
            (state, state, partner, partner, message_id, message_id, limit),
        ).fetchall()
        return [{"message_id": r[0], "partner": r[1], "state": r[2], "reasons": json.loads(r[3]), "held_at": r[4],
                 "decided_at": r[5], "decided_by": r[6], "note": r[7], "invoice_number": r[8], "issue_date": r[9],
                 "payable_amount": r[10], "currency": r[11], "document_type": r[12]} for r in rows]

    def quarantine_entry(self, message_id: str) -> dict[str, Any] | None:
        conn = self._reader()
        row = conn.execute("SELECT partner, accounts FROM quarantine WHERE message_id = ?", (message_id,)).fetchone()
        if row is None:
            return None
        named = set(json.loads(row[1]))
        entry = self.quarantined(None, message_id=message_id)[0]
        entry["accounts"] = [
            {"account": a, "state": st, "first_seen": fs, "first_message_id": m, "this_invoice": a in named}
            for a, st, fs, m in conn.execute(
                "SELECT account, state, first_seen, message_id FROM seller_accounts WHERE partner = ? ORDER BY first_seen",
                (row[0],))
        ]
        return entry

    def decide(self, message_id: str, release: bool, actor: str, note: str,
               destinations: tuple[str, ...] = ()) -> Future[dict[str, Any]]:
        """Release a held invoice to delivery, or reject it for good; recorded with who decided.
        ``destinations``: where a released invoice that no route matched goes."""
        def op(conn: sqlite3.Connection) -> dict[str, Any]:
            row = conn.execute("SELECT partner, state, accounts FROM quarantine WHERE message_id = ?",
                               (message_id,)).fetchone()
            if row is None:
                raise NotHeld(f"no quarantined message {message_id}", code="NOT_HELD")
            if row[1] != "held":
                raise NotHeld(f"message {message_id} was already {row[1]}", code="NOT_HELD")
            state, now = ("released" if release else "rejected"), _now()
            conn.execute("UPDATE quarantine SET state = ?, decided_at = ?, decided_by = ?, note = ? WHERE message_id = ?",
                         (state, now, actor, note, message_id))
            held = conn.execute("SELECT count(*) FROM deliveries WHERE message_id = ?", (message_id,)).fetchone()[0]
            if release and not held and not destinations:
                raise NotHeld(f"message {message_id} matched no routing rule: add a [[routes]] entry for it, or "
                              "name where to deliver it (--to DESTINATION)", code="UNROUTED")
            if release and destinations:  # the operator's choice replaces the route taken at acceptance
                conn.execute("DELETE FROM deliveries WHERE message_id = ? AND state = 'held'", (message_id,))
                t = time.time()
                conn.executemany("INSERT INTO deliveries (message_id, destination, state, created_at, next_attempt_at, "
                                 "updated_at) VALUES (?,?,'pending',?,?,?)", [(message_id, d, t, t, t) for d in destinations])
            conn.execute("UPDATE deliveries SET state = ?, next_attempt_at = ?, updated_at = ? WHERE message_id = ? "
                         "AND state = 'held'", ("pending" if release else "rejected", time.time(), time.time(), message_id))
            # Its new accounts (first named by this invoice or by another one still held) become known
            # with a release; a rejection keeps them under suspicion for good.
            conn.executemany("UPDATE seller_accounts SET state = ? WHERE partner = ? AND account = ? AND state = 'pending'",
                             [("known" if release else "rejected", row[0], a) for a in json.loads(row[2])])
            restatus(conn, message_id)
            _audit(conn, actor, f"quarantine.{state}", row[0], message_id, {"note": note})
            return {"message_id": message_id, "partner": row[0], "state": state, "decided_by": actor, "decided_at": now}

        return self._submit(op)

    def audit(self, actor: str, action: str, partner: str | None, message_id: str | None,
              detail: dict[str, Any]) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            _audit(conn, actor, action, partner, message_id, detail)

        return self._submit(op)

    def audit_records(self, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self._reader().execute(f"{_AUDIT_SELECT} ORDER BY seq DESC LIMIT ?", (limit,)).fetchall()
        return [_audit_row(r) | {"detail": json.loads(r[6])} for r in rows]

    def audit_range(self, first: int | None = None, last: int | None = None, since: str | None = None,
                    until: str | None = None) -> Iterator[dict[str, Any]]:
        cursor = self._reader().execute(
            f"{_AUDIT_SELECT} WHERE seq >= ? AND seq <= ? AND (? IS NULL OR at >= ?) AND (? IS NULL OR at < ?) ORDER BY seq",
            (first or 0, last if last is not None else 2**62, since, since, until, until))
        for r in cursor:
            yield _audit_row(r)

    def audit_checkpoint(self, sign: Callable[[int, str], dict[str, Any]]) -> Future[int | None]:
        def op(conn: sqlite3.Connection) -> int | None:
            head = conn.execute("SELECT seq, hash, action FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            if head is None or head[2] == CHECKPOINT:
                return None
            return _audit(conn, "gateway", CHECKPOINT, None, None, sign(head[0], head[1]))

        return self._submit(op)

    # --- the outbox ------------------------------------------------------------------------------

    _JOB_SELECT = (
        "SELECT d.message_id, d.destination, d.attempts, d.created_at, i.partner, i.sha256, i.received_at, "
        "i.document_type, i.invoice_number, i.supplier_ids, i.customer_ids, i.customization_id, i.profile_id, "
        "i.issue_date, i.size, i.signature, i.media_type, i.rules, i.direction FROM deliveries d "
        "JOIN invoices i USING (message_id) ")

    @staticmethod
    def _job(r: tuple[Any, ...]) -> DeliveryJob:
        return DeliveryJob(r[0], r[1], r[2], r[3], r[4], r[5], {
            "message_id": r[0], "partner": r[4], "sha256": r[5], "received_at": r[6], "document_type": r[7],
            "invoice_number": r[8], "supplier_ids": json.loads(r[9]), "customer_ids": json.loads(r[10]),
            "customization_id": r[11], "profile_id": r[12], "issue_date": r[13], "size": r[14],
            "signature": json.loads(r[15]) if r[15] else None, "media_type": r[16],
            "rules": json.loads(r[17]) if r[17] else None, "direction": r[18],
        })

    def due_deliveries(self, now: float, limit: int) -> list[DeliveryJob]:
        """Due jobs nobody holds (read only: `claim` is what takes them)."""
        rows = self._reader().execute(
            self._JOB_SELECT + "WHERE d.state = 'pending' AND d.next_attempt_at <= ? AND "
            "(d.lease_until IS NULL OR d.lease_until <= ?) ORDER BY d.next_attempt_at LIMIT ?", (now, now, limit),
        ).fetchall()
        return [self._job(r) for r in rows]

    def claim(self, owner: str, now: float, wanted: dict[str, int], lease_s: float) -> Future[list[DeliveryJob]]:
        def op(conn: sqlite3.Connection) -> list[DeliveryJob]:
            jobs: list[DeliveryJob] = []
            for destination, n in wanted.items():
                if n <= 0:
                    continue
                keys = conn.execute(
                    "UPDATE deliveries SET lease_owner = ?, lease_until = ? WHERE rowid IN ("
                    "SELECT rowid FROM deliveries WHERE state = 'pending' AND destination = ? AND next_attempt_at <= ? "
                    "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY next_attempt_at LIMIT ?) "
                    "RETURNING message_id", (owner, now + lease_s, destination, now, now, n)).fetchall()
                for (message_id,) in keys:
                    row = conn.execute(self._JOB_SELECT + "WHERE d.message_id = ? AND d.destination = ?",
                                       (message_id, destination)).fetchone()
                    jobs.append(self._job(row))
            return jobs

        return self._submit(op)

    def release(self, owner: str) -> Future[int]:
        """Give back every job this node holds (it stopped, or restarted after a crash)."""
        return self._submit(lambda conn: conn.execute(
            "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?", (owner,)).rowcount)

    def load_sealed(self, message_id: str) -> bytes:
        row = self._reader().execute("SELECT sealed FROM blobs WHERE message_id = ?", (message_id,)).fetchone()
        if row is None:
            raise KeyError(message_id)
        return bytes(row[0])

    def record_delivery(self, job: DeliveryJob, *, delivered_at: str | None, next_attempt_at: float | None,
                        error: str | None, dead: bool = False, owner: str | None = None) -> Future[None]:
        """The outcome of one attempt.  A success always counts; a failure only from the job's holder
        (a node whose lease lapsed must not push back a job another node now delivers)."""
        state = "delivered" if delivered_at else "dead" if dead else "pending"

        def op(conn: sqlite3.Connection) -> None:
            updated = conn.execute(
                "UPDATE deliveries SET state = ?, attempts = attempts + 1, delivered_at = ?, last_error = ?, "
                "next_attempt_at = COALESCE(?, next_attempt_at), lease_owner = NULL, lease_until = NULL, updated_at = ? "
                "WHERE message_id = ? AND destination = ? AND state = 'pending' "
                "AND (? OR ? IS NULL OR lease_owner IS NULL OR lease_owner = ?)",
                (state, delivered_at, error, next_attempt_at, time.time(), job.message_id, job.destination,
                 state == "delivered", owner, owner),
            ).rowcount
            if updated:
                restatus(conn, job.message_id)
            if dead and updated:
                _audit(conn, "gateway", "delivery.dead_letter", job.partner, job.message_id,
                       {"destination": job.destination, "attempts": job.attempts + 1, "error": error})
            elif delivered_at and updated:
                _audit(conn, "gateway", "delivery.delivered", job.partner, job.message_id,
                       {"destination": job.destination, "attempts": job.attempts + 1})

        return self._submit(op)

    # --- operators: messages and dead letters ------------------------------------------------------

    def messages(self, *, direction: str | None = None, partner: str | None = None, status: str | None = None,
                 since: str | None = None, until: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        summary = status if status in SUMMARIES else None
        state = status if status is not None and summary is None else None
        rows = self._reader().execute(
            "SELECT i.message_id, i.direction, i.partner, i.received_at, i.document_type, i.invoice_number, "
            "i.payable_amount, i.currency, i.status FROM invoices i "
            "WHERE (? IS NULL OR i.direction = ?) AND (? IS NULL OR i.partner = ?) AND (? IS NULL OR i.received_at >= ?) "
            "AND (? IS NULL OR i.received_at < ?) AND (? IS NULL OR i.status = ?) AND (? IS NULL OR EXISTS ("
            "SELECT 1 FROM deliveries d WHERE d.message_id = i.message_id AND d.state = ?)) "
            "ORDER BY i.received_at DESC LIMIT ?",
            (direction, direction, partner, partner, since, since, until, until, summary, summary, state, state, limit))
        return [{"message_id": r[0], "direction": r[1], "partner": r[2], "received_at": r[3], "document_type": r[4],
                 "invoice_number": r[5], "payable_amount": r[6], "currency": r[7], "status": r[8]} for r in rows]

    def message(self, message_id: str) -> dict[str, Any] | None:
        """Everything an operator may see about one message (never its content): the timeline."""
        conn = self._reader()
        row = conn.execute(
            "SELECT message_id, direction, partner, sha256, received_at, document_type, invoice_number, issue_date, "
            "payable_amount, currency, supplier_ids, customer_ids, customization_id, profile_id, size, media_type, "
            "key_id, signature, rules, route FROM invoices WHERE message_id = ?", (message_id,)).fetchone()
        if row is None:
            return None
        keys = ("message_id", "direction", "partner", "sha256", "received_at", "document_type", "invoice_number",
                "issue_date", "payable_amount", "currency", "supplier_ids", "customer_ids", "customization_id",
                "profile_id", "size", "media_type", "key_id", "signature", "rules", "route")
        out: dict[str, Any] = dict(zip(keys, row, strict=True))
        for k in ("supplier_ids", "customer_ids", "signature", "rules"):
            out[k] = json.loads(out[k]) if out[k] else None
        out["deliveries"] = [
            {"destination": r[0], "state": r[1], "attempts": r[2], "next_attempt_at": _iso(r[3]) if r[1] == "pending" else None,
             "last_error": r[4], "delivered_at": r[5], "claimed_by": r[6], "updated_at": _iso(r[7])}
            for r in conn.execute("SELECT destination, state, attempts, next_attempt_at, last_error, delivered_at, "
                                  "lease_owner, updated_at FROM deliveries WHERE message_id = ? ORDER BY destination",
                                  (message_id,))]
        q = self.quarantined(None, message_id=message_id)
        out["quarantine"] = q[0] if q else None
        out["status"] = status_summary(q[0]["state"] if q else None, {d["state"] for d in out["deliveries"]})
        out["history"] = [
            {"at": r[0], "actor": r[1], "action": r[2], "detail": json.loads(r[3])}
            for r in conn.execute("SELECT at, actor, action, detail FROM audit WHERE message_id = ? ORDER BY seq",
                                  (message_id,))]
        return out

    def dead_letters(self, *, partner: str | None = None, destination: str | None = None, since: float | None = None,
                     until: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._reader().execute(
            "SELECT d.message_id, d.destination, i.partner, i.direction, i.invoice_number, d.attempts, d.last_error, "
            "d.updated_at, i.received_at FROM deliveries d JOIN invoices i USING (message_id) WHERE d.state = 'dead' "
            "AND (? IS NULL OR i.partner = ?) AND (? IS NULL OR d.destination = ?) AND (? IS NULL OR d.updated_at >= ?) "
            "AND (? IS NULL OR d.updated_at < ?) ORDER BY d.updated_at DESC LIMIT ?",
            (partner, partner, destination, destination, since, since, until, until, limit))
        return [{"message_id": r[0], "destination": r[1], "partner": r[2], "direction": r[3], "invoice_number": r[4],
                 "attempts": r[5], "error": r[6], "dead_at": _iso(r[7]), "received_at": r[8]} for r in rows]

    def retry(self, message_id: str, destination: str | None, actor: str, *, requeue: bool = False,
              reason: str = "") -> Future[list[str]]:
        """Make waiting jobs due now (retry), or put dead-lettered ones back in the queue with a fresh
        horizon (requeue).  Returns the destinations affected; audited with who asked."""
        def op(conn: sqlite3.Connection) -> list[str]:
            now = time.time()
            if requeue:
                sql = ("UPDATE deliveries SET state = 'pending', attempts = 0, created_at = ?, next_attempt_at = ?, "
                       "updated_at = ?, lease_owner = NULL, lease_until = NULL WHERE message_id = ? AND state = 'dead' "
                       "AND (? IS NULL OR destination = ?) RETURNING destination")
                args: tuple[Any, ...] = (now, now, now, message_id, destination, destination)
            else:
                sql = ("UPDATE deliveries SET next_attempt_at = ?, updated_at = ? WHERE message_id = ? AND state = 'pending' "
                       "AND (? IS NULL OR destination = ?) RETURNING destination")
                args = (now, now, message_id, destination, destination)
            affected = sorted(r[0] for r in conn.execute(sql, args).fetchall())
            if not affected:
                known = conn.execute("SELECT group_concat(destination || ': ' || state, ', ') FROM deliveries "
                                     "WHERE message_id = ?", (message_id,)).fetchone()[0]
                want = "dead-lettered" if requeue else "waiting (pending)"
                raise NotHeld(f"message {message_id} has no {want} delivery"
                              + (f" to {destination!r}" if destination else "") + (f" ({known})" if known else
                              " (no such message, or it has no deliveries)"), code="NOTHING_TO_RETRY")
            restatus(conn, message_id)
            partner = conn.execute("SELECT partner FROM invoices WHERE message_id = ?", (message_id,)).fetchone()[0]
            _audit(conn, actor, "delivery.requeued" if requeue else "delivery.retried", partner, message_id,
                   {"destinations": affected, "reason": reason})
            return affected

        return self._submit(op)

    def seller_accounts(self, partner: str) -> list[dict[str, Any]]:
        return [{"account": r[0], "state": r[1], "first_seen": r[2], "message_id": r[3]} for r in self._reader().execute(
            "SELECT account, state, first_seen, message_id FROM seller_accounts WHERE partner = ? ORDER BY first_seen, account",
            (partner,))]

    def set_accounts(self, partner: str, known: list[str], blocked: list[str], actor: str, note: str) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            now = _now()
            for account, state in [(a, "known") for a in known] + [(a, "rejected") for a in blocked]:
                conn.execute("INSERT INTO seller_accounts VALUES (?,?,?,?,'') ON CONFLICT (partner, account) "
                             "DO UPDATE SET state = excluded.state", (partner, account, state, now))
            _audit(conn, actor, "account.registered", partner, None,
                   {"known": [_masked(a) for a in known], "blocked": [_masked(a) for a in blocked], "note": note})

        return self._submit(op)

    def discard(self, message_id: str, destination: str, actor: str, reason: str) -> Future[None]:
        """Give up on a dead-lettered delivery for good (it is no longer offered for requeue)."""
        def op(conn: sqlite3.Connection) -> None:
            row = conn.execute("UPDATE deliveries SET state = 'rejected', updated_at = ? WHERE message_id = ? AND "
                               "destination = ? AND state = 'dead' RETURNING message_id", (time.time(), message_id,
                                                                                       destination)).fetchone()
            if row is None:
                raise NotHeld(f"message {message_id} has no dead-lettered delivery to {destination!r}",
                              code="NOTHING_TO_DISCARD")
            restatus(conn, message_id)
            partner = conn.execute("SELECT partner FROM invoices WHERE message_id = ?", (message_id,)).fetchone()[0]
            _audit(conn, actor, "delivery.discarded", partner, message_id, {"destination": destination, "reason": reason})

        return self._submit(op)

    def counts(self) -> dict[str, int]:
        conn = self._reader()
        out = {"invoices": conn.execute("SELECT count(*) FROM invoices").fetchone()[0]}
        for state, n in conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state"):
            out[f"deliveries_{state}"] = n
        return out

    def set_meta(self, key: str, value: str) -> Future[None]:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

        return self._submit(op)

    def get_meta(self, key: str) -> str | None:
        row = self._reader().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def key_usage(self) -> dict[str, int]:
        return dict(self._reader().execute("SELECT key_id, count(*) FROM invoices GROUP BY key_id").fetchall())

    def sealed_under(self, key_ids: list[str], limit: int) -> list[tuple[str, str, bytes]]:
        marks = ",".join("?" * len(key_ids))
        rows = self._reader().execute(
            f"SELECT i.message_id, i.sha256, b.sealed FROM invoices i JOIN blobs b USING (message_id) "  # noqa: S608
            f"WHERE i.key_id IN ({marks}) LIMIT ?", (*key_ids, limit)).fetchall()
        return [(r[0], r[1], bytes(r[2])) for r in rows]

    def replace_sealed(self, rows: list[tuple[str, bytes, bytes, str]]) -> Future[int]:
        def op(conn: sqlite3.Connection) -> int:
            n = 0
            for message_id, old, new, key_id in rows:
                if conn.execute("UPDATE blobs SET sealed = ? WHERE message_id = ? AND sealed = ?",
                                (new, message_id, old)).rowcount:
                    conn.execute("UPDATE invoices SET key_id = ? WHERE message_id = ?", (key_id, message_id))
                    n += 1
            return n

        return self._submit(op)

    def expire(self, delivered_before: str, limit: int, actor: str = "retention") -> Future[list[str]]:
        def op(conn: sqlite3.Connection) -> list[str]:
            ids = [r[0] for r in conn.execute(
                "SELECT message_id FROM deliveries GROUP BY message_id HAVING min(state = 'delivered') = 1 "
                "AND max(delivered_at) < ? LIMIT ?", (delivered_before, limit))]
            now = _now()
            for message_id in ids:
                conn.execute(
                    "INSERT OR REPLACE INTO retired SELECT message_id, direction, partner, source_sha256, sha256, kind, "
                    "invoice_number, issue_date, received_at, ? FROM invoices WHERE message_id = ?", (now, message_id))
                row = conn.execute("SELECT partner, sha256 FROM invoices WHERE message_id = ?", (message_id,)).fetchone()
                for table in ("blobs", "deliveries", "quarantine", "invoices"):
                    conn.execute(f"DELETE FROM {table} WHERE message_id = ?", (message_id,))  # noqa: S608
                _audit(conn, actor, "invoice.expired", row[0], message_id, {"sha256": row[1]})
            return ids

        return self._submit(op)

    def pending_by_destination(self) -> dict[str, int]:
        return dict(self._reader().execute(
            "SELECT destination, count(*) FROM deliveries WHERE state = 'pending' GROUP BY destination").fetchall())

    def outbox_depth(self) -> tuple[int, float | None]:
        """Jobs waiting for delivery, and when the oldest of them was accepted (epoch seconds)."""
        n, oldest = self._reader().execute(
            "SELECT count(*), min(created_at) FROM deliveries WHERE state = 'pending'").fetchone()
        return int(n), oldest
