"""Snapshots of the SQLite state for gateway/operations/backup.py: one consistent, self-contained file.

``snapshot`` copies the live database with SQLite's online backup API (one read transaction, while
the daemon keeps writing) into rollback-journal mode; ``inspect`` integrity-checks a snapshot and
reads what a backup's manifest records about it; ``sealed`` walks its sealed invoices.  A snapshot
is opened read-only and ``immutable`` (SQLite then creates no -wal or -shm beside it).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from ..base import SnapshotError
from .engine import DB_FILE
from .schema import SCHEMA_VERSION

_COUNTS = {
    "invoices": "SELECT count(*) FROM invoices",
    "blobs": "SELECT count(*) FROM blobs",
    "deliveries": "SELECT count(*) FROM deliveries",
    "audit": "SELECT count(*) FROM audit",
}


class SqliteSnapshots:
    files: tuple[str, ...] = (DB_FILE,)  # what a backup folder holds besides its manifest
    schema_version = SCHEMA_VERSION

    def live(self, state_dir: Path) -> Path | None:
        path = state_dir / DB_FILE
        return path if path.is_file() else None

    def snapshot(self, state_dir: Path, folder: Path) -> None:
        """Copy the live database into ``folder``/gateway.db (which must exist, empty, mode 0600)."""
        live, target = state_dir / DB_FILE, folder / DB_FILE
        try:
            with closing(_open_ro(live, snapshot=False)) as src, closing(sqlite3.connect(target)) as dst:
                src.backup(dst)  # all pages in one step: one read transaction, a consistent snapshot
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
        except sqlite3.Error as exc:
            raise SnapshotError(str(exc)) from exc

    def inspect(self, folder: Path) -> tuple[list[str], dict[str, Any]]:
        """Integrity-check a snapshot (read only) and read what the manifest records about it."""
        try:
            with closing(_open_ro(folder / DB_FILE)) as conn:
                check = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
                if check != ["ok"]:
                    return [f"{DB_FILE} fails PRAGMA integrity_check: {line}" for line in check[:10]], {}
                version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if version is None:
                    return [f"{DB_FILE} has no schema version: it is not a gateway database"], {}
                return [], {
                    "schema_version": int(version[0]),
                    "counts": {name: int(conn.execute(sql).fetchone()[0]) for name, sql in _COUNTS.items()},
                    "key_ids": dict(conn.execute("SELECT key_id, count(*) FROM invoices GROUP BY key_id "
                                                 "ORDER BY key_id").fetchall()),
                    "last_audit_seq": conn.execute("SELECT max(seq) FROM audit").fetchone()[0],
                }
        except sqlite3.Error as exc:
            return [f"{DB_FILE} is damaged, or not a gateway database ({exc})"], {}

    def sealed(self, folder: Path) -> Iterator[tuple[str, str, str, bytes | None]]:
        """(message id, sha256, key id, sealed content or None) of every invoice in a snapshot."""
        try:
            with closing(_open_ro(folder / DB_FILE)) as conn:
                for message_id, sha256, key_id, sealed in conn.execute(
                        "SELECT i.message_id, i.sha256, i.key_id, b.sealed FROM invoices i LEFT JOIN blobs b "
                        "USING (message_id) ORDER BY i.message_id"):
                    yield message_id, sha256, key_id, None if sealed is None else bytes(sealed)
        except sqlite3.Error as exc:
            raise SnapshotError(str(exc)) from exc


def _open_ro(db: Path, *, snapshot: bool = True) -> sqlite3.Connection:
    """Read only.  A snapshot is a finished file: ``immutable`` also keeps SQLite from creating a -wal or
    -shm beside it (a damaged header could ask for one); the live database is read through its WAL."""
    query = "?mode=ro&immutable=1" if snapshot else "?mode=ro"
    return sqlite3.connect(db.resolve().as_uri() + query, uri=True, timeout=30)
