"""Online backup and restore of a gateway instance: its state and every file it needs to come back.

A backup is a folder (mode 0700; every file in it mode 0600)::

    gateway.db      a consistent snapshot of <state_dir>/gateway.db, made while the daemon runs
                    (gateway/storage/sqlite/backup.py: SQLite's online backup API, one read
                    transaction, other processes keep writing); one self-contained file
    files/config/…  the files below the configuration's folder, by their path relative to it
    files/root/…    the files elsewhere, by their absolute path
    manifest.json   written last and atomically: a backup without it is incomplete

What the files are comes from the configuration (gateway/operations/inventory.py): the configuration
and partners files, every certificate, CA bundle, CRL, private key and secret file it or the partners
file names, a CA's key kept beside its certificate, and, only when asked, the master keys.

The manifest (``format`` ``einvoice-gateway-backup/2``) records when and by which gateway version
the backup was made, the schema version, row counts (invoices, blobs, deliveries, audit), the
master key ids the sealed invoices need (with how many invoices each), the last audit sequence
number, the size and SHA-256 of ``gateway.db``, and under ``instance`` each file (where the
configuration names it, where it was, its size, SHA-256, mode, owner and group), the folders to make
again (with their modes) and where the master key files belong.

The snapshot stays encrypted: invoices are sealed with the vault's master keys.  **Without
``master_keys=True`` the master keys are not in the backup**: back the key files up separately;
without them a backup cannot be read.  **With it, the backup alone decrypts every invoice** and must be
guarded like the keys.  The manifest detects damage and mistakes, not a forger (it carries no MAC);
what proves an invoice authentic is its AEAD seal, checked by ``verify`` with a vault.

``create`` makes a backup, ``verify`` lists what is wrong with one (nothing: it is sound), and
``restore`` puts a verified backup back where it came from, or into a new configuration folder.
Backups of format ``/1`` (the database alone) still verify and restore.
"""

from __future__ import annotations

import grp
import hashlib
import json
import os
import pwd
import re
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import ConfigError, VaultError
from ..files import atomic_write, fsync_path, private
from ..storage.base import SnapshotError, Snapshots
from ..vault import Vault, read_key_file
from .inventory import CONFIGURATION, MASTER_KEY, Inventory

FORMAT = "einvoice-gateway-backup/2"
FORMATS = ("einvoice-gateway-backup/1", FORMAT)  # what verify and restore read
MANIFEST = "manifest.json"
FILES = "files"  # the folder of the instance's files in a backup
KEYS_NOTE = "not included: back up the vault key files separately; without them these invoices cannot be opened"
KEYS_INCLUDED = ("INCLUDED: this backup decrypts every invoice in it; keep it as safe as the master keys, "
                 "never beside the database's other copies")
CHUNK = 1 << 20

Tick = Callable[..., None]  # (what, done, total=None, *, size=False): progress, for a person watching


def _quiet(*_: Any, **__: Any) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Restored:
    manifest: dict[str, Any]
    config: Path | None  # the restored configuration file (None: a backup of the database alone)
    state_dir: Path
    files: int  # files written (the same content already in place is not counted)
    missing_keys: tuple[tuple[str, Path], ...]  # (key id, where its file belongs): not in the backup
    missing_external: tuple[tuple[str, Path], ...]  # (configuration key, path): not backed up, and absent here


# --- create ------------------------------------------------------------------------------------------


def create(snapshots: Snapshots, state_dir: Path, dest: Path, *, instance: Inventory | None = None,
           master_keys: bool = False, tick: Tick = _quiet) -> dict[str, Any]:
    """Snapshot ``state_dir``'s state (and the instance's files) into the new (or empty) folder
    ``dest``; returns the manifest."""
    if snapshots.live(state_dir) is None:
        raise ConfigError(f"backup: there is no {' '.join(snapshots.files)} in {state_dir}; name the gateway's state folder "
                          "(state_dir)")
    made = _new_folder(dest, "backup", "name a new folder for each backup")
    try:
        for name in snapshots.files:
            open(dest / name, "xb", opener=private).close()  # 0600 before anything is written to it
        tick("snapshot of the database", 0, 1)
        try:
            snapshots.snapshot(state_dir, dest)
        except SnapshotError as exc:
            raise ConfigError(f"backup: could not copy the state in {state_dir} ({exc}); check that it is the gateway's "
                              "state folder and retry") from exc
        tick("snapshot of the database", 1, 1)
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
                    "gateway_version": __version__, "master_keys": KEYS_INCLUDED if master_keys else KEYS_NOTE,
                    **facts, "files": files}
        if instance is not None:
            manifest["instance"] = _copy_instance(instance, dest, master_keys, tick)
        atomic_write(dest / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode() + b"\n")
        return manifest
    except BaseException:
        _remove_tree(dest, keep_root=not made)
        raise


def _copy_instance(inv: Inventory, dest: Path, master_keys: bool, tick: Tick) -> dict[str, Any]:
    files: list[dict[str, Any]] = []
    keys: list[dict[str, Any]] = []
    taken = [i for i in inv.files if i.kind != MASTER_KEY or master_keys]
    for item in inv.files:
        if item.kind == MASTER_KEY:
            keys.append({"key": item.key, **_where(inv, item.path), "key_id": read_key_file(item.path, item.key).key_id})
    for n, item in enumerate(taken, 1):
        where = _where(inv, item.path)
        stored = f"{FILES}/{where['base']}/{where['path'].lstrip('/')}"
        target = dest / stored
        _make_parents(target, dest)
        st = item.path.stat()
        size, digest = _copy(item.path, target, 0o600, tick, f"copying {item.path.name}")
        files.append({"key": item.key, "kind": item.kind, **where, "stored": stored, "size": size, "sha256": digest,
                      **_owner(st)})
        tick("copying the instance's files", n, len(taken))
    fsync_path(dest)
    folders: list[dict[str, Any]] = [{"key": f.key, "kind": f.kind, **_where(inv, f.path), **_owner(f.path.stat())}
                                      for f in inv.folders if f.path.is_dir()]
    seen = {(f["base"], f["path"]) for f in folders}
    for f in files:  # the folders the files sit in, below the configuration's folder, with their modes
        if f["base"] != "config":
            continue
        parts = Path(f["path"]).parts[:-1]
        for depth in range(len(parts) + 1):
            rel = Path(*parts[:depth]).as_posix() if depth else "."
            if ("config", rel) not in seen:
                seen.add(("config", rel))
                folders.append({"key": "", "kind": "folder", "base": "config", "path": rel,
                                **_owner((inv.config_dir / rel).stat())})
    config = next(i for i in inv.files if i.kind == CONFIGURATION)
    state = {**_where(inv, inv.state_dir), **_owner(inv.state_dir.stat())}  # its owner: the service's user
    return {"config_dir": str(inv.config_dir), "config": _where(inv, config.path), "state_dir": state,
            "files": files, "folders": folders, "master_key_files": keys, "master_keys_included": master_keys,
            "external": [{"key": e.key, "path": str(e.path)} for e in inv.external]}


# --- verify ------------------------------------------------------------------------------------------


def verify(snapshots: Snapshots, src: Path, vault: Vault | None = None, tick: Tick = _quiet) -> list[str]:
    """What is wrong with the backup in ``src`` (empty: nothing).  With a vault, every sealed invoice
    must open; problems name message ids, never content."""
    return _verify(snapshots, src, vault, tick)[1]


def _verify(snapshots: Snapshots, src: Path, vault: Vault | None, tick: Tick) -> tuple[dict[str, Any] | None, list[str]]:
    manifest, problems = _read_manifest(src)
    if manifest is None:
        return None, problems
    problems += _check_files(snapshots, src, manifest)
    problems += _check_instance(src, manifest, tick)
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
        problems += _check_sealed(snapshots, src, vault, facts["key_ids"], tick)
    return manifest, problems


def manifest_of(src: Path) -> dict[str, Any] | None:
    """The manifest of the backup in ``src``, if it has one this gateway reads."""
    return _read_manifest(src)[0]


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
    if manifest["format"] not in FORMATS:
        return None, [f"{MANIFEST} has format {manifest['format']!r}, this gateway reads {FORMAT!r}; use the gateway version that made it"]
    if manifest["format"] == FORMAT and "instance" in manifest and not _sound_instance(manifest["instance"]):
        return None, [f"{MANIFEST}: its instance section is not one this gateway wrote (edited?); make a new backup"]
    return manifest, []


def _sound_instance(inst: Any) -> bool:
    """The instance section has the shape create() gives it, and no path that climbs out of its base."""
    def place(e: Any) -> bool:
        return (isinstance(e, dict) and e.get("base") in ("config", "root") and isinstance(e.get("path"), str)
                and ".." not in Path(e["path"]).parts and (e["base"] == "root") == e["path"].startswith("/"))
    try:
        return (isinstance(inst, dict) and place(inst["config"]) and place(inst["state_dir"])
                and isinstance(inst["config_dir"], str)
                and all(place(f) and isinstance(f["stored"], str) and f["stored"].startswith(f"{FILES}/")
                        and ".." not in Path(f["stored"]).parts and _mode(f["mode"]) for f in inst["files"])
                and all(place(f) and _mode(f["mode"], folder=True) for f in inst["folders"])
                and all(place(k) and isinstance(k["key_id"], str) for k in inst["master_key_files"]))
    except (KeyError, TypeError):
        return False


def _mode(text: Any, folder: bool = False) -> bool:
    """A permission mode as create() records it: no setuid or sticky bit from a manifest, setgid on a
    folder only (an ERP inbox gives its files its group)."""
    return isinstance(text, str) and re.fullmatch(r"[02][0-7]{3}" if folder else r"0[0-7]{3}", text) is not None


def _check_files(snapshots: Snapshots, src: Path, manifest: dict[str, Any]) -> list[str]:
    listed = manifest.get("files")
    if not isinstance(listed, dict):
        return [f"{MANIFEST} lists no files"]
    expected = set(snapshots.files)
    present = {p.name for p in src.iterdir()} - {MANIFEST} - ({FILES} if "instance" in manifest else set())
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
        problems += _compare(src / name, name, entry)
    return problems


def _check_instance(src: Path, manifest: dict[str, Any], tick: Tick) -> list[str]:
    """Every file of the instance present, unchanged (size, SHA-256) and private (0600); nothing else there."""
    inst = manifest.get("instance")
    if inst is None:
        return []
    problems = []
    for n, entry in enumerate(inst["files"], 1):
        path = src / entry["stored"]
        if not path.is_file():
            problems.append(f"{entry['stored']} ({entry['key']}) is missing")
            continue
        problems += _compare(path, entry["stored"], entry)
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            problems.append(f"{entry['stored']} is readable by others than its owner (mode "
                            f"{stat.S_IMODE(path.stat().st_mode):04o}); run chmod 600 on it")
        tick("checking the instance's files", n, len(inst["files"]))
    listed = {entry["stored"] for entry in inst["files"]}
    if (src / FILES).is_dir():
        for path in sorted((src / FILES).rglob("*")):
            if not path.is_dir() and path.relative_to(src).as_posix() not in listed:
                problems.append(f"unexpected file {path.relative_to(src).as_posix()!r} in the backup folder")
    return problems


def _compare(path: Path, name: str, entry: dict[str, Any]) -> list[str]:
    try:
        size, digest = _size_and_hash(path)
    except OSError as exc:
        return [f"{name} cannot be read ({exc})"]
    problems = []
    if entry.get("size") != size:
        problems.append(f"{name} has {size} bytes, the manifest says {entry.get('size')!r}")
    if entry.get("sha256") != digest:
        problems.append(f"{name} does not match the SHA-256 in the manifest (damaged or changed)")
    return problems


def _check_sealed(snapshots: Snapshots, src: Path, vault: Vault, needed: dict[str, int], tick: Tick) -> list[str]:
    """Open every sealed invoice; name (by message id) each that does not, and each key the vault lacks."""
    lacking = sorted(set(needed) - set(vault.key_ids))
    problems = [f"master key {k!r} (needed by {needed[k]} invoices) is not in the vault: add its key file to vault.keys"
                for k in lacking]
    total = sum(needed.values())
    try:
        for n, (message_id, sha256, key_id, sealed) in enumerate(snapshots.sealed(src), 1):
            if sealed is None:
                problems.append(f"message {message_id}: its sealed content is missing")
            elif key_id not in lacking:
                try:
                    vault.open(sealed, message_id, sha256)
                except VaultError:
                    problems.append(f"message {message_id}: its sealed content does not open (damaged, or sealed under another key)")
            tick("opening the stored invoices", n, max(n, total))
    except SnapshotError as exc:
        problems.append(f"the backup's database is damaged, or not a gateway database ({exc})")
    return problems


# --- restore -----------------------------------------------------------------------------------------


def restore(snapshots: Snapshots, src: Path, state_dir: Path | None = None, *, config_dir: Path | None = None,
            overwrite: bool = False, tick: Tick = _quiet) -> Restored:
    """Put a verified backup back: the instance's files where they were (those below the configuration's
    folder into ``config_dir`` instead, if given) and the database into ``state_dir`` (default: where the
    restored configuration puts it).  Refuses to replace anything that differs unless ``overwrite``."""
    manifest, problems = _verify(snapshots, src, None, tick)
    if manifest is None or problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ConfigError(f"restore: the backup in {src} does not verify, nothing was restored: {'; '.join(problems[:5])}{more}; "
                          "restore another backup")
    if int(manifest["schema_version"]) > snapshots.schema_version:
        raise ConfigError(f"restore: the backup has schema {manifest['schema_version']}, newer than this gateway "
                          f"({snapshots.schema_version}); restore it with the gateway version that made it "
                          f"({manifest.get('gateway_version')})")
    inst = manifest.get("instance")
    if inst is None:
        if state_dir is None:
            raise ConfigError("restore: this backup holds the database alone; name the state folder to restore it into")
        _restore_database(snapshots, src, manifest, state_dir, overwrite, tick)
        return Restored(manifest, None, state_dir, 0, (), ())
    base = config_dir.absolute() if config_dir is not None else Path(inst["config_dir"])

    def target(e: dict[str, Any]) -> Path:
        return base / e["path"] if e["base"] == "config" else Path(e["path"])

    recorded_state = target(inst["state_dir"])
    state = state_dir.absolute() if state_dir is not None else recorded_state
    conflicts = [f"{target(f)} (differs from the backup)" for f in inst["files"]
                 if target(f).exists() and not _same(target(f), f["sha256"])]
    if state.exists() and (not state.is_dir() or any(state.iterdir())):
        conflicts.insert(0, f"{state} (a state folder that is not empty)")
    if conflicts and not overwrite:
        raise ConfigError(f"restore: an instance is in the way, nothing was restored: {', '.join(conflicts[:3])}"
                          f"{f' and {len(conflicts) - 3} more' if len(conflicts) > 3 else ''}; restore into a new place "
                          "(backup restore --config-dir DIR --state-dir DIR), or stop the gateway and overwrite it (--overwrite)")
    for folder in sorted(inst["folders"], key=lambda f: len(Path(f["path"]).parts)):
        _make_folder(target(folder), folder)
    written = 0
    for n, entry in enumerate(inst["files"], 1):
        path = target(entry)
        if not (path.exists() and _same(path, entry["sha256"])):
            path.parent.mkdir(parents=True, exist_ok=True)
            _place(src / entry["stored"], path, entry, tick)
            written += 1
        _apply_owner(path, entry)
        tick("restoring the instance's files", n, len(inst["files"]))
    config = target(inst["config"])
    if state != recorded_state:
        _set_state_dir(config, state)
    _restore_database(snapshots, src, manifest, state, overwrite, tick)
    if "owner" in inst["state_dir"]:  # the folder and the database belong to the service's user again (as root)
        _apply_owner(state, {**inst["state_dir"], "mode": "0700"})
        for name in snapshots.files:
            _apply_owner(state / name, {**inst["state_dir"], "mode": "0600"})
    missing_keys = tuple((k["key_id"], target(k)) for k in inst["master_key_files"] if not target(k).is_file())
    missing_external = tuple((e["key"], Path(e["path"])) for e in inst["external"] if not Path(e["path"]).exists())
    return Restored(manifest, config, state, written, missing_keys, missing_external)


def _restore_database(snapshots: Snapshots, src: Path, manifest: dict[str, Any], state_dir: Path, overwrite: bool,
                      tick: Tick) -> None:
    """Copy the snapshot into ``state_dir``: new, empty, or (``overwrite``) with a database to replace."""
    made = state_dir.exists() is False
    if overwrite and state_dir.is_dir():
        state_dir.chmod(0o700)
    else:
        made = _new_folder(state_dir, "restore", "restore into a new or empty folder (move the current state aside first)")
    placed: list[Path] = []
    try:
        for name in snapshots.files:
            tmp = state_dir / f".{name}.{secrets.token_hex(4)}.tmp"
            placed.append(tmp)
            _, digest = _copy(src / name, tmp, 0o600, tick, f"restoring {name}")
            if digest != manifest["files"][name]["sha256"]:
                raise ConfigError(f"restore: {src / name} changed while it was being restored; nothing was restored, try again")
        for tmp, name in zip(placed, snapshots.files, strict=True):
            for suffix in ("-journal", "-wal", "-shm"):  # a replaced database's leftovers would be applied to the new one
                (state_dir / f"{name}{suffix}").unlink(missing_ok=True)
            os.replace(tmp, state_dir / name)
    except BaseException:
        for tmp in placed:
            tmp.unlink(missing_ok=True)
        if made:
            state_dir.rmdir()
        raise
    fsync_path(state_dir)


def _set_state_dir(config: Path, state: Path) -> None:
    """Point the restored configuration's ``instance.state_dir`` at ``state`` (its other lines, comments
    included, stay as they were)."""
    text = config.read_text(encoding="utf-8")
    line = f"state_dir = {json.dumps(str(state))}"
    section = re.search(r"(?m)^\[instance\][ \t]*(#.*)?$", text)
    if section is None:
        text = f"[instance]\n{line}\n\n{text}"
    else:
        end = re.search(r"(?m)^\[", text[section.end():])
        body_end = section.end() + (end.start() if end else len(text) - section.end())
        body, n = re.subn(r"(?m)^[ \t]*state_dir[ \t]*=.*$", line, text[section.end():body_end], count=1)
        text = text[:section.end()] + (body if n else f"\n{line}{body}") + text[body_end:]
    atomic_write(config, text.encode())


# --- files -------------------------------------------------------------------------------------------


def _where(inv: Inventory, path: Path) -> dict[str, str]:
    """Below the configuration's folder: relative to it (it can move); elsewhere: absolute."""
    if path.is_relative_to(inv.config_dir):
        return {"base": "config", "path": path.relative_to(inv.config_dir).as_posix() or "."}
    return {"base": "root", "path": path.as_posix()}


def _owner(st: os.stat_result) -> dict[str, str]:
    return {"mode": f"{stat.S_IMODE(st.st_mode):04o}", "owner": _name(pwd.getpwuid, st.st_uid),
            "group": _name(grp.getgrgid, st.st_gid)}


def _name(lookup: Callable[[int], Any], number: int) -> str:
    try:
        return str(lookup(number)[0])
    except KeyError:
        return str(number)


def _apply_owner(path: Path, entry: dict[str, Any]) -> None:
    """As root, the recorded owner and group where this system knows their names; then the recorded mode
    (after chown, which may clear a setgid bit)."""
    if os.geteuid() == 0:
        try:
            os.chown(path, pwd.getpwnam(entry["owner"]).pw_uid, grp.getgrnam(entry["group"]).gr_gid)
        except KeyError:
            pass  # (an owner this system lacks: root keeps it, and the mode still protects it)
    os.chmod(path, int(entry["mode"], 8))


def _make_folder(path: Path, entry: dict[str, Any]) -> None:
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        _apply_owner(path, entry)


def _make_parents(target: Path, root: Path) -> None:
    for parent in reversed(target.parents):
        if parent.is_relative_to(root) and not parent.exists():
            parent.mkdir(mode=0o700)


def _place(source: Path, target: Path, entry: dict[str, Any], tick: Tick) -> None:
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        _, digest = _copy(source, tmp, 0o600, tick, f"restoring {target.name}")
        if digest != entry["sha256"]:
            raise ConfigError(f"restore: {source} changed while it was being restored; restore again")
        _apply_owner(tmp, entry)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(target.parent)


def _copy(source: Path, target: Path, mode: int, tick: Tick, what: str) -> tuple[int, str]:
    """Copy to a new file of ``mode``, fsynced; (size, SHA-256) of what was copied."""
    digest = hashlib.sha256()
    size = 0
    with source.open("rb") as fin, open(target, "wb", opener=lambda p, f: os.open(p, f | os.O_EXCL, mode)) as fout:
        os.fchmod(fout.fileno(), mode)
        total = os.fstat(fin.fileno()).st_size
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            size += len(chunk)
            if total > 16 * CHUNK:  # a large copy shows its own progress
                tick(what, size, total, size=True)
        fout.flush()
        os.fsync(fout.fileno())
    return size, digest.hexdigest()


def _same(path: Path, sha256: str) -> bool:
    try:
        return path.is_file() and _size_and_hash(path)[1] == sha256
    except OSError:
        return False


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


def _remove_tree(dest: Path, keep_root: bool) -> None:
    """Undo a failed create: everything written into ``dest`` (and ``dest`` itself when it was made)."""
    if not dest.is_dir():
        return
    for path in sorted(dest.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
    if not keep_root:
        dest.rmdir()


def _size_and_hash(path: Path) -> tuple[int, str]:
    with path.open("rb") as fh:
        return os.fstat(fh.fileno()).st_size, hashlib.file_digest(fh, "sha256").hexdigest()
