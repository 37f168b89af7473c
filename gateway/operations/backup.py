"""Online backup and restore of the gateway's state.

A backup is a folder (mode 0700) holding exactly two files (mode 0600)::

    gateway.db      a consistent snapshot of <state_dir>/gateway.db, made while the daemon runs
                    (gateway/storage/sqlite/backup.py: SQLite's online backup API, one read
                    transaction, other processes keep writing); one self-contained file
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError, VaultError
from ..files import atomic_write, fsync_path, private
from ..storage.base import SnapshotError, Snapshots
from ..vault import Vault

FORMAT = "einvoice-gateway-backup/1"
MANIFEST = "manifest.json"
KEYS_NOTE = "not included: back up the vault key files separately; without them these invoices cannot be opened"


def create(snapshots: Snapshots, state_dir: Path, dest: Path) -> dict[str, Any]:
    """Snapshot ``state_dir``'s state into the new (or empty) folder ``dest``; returns the manifest."""
    if snapshots.live(state_dir) is None:
        raise ConfigError(f"backup: there is no {' '.join(snapshots.files)} in {state_dir}; name the gateway's state folder "
                          "(state_dir)")
    made = _new_folder(dest, "backup", "name a new folder for each backup")
    try:
        for name in snapshots.files:
            open(dest / name, "xb", opener=private).close()  # 0600 before anything is written to it
        try:
            snapshots.snapshot(state_dir, dest)
        except SnapshotError as exc:
            raise ConfigError(f"backup: could not copy the state in {state_dir} ({exc}); check that it is the gateway's "
                              "state folder and retry") from exc
        for name in snapshots.files:
            fsync_path(dest / name)
        problems, facts = snapshots.inspect(dest)
        if problems:
            raise ConfigError(f"backup: the snapshot of {state_dir} is damaged ({'; '.join(problems[:3])}); stop the gateway, "
                              "check the database with `sqlite3 gateway.db 'PRAGMA integrity_check'`, or restore an earlier backup")
        files = {}
        for name in snapshots.files:
            size, digest = _size_and_hash(dest / name)
            files[name] = {"size": size, "sha256": digest}
        manifest = {"format": FORMAT, "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "gateway_version": __version__, "master_keys": KEYS_NOTE, **facts, "files": files}
        atomic_write(dest / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
        return manifest
    except BaseException:
        for name in snapshots.files:
            for suffix in ("", "-journal", "-wal", "-shm"):
                (dest / f"{name}{suffix}").unlink(missing_ok=True)
        if made:
            dest.rmdir()
        raise


def verify(snapshots: Snapshots, src: Path, vault: Vault | None = None) -> list[str]:
    """What is wrong with the backup in ``src`` (empty: nothing).  With a vault, every sealed invoice
    must open; problems name message ids, never content."""
    return _verify(snapshots, src, vault)[1]


def restore(snapshots: Snapshots, src: Path, state_dir: Path) -> dict[str, Any]:
    """Copy a verified backup into the empty (or new) ``state_dir``; returns its manifest."""
    manifest, problems = _verify(snapshots, src, None)
    if manifest is None or problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConfigError(f"restore: the backup in {src} does not verify, nothing was restored: {'; '.join(problems[:5])}{more}; "
                          "restore another backup")
    if int(manifest["schema_version"]) > snapshots.schema_version:
        raise ConfigError(f"restore: the backup has schema {manifest['schema_version']}, newer than this gateway "
                          f"({snapshots.schema_version}); restore it with the gateway version that made it "
                          f"({manifest.get('gateway_version')})")
    made = _new_folder(state_dir, "restore", "restore into a new or empty folder (move the current state aside first)")
    placed: list[Path] = []
    try:
        for name in snapshots.files:
            tmp = state_dir / f".{name}.{secrets.token_hex(4)}.tmp"
            placed.append(tmp)
            digest = hashlib.sha256()
            with (src / name).open("rb") as fin, open(tmp, "xb", opener=private) as fout:
                while chunk := fin.read(1 << 20):
                    digest.update(chunk)
                    fout.write(chunk)
                fout.flush()
                os.fsync(fout.fileno())
            if digest.hexdigest() != manifest["files"][name]["sha256"]:
                raise ConfigError(f"restore: {src / name} changed while it was being restored; nothing was restored, try again")
        for tmp, name in zip(placed, snapshots.files, strict=True):
            os.replace(tmp, state_dir / name)
    except BaseException:
        for tmp in placed:
            tmp.unlink(missing_ok=True)
        if made:
            state_dir.rmdir()
        raise
    fsync_path(state_dir)
    return manifest


def _verify(snapshots: Snapshots, src: Path, vault: Vault | None) -> tuple[dict[str, Any] | None, list[str]]:
    manifest, problems = _read_manifest(src)
    if manifest is None:
        return None, problems
    problems += _check_files(snapshots, src, manifest)
    if not all((src / name).is_file() for name in snapshots.files):
        return manifest, problems
    found, facts = snapshots.inspect(src)
    problems += found
    for key, actual in facts.items():
        claimed = manifest.get(key)
        if isinstance(actual, dict) and isinstance(claimed, dict):
            problems += [f"the manifest has {key}.{sub} = {claimed.get(sub)!r}, the database {actual.get(sub)!r}"
                         for sub in sorted(actual.keys() | claimed.keys()) if claimed.get(sub) != actual.get(sub)]
        elif claimed != actual:
            problems.append(f"the manifest has {key} = {claimed!r}, the database {actual!r}")
    if vault is not None and facts:
        problems += _check_sealed(snapshots, src, vault, facts["key_ids"])
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


def _check_files(snapshots: Snapshots, src: Path, manifest: dict[str, Any]) -> list[str]:
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        return [f"{MANIFEST} lists no files"]
    expected = set(snapshots.files)
    present = {p.name for p in src.iterdir()} - {MANIFEST}
    problems = [f"unexpected file {name!r} in the backup folder" for name in sorted(present - expected)]
    problems += [f"the manifest lists {name!r}, which is not part of a backup" for name in sorted(set(listed) - expected)]
    for name in snapshots.files:
        entry = listed.get(name)
        if name not in present:
            problems.append(f"{name} is missing")
            continue
        if not isinstance(entry, dict):
            problems.append(f"{name} is not listed in the manifest")
            continue
        try:
            size, digest = _size_and_hash(src / name)
        except OSError as exc:
            problems.append(f"{name} cannot be read ({exc})")
            continue
        if entry.get("size") != size:
            problems.append(f"{name} has {size} bytes, the manifest says {entry.get('size')!r}")
        if entry.get("sha256") != digest:
            problems.append(f"{name} does not match the SHA-256 in the manifest (damaged or changed)")
    return problems


def _check_sealed(snapshots: Snapshots, src: Path, vault: Vault, needed: dict[str, int]) -> list[str]:
    """Open every sealed invoice; name (by message id) each that does not, and each key the vault lacks."""
    lacking = sorted(set(needed) - set(vault.key_ids))
    problems = [f"master key {k!r} (needed by {needed[k]} invoices) is not in the vault: add its key file to vault.keys"
                for k in lacking]
    try:
        for message_id, sha256, key_id, sealed in snapshots.sealed(src):
            if sealed is None:
                problems.append(f"message {message_id}: its sealed content is missing")
            elif key_id not in lacking:
                try:
                    vault.open(sealed, message_id, sha256)
                except VaultError:
                    problems.append(f"message {message_id}: its sealed content does not open (damaged, or sealed under another key)")
    except SnapshotError as exc:
        problems.append(f"the backup's database is damaged, or not a gateway database ({exc})")
    return problems


def _new_folder(path: Path, verb: str, hint: str) -> bool:
    """Make ``path`` a 0700 folder; it may exist only empty.  True if it was created."""
    if path.exists():
        if not path.is_dir() or any(path.iterdir()):
            raise ConfigError(f"{verb}: {path} exists and is not an empty folder; {hint}")
        path.chmod(0o700)
        return False
    path.mkdir(mode=0o700, parents=True)
    path.chmod(0o700)  # whatever the umask
    fsync_path(path.parent)
    return True


def _size_and_hash(path: Path) -> tuple[int, str]:
    with path.open("rb") as fh:
        return os.fstat(fh.fileno()).st_size, hashlib.file_digest(fh, "sha256").hexdigest()
