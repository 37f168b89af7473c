"""Online backup and restore of the gateway's state (the one SQLite database).

A backup is a folder (mode 0700) holding exactly two files (mode 0600)::

    gateway.db      a consistent snapshot of <state_dir>/gateway.db, made with SQLite's online
                    backup API while the daemon runs (one read transaction: other processes keep
                    writing); rollback-journal mode, so it is one self-contained file
    manifest.json   written last and atomically: a backup without it is incomplete

The manifest (``format`` ``einvoice-gateway-backup/1``) records when and by which gateway version
the backup was made, the schema version, row counts (invoices, blobs, deliveries, audit), the
master key ids the sealed invoices need (with how many invoices each), the last audit sequence
number, and the size and SHA-256 of ``gateway.db``.

The snapshot stays encrypted: invoices are sealed with the vault's master keys, and **the master
keys are not in the backup**.  Back up the key files separately; without them a backup cannot be
read, with them anyone holding both can.  The manifest detects damage and mistakes, not a forger
(it carries no MAC); what proves an invoice authentic is its AEAD seal, checked by ``verify`` with a
vault.

``create`` makes a backup, ``verify`` lists what is wrong with one (nothing: it is sound), and
``restore`` puts a verified backup into an empty state folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError, VaultError
from ..partners.directory import atomic_write
from ..storage.sqlite import SCHEMA_VERSION
from ..vault import Vault

FORMAT = "einvoice-gateway-backup/1"
DB = "gateway.db"
MANIFEST = "manifest.json"
KEYS_NOTE = "not included: back up the vault key files separately; without them these invoices cannot be opened"
_COUNTS = {
    "invoices": "SELECT count(*) FROM invoices",
    "blobs": "SELECT count(*) FROM blobs",
    "deliveries": "SELECT count(*) FROM deliveries",
    "audit": "SELECT count(*) FROM audit",
}


def create(state_dir: Path, dest: Path) -> dict[str, Any]:
    """Snapshot ``state_dir``'s database into the new (or empty) folder ``dest``; returns the manifest."""
    live = state_dir / DB
    if not live.is_file():
        raise ConfigError(f"backup: there is no {DB} in {state_dir}; name the gateway's state folder (state_dir)")
    made = _new_folder(dest, "backup", "name a new folder for each backup")
    try:
        snapshot = dest / DB
        open(snapshot, "xb", opener=_private).close()  # 0600 before SQLite writes to it
        try:
            with closing(_open_ro(live, snapshot=False)) as src, closing(sqlite3.connect(snapshot)) as dst:
                src.backup(dst)  # all pages in one step: one read transaction, a consistent snapshot
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            _fsync(snapshot)
            problems, facts = _inspect(snapshot)
        except sqlite3.Error as exc:
            raise ConfigError(f"backup: could not copy {live} ({exc}); check that it is the gateway's database and retry") from exc
        if problems:
            raise ConfigError(f"backup: the snapshot of {live} is damaged ({'; '.join(problems[:3])}); stop the gateway, "
                              "check the database with `sqlite3 gateway.db 'PRAGMA integrity_check'`, or restore an earlier backup")
        size, digest = _size_and_hash(snapshot)
        manifest = {"format": FORMAT, "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "gateway_version": __version__, "master_keys": KEYS_NOTE, **facts,
                    "files": {DB: {"size": size, "sha256": digest}}}
        atomic_write(dest / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
        return manifest
    except BaseException:
        for name in (DB, f"{DB}-journal", f"{DB}-wal", f"{DB}-shm"):
            (dest / name).unlink(missing_ok=True)
        if made:
            dest.rmdir()
        raise


def verify(src: Path, vault: Vault | None = None) -> list[str]:
    """What is wrong with the backup in ``src`` (empty: nothing).  With a vault, every sealed invoice
    must open; problems name message ids, never content."""
    return _verify(src, vault)[1]


def restore(src: Path, state_dir: Path) -> dict[str, Any]:
    """Copy a verified backup into the empty (or new) ``state_dir``; returns its manifest."""
    manifest, problems = _verify(src, None)
    if manifest is None or problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConfigError(f"restore: the backup in {src} does not verify, nothing was restored: {'; '.join(problems[:5])}{more}; "
                          "restore another backup")
    if int(manifest["schema_version"]) > SCHEMA_VERSION:
        raise ConfigError(f"restore: the backup has schema {manifest['schema_version']}, newer than this gateway "
                          f"({SCHEMA_VERSION}); restore it with the gateway version that made it ({manifest.get('gateway_version')})")
    made = _new_folder(state_dir, "restore", "restore into a new or empty folder (move the current state aside first)")
    tmp = state_dir / f".{DB}.{secrets.token_hex(4)}.tmp"
    try:
        digest = hashlib.sha256()
        with (src / DB).open("rb") as fin, open(tmp, "xb", opener=_private) as fout:
            while chunk := fin.read(1 << 20):
                digest.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        if digest.hexdigest() != manifest["files"][DB]["sha256"]:
            raise ConfigError(f"restore: {src / DB} changed while it was being restored; nothing was restored, try again")
        os.replace(tmp, state_dir / DB)
    except BaseException:
        tmp.unlink(missing_ok=True)
        if made:
            state_dir.rmdir()
        raise
    _fsync_dir(state_dir)
    return manifest


def _verify(src: Path, vault: Vault | None) -> tuple[dict[str, Any] | None, list[str]]:
    manifest, problems = _read_manifest(src)
    if manifest is None:
        return None, problems
    problems += _check_files(src, manifest)
    if not (src / DB).is_file():
        return manifest, problems
    try:
        found, facts = _inspect(src / DB)
        problems += found
        for key, actual in facts.items():
            claimed = manifest.get(key)
            if isinstance(actual, dict) and isinstance(claimed, dict):
                problems += [f"the manifest has {key}.{sub} = {claimed.get(sub)!r}, the database {actual.get(sub)!r}"
                             for sub in sorted(actual.keys() | claimed.keys()) if claimed.get(sub) != actual.get(sub)]
            elif claimed != actual:
                problems.append(f"the manifest has {key} = {claimed!r}, the database {actual!r}")
        if vault is not None and facts:
            problems += _check_sealed(src / DB, vault)
    except sqlite3.Error as exc:
        problems.append(f"{DB} is damaged, or not a gateway database ({exc})")
    return manifest, problems


def _read_manifest(src: Path) -> tuple[dict[str, Any] | None, list[str]]:
    if not src.is_dir():
        return None, [f"{src} is not a folder: name the folder a backup was made into"]
    try:
        manifest = json.loads((src / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None, [f"{MANIFEST} is missing: the backup is incomplete (interrupted?); make a new one"]
    except (OSError, ValueError, RecursionError) as exc:
        return None, [f"{MANIFEST} cannot be read ({exc})"]
    if not isinstance(manifest, dict) or not isinstance(manifest.get("format"), str):
        return None, [f"{MANIFEST} is not an einvoice-gateway backup manifest"]
    if manifest["format"] != FORMAT:
        return None, [f"{MANIFEST} has format {manifest['format']!r}, this gateway reads {FORMAT!r}; use the gateway version that made it"]
    return manifest, []


def _check_files(src: Path, manifest: dict[str, Any]) -> list[str]:
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        return [f"{MANIFEST} lists no files"]
    present = {p.name for p in src.iterdir()} - {MANIFEST}
    problems = [f"unexpected file {name!r} in the backup folder" for name in sorted(present - {DB})]
    problems += [f"the manifest lists {name!r}, which is not part of a backup" for name in sorted(set(listed) - {DB})]
    entry = listed.get(DB)
    if DB not in present:
        problems.append(f"{DB} is missing")
    elif not isinstance(entry, dict):
        problems.append(f"{DB} is not listed in the manifest")
    else:
        try:
            size, digest = _size_and_hash(src / DB)
        except OSError as exc:
            return [*problems, f"{DB} cannot be read ({exc})"]
        if entry.get("size") != size:
            problems.append(f"{DB} has {size} bytes, the manifest says {entry.get('size')!r}")
        if entry.get("sha256") != digest:
            problems.append(f"{DB} does not match the SHA-256 in the manifest (damaged or changed)")
    return problems


def _inspect(db: Path) -> tuple[list[str], dict[str, Any]]:
    """Integrity-check a snapshot (read only) and read what the manifest records about it."""
    with closing(_open_ro(db)) as conn:
        check = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
        if check != ["ok"]:
            return [f"{DB} fails PRAGMA integrity_check: {line}" for line in check[:10]], {}
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if version is None:
            return [f"{DB} has no schema version: it is not a gateway database"], {}
        return [], {
            "schema_version": int(version[0]),
            "counts": {name: int(conn.execute(sql).fetchone()[0]) for name, sql in _COUNTS.items()},
            "key_ids": dict(conn.execute("SELECT key_id, count(*) FROM invoices GROUP BY key_id ORDER BY key_id").fetchall()),
            "last_audit_seq": conn.execute("SELECT max(seq) FROM audit").fetchone()[0],
        }


def _check_sealed(db: Path, vault: Vault) -> list[str]:
    """Open every sealed invoice; name (by message id) each that does not, and each key the vault lacks."""
    with closing(_open_ro(db)) as conn:
        needed = dict(conn.execute("SELECT key_id, count(*) FROM invoices GROUP BY key_id").fetchall())
        lacking = sorted(set(needed) - set(vault.key_ids))
        problems = [f"master key {k!r} (needed by {needed[k]} invoices) is not in the vault: add its key file to vault.keys"
                    for k in lacking]
        rows = conn.execute("SELECT i.message_id, i.sha256, i.key_id, b.sealed FROM invoices i LEFT JOIN blobs b "
                            "USING (message_id) ORDER BY i.message_id")
        for message_id, sha256, key_id, sealed in rows:
            if sealed is None:
                problems.append(f"message {message_id}: its sealed content is missing")
            elif key_id not in lacking:
                try:
                    vault.open(bytes(sealed), message_id, sha256)
                except VaultError:
                    problems.append(f"message {message_id}: its sealed content does not open (damaged, or sealed under another key)")
    return problems


def _open_ro(db: Path, *, snapshot: bool = True) -> sqlite3.Connection:
    """Read only.  A snapshot is a finished file: ``immutable`` also keeps SQLite from creating a -wal or
    -shm beside it (a damaged header could ask for one); the live database is read through its WAL."""
    query = "?mode=ro&immutable=1" if snapshot else "?mode=ro"
    return sqlite3.connect(db.resolve().as_uri() + query, uri=True, timeout=30)


def _new_folder(path: Path, verb: str, hint: str) -> bool:
    """Make ``path`` a 0700 folder; it may exist only empty.  True if it was created."""
    if path.exists():
        if not path.is_dir() or any(path.iterdir()):
            raise ConfigError(f"{verb}: {path} exists and is not an empty folder; {hint}")
        path.chmod(0o700)
        return False
    path.mkdir(mode=0o700, parents=True)
    path.chmod(0o700)  # whatever the umask
    _fsync_dir(path.parent)
    return True


def _private(path: str, flags: int) -> int:
    """``open(..., opener=_private)``: a new file is mode 0600 from its first moment."""
    return os.open(path, flags, 0o600)


def _size_and_hash(path: Path) -> tuple[int, str]:
    with path.open("rb") as fh:
        return os.fstat(fh.fileno()).st_size, hashlib.file_digest(fh, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync(path)  # a folder opens O_RDONLY too; fsync makes its entries durable
