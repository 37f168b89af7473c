"""The SQLite schema and its migrations (schema_version in the meta table)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from ...errors import ConfigError
from ...stages.admission import date_key, number_key
from ..chain import FIELDS, GENESIS, record_hash

SCHEMA_VERSION = 10

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
    number_key      TEXT NOT NULL DEFAULT '',  -- the business key as a person reads it (admission.number_key)
    date_key        TEXT NOT NULL DEFAULT '',  -- (admission.date_key)
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
    prev        TEXT NOT NULL DEFAULT '',  -- the hash of the record before (gateway/storage/chain.py)
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
    deleted_at      TEXT NOT NULL,
    number_key      TEXT NOT NULL DEFAULT '',
    date_key        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS retired_source ON retired (direction, source_sha256);
CREATE INDEX IF NOT EXISTS retired_number ON retired (direction, partner, kind, invoice_number, issue_date);
CREATE INDEX IF NOT EXISTS retired_business ON retired (direction, partner, kind, number_key, date_key);
CREATE INDEX IF NOT EXISTS invoices_business ON invoices (direction, partner, kind, number_key, date_key);
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
-- The console's accounts (gateway/storage/sqlite/accounts.py).
CREATE TABLE IF NOT EXISTS users (
    name            TEXT PRIMARY KEY,
    password_hash   TEXT NOT NULL,
    roles           TEXT NOT NULL,             -- JSON list of admin | operator | auditor
    content         INTEGER NOT NULL DEFAULT 0,  -- may view invoice content
    state           TEXT NOT NULL CHECK (state IN ('active', 'disabled')),
    must_change     INTEGER NOT NULL DEFAULT 1,  -- the password was set by someone else
    totp_secret     TEXT,
    totp_last_step  INTEGER NOT NULL DEFAULT 0,  -- a TOTP code works once: this step and earlier ones are spent
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
-- Failed logins by account and source, which gateway/console/throttle.py turns into waits (never a lock).
-- A source is an address, 'browser:' and the token hash of a known browser, or '*': the account's
-- count over the sources it has not logged in from.
CREATE TABLE IF NOT EXISTS login_failures (
    user        TEXT NOT NULL REFERENCES users(name),
    source      TEXT NOT NULL,
    failures    INTEGER NOT NULL,
    last_at     REAL NOT NULL,     -- the latest failure (a count this old is forgotten)
    PRIMARY KEY (user, source)
);
CREATE INDEX IF NOT EXISTS login_failures_age ON login_failures (last_at);
-- Browsers that completed a login (both factors): the SHA-256 of the token in their egw_browser cookie.
CREATE TABLE IF NOT EXISTS login_browsers (
    token_hash  TEXT PRIMARY KEY,
    user        TEXT NOT NULL REFERENCES users(name),
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS login_browsers_user ON login_browsers (user, created_at);
-- Notices: mail the gateway sends about a submission (the SMTP listener's replies), through the outbox.
-- Sealed like invoices (a refusal's details may quote one), the sealed body dropped once sent.
CREATE TABLE IF NOT EXISTS notices (
    id              TEXT PRIMARY KEY,
    partner         TEXT NOT NULL,
    message_id      TEXT,              -- the invoice it answers, when one was stored
    recipient       TEXT NOT NULL,     -- the address it goes to
    in_reply_to     TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    certificate     BLOB,              -- DER of the certificate to encrypt to (NULL: signed only)
    cipher          TEXT NOT NULL,
    sealed          BLOB NOT NULL,
    sha256          TEXT NOT NULL,
    key_id          TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      REAL NOT NULL,
    next_attempt_at REAL NOT NULL,
    last_error      TEXT,
    delivered_at    TEXT,
    lease_owner     TEXT,
    lease_until     REAL,
    updated_at      REAL
);
CREATE INDEX IF NOT EXISTS notices_due ON notices (state, next_attempt_at);
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
# tables (new tables only).  6 → 7: invoices keep their status summary (a column, filled once).  7 → 8:
# notices, the SMTP listener's replies through the outbox (a new table only).  8 → 9: the business
# key as a person reads it (two columns, filled once).  9 → 10: no account lock any more: the users'
# lock columns go (a rebuild), failed logins are counted by source and browsers that logged in are
# remembered (new tables).
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


def migrate(conn: sqlite3.Connection, begin: Callable[[sqlite3.Connection], None]) -> None:
    """Create the tables, or bring an older database up to SCHEMA_VERSION, in one transaction."""
    conn.execute("PRAGMA foreign_keys=OFF")  # while tables are rebuilt
    try:
        begin(conn)
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
            if version < 9 and exists:
                for table in ("invoices", "retired"):
                    have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
                    for column in ("number_key", "date_key"):
                        if column not in have:
                            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT NOT NULL DEFAULT ''")
                    _fill_business_keys(conn, table)
            if version < 10 and exists and "locked_until" in {r[1] for r in conn.execute("PRAGMA table_info(users)")}:
                _rebuild(conn, "users")
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


def _fill_business_keys(conn: sqlite3.Connection, table: str) -> None:
    rows = conn.execute(f"SELECT message_id, invoice_number, issue_date FROM {table}").fetchall()  # noqa: S608
    conn.executemany(f"UPDATE {table} SET number_key = ?, date_key = ? WHERE message_id = ?",  # noqa: S608
                     [(number_key(n), date_key(d), m) for m, n, d in rows])


def _chain_existing(conn: sqlite3.Connection) -> None:
    """Schema 5: chain the records written before audit records were chained, in their order."""
    prev = GENESIS
    rows = conn.execute("SELECT seq, at, actor, action, partner, message_id, detail FROM audit ORDER BY seq").fetchall()
    for r in rows:
        record = dict(zip(FIELDS[:7], r, strict=True)) | {"prev": prev}
        prev = record_hash(record)
        conn.execute("UPDATE audit SET prev = ?, hash = ? WHERE seq = ?", (record["prev"], prev, r[0]))


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
