"""gateway.operations.backup: an online snapshot of a real store, verified, restored, and refused when damaged."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from gateway import __version__
from gateway.errors import ConfigError
from gateway.model import AcceptedInvoice
from gateway.operations import backup
from gateway.operations.inventory import CONFIGURATION, ERP_FOLDER, FILE, SECRET, Inventory, Item
from gateway.storage.sqlite.backup import SqliteSnapshots
from gateway.storage.sqlite.schema import SCHEMA_VERSION
from gateway.storage.sqlite.store import SqliteStore
from gateway.vault import KEY_BYTES, MasterKey, Vault
from tests.helpers import os_group
from tests.helpers.records import WAIT, accepted_invoice

OLD, NEW = (MasterKey(kid, "", os.urandom(KEY_BYTES)) for kid in ("k-old", "k-new"))
CANARY = "CANARY-backup-5e0c"
SNAPSHOTS = SqliteSnapshots()


def sealed(vault: Vault, number: str, partner: str = "acme", holds: tuple[str, ...] = ()) -> tuple[AcceptedInvoice, bytes]:
    """``accepted_invoice`` (tests/helpers/records.py), sealed for real by ``vault``; with the document it holds."""
    inv = replace(accepted_invoice(number, partner=partner, content=CANARY), holds=holds)
    body = inv.sealed.removeprefix(b"sealed:")  # accepted_invoice puts a placeholder around the document
    assert hashlib.sha256(body).hexdigest() == inv.sha256
    blob, key_id = vault.seal(body, inv.message_id, inv.sha256)
    return replace(inv, sealed=blob, key_id=key_id), body


@dataclass
class State:
    dir: Path
    store: SqliteStore
    vault: Vault = field(default_factory=lambda: Vault([OLD, NEW]))  # seals under k-new, opens both
    bodies: dict[str, bytes] = field(default_factory=dict)

    async def put(self, number: str, vault: Vault | None = None, partner: str = "acme", holds: tuple[str, ...] = ()) -> str:
        inv, body = sealed(vault or self.vault, number, partner, holds)
        await asyncio.wait_for(self.store.intake.put(replace(inv, destinations=("erp",))), WAIT)
        self.bodies[inv.message_id] = body
        return inv.message_id


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[State]:
    """A running store with five invoices under two keys, one held for review, and audit records."""
    s = State(tmp_path / "state", SqliteStore(tmp_path / "state"))
    await s.put("1", Vault([OLD]))
    await s.put("2", Vault([OLD]))
    await s.put("3")
    await s.put("4", partner="beta")
    await s.put("5", holds=("amount above the ceiling",))  # quarantined: an audit record
    await s.store.audit.append("operator", "test.note", "acme", None, {"why": "backup test"})
    yield s
    await s.store.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def edit_manifest(folder: Path, **changes: object) -> None:
    path = folder / backup.MANIFEST
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


async def test_backup_verify_restore_round_trip(state: State, tmp_path: Path) -> None:
    dest = tmp_path / "backups" / "b1"
    manifest = backup.create(SNAPSHOTS, state.dir, dest)  # the store stays open: the daemon keeps running

    assert sorted(p.name for p in dest.iterdir()) == ["gateway.db", "manifest.json"]
    assert (mode(dest), mode(dest / "gateway.db"), mode(dest / "manifest.json")) == (0o700, 0o600, 0o600)
    assert json.loads((dest / "manifest.json").read_text()) == manifest
    assert manifest["format"] == "einvoice-gateway-backup/2" and manifest["gateway_version"] == __version__
    assert manifest["created_at"].endswith("Z") and manifest["schema_version"] == SCHEMA_VERSION
    assert "not included" in manifest["master_keys"]
    audit = await state.store.audit.newest()
    assert manifest["counts"] == {"invoices": 5, "blobs": 5, "deliveries": 5, "audit": len(audit)}
    assert manifest["key_ids"] == {"k-old": 2, "k-new": 3}
    assert manifest["last_audit_seq"] == audit[0].seq
    data = (dest / "gateway.db").read_bytes()
    assert manifest["files"] == {"gateway.db": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    assert CANARY.encode() not in data  # the snapshot holds sealed invoices only

    assert backup.verify(SNAPSHOTS, dest) == []
    assert backup.verify(SNAPSHOTS, dest, state.vault) == []  # every sealed invoice opens

    restored_dir = tmp_path / "restored"
    assert backup.restore(SNAPSHOTS, dest, restored_dir).manifest == manifest
    assert sorted(p.name for p in restored_dir.iterdir()) == ["gateway.db"]
    assert (mode(restored_dir), mode(restored_dir / "gateway.db")) == (0o700, 0o600)
    restored = SqliteStore(restored_dir)
    try:
        for message_id, body in state.bodies.items():
            info = await restored.reports.message(message_id)
            assert info is not None and info == await state.store.reports.message(message_id)
            sealed_body = await restored.outbox.load_sealed(message_id)
            assert sealed_body is not None and state.vault.open(sealed_body, message_id, info.sha256) == body
        assert await restored.reports.counts() == await state.store.reports.counts()
        assert await restored.keys.usage() == manifest["key_ids"]
        assert await restored.audit.newest() == await state.store.audit.newest()
    finally:
        await restored.close()


def test_restore_into_an_existing_empty_folder(state: State, tmp_path: Path) -> None:
    backup.create(SNAPSHOTS, state.dir, tmp_path / "b")
    target = tmp_path / "empty"
    target.mkdir(mode=0o755)
    backup.restore(SNAPSHOTS, tmp_path / "b", target)
    assert mode(target) == 0o700 and (target / "gateway.db").is_file()


async def test_restore_refuses_a_folder_that_is_not_empty(state: State, tmp_path: Path) -> None:
    backup.create(SNAPSHOTS, state.dir, tmp_path / "b")
    with pytest.raises(ConfigError, match="not an empty folder.*move the current state aside"):
        backup.restore(SNAPSHOTS, tmp_path / "b", state.dir)  # e.g. over the live state
    assert (await state.store.reports.counts())["invoices"] == 5


def test_create_refuses_a_used_destination_and_a_folder_without_state(state: State, tmp_path: Path) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "other").write_text("x")
    with pytest.raises(ConfigError, match="not an empty folder"):
        backup.create(SNAPSHOTS, state.dir, used)
    assert [p.name for p in used.iterdir()] == ["other"]
    with pytest.raises(ConfigError, match="no gateway.db"):
        backup.create(SNAPSHOTS, tmp_path / "nowhere", tmp_path / "b")
    assert not (tmp_path / "b").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    backup.create(SNAPSHOTS, state.dir, empty)  # an empty folder will do
    assert backup.verify(SNAPSHOTS, empty) == []


def test_a_flipped_byte_is_reported_and_not_restored(state: State, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    backup.create(SNAPSHOTS, state.dir, dest)
    db = dest / "gateway.db"
    data = bytearray(db.read_bytes())
    data[len(data) // 2] ^= 0x01
    db.write_bytes(data)
    assert any("does not match the SHA-256" in p for p in backup.verify(SNAPSHOTS, dest))
    with pytest.raises(ConfigError, match="does not verify, nothing was restored.*SHA-256"):
        backup.restore(SNAPSHOTS, dest, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


def rehash(folder: Path) -> None:
    """Make the manifest agree with an edited gateway.db again (as a careless or malicious editor would)."""
    data = (folder / "gateway.db").read_bytes()
    edit_manifest(folder, files={"gateway.db": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}})


def test_a_damaged_database_is_reported_even_with_a_matching_manifest(state: State, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    backup.create(SNAPSHOTS, state.dir, dest)
    db = dest / "gateway.db"
    with sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'invoices'").fetchone()[0]
    conn.close()
    data = bytearray(db.read_bytes())
    start = (root - 1) * page_size + data[(root - 1) * page_size:root * page_size].index(next(iter(state.bodies)).encode())
    data[start] ^= 0x01  # one message id in the table row; its index entry still has the old one
    db.write_bytes(data)
    rehash(dest)
    problems = backup.verify(SNAPSHOTS, dest)
    assert problems and all("gateway.db fails PRAGMA integrity_check" in p for p in problems), problems
    with pytest.raises(ConfigError, match="integrity_check"):
        backup.restore(SNAPSHOTS, dest, tmp_path / "restored")
    damaged = tmp_path / "damaged-state"
    damaged.mkdir()
    shutil.copy(db, damaged / "gateway.db")
    with pytest.raises(ConfigError, match="the snapshot of .* is damaged"):  # a backup of a damaged state is refused
        backup.create(SNAPSHOTS, damaged, tmp_path / "b2")
    assert not (tmp_path / "b2").exists()
    (dest / "gateway.db").write_bytes(b"not a database" * 100)
    rehash(dest)
    assert backup.verify(SNAPSHOTS, dest) == ["gateway.db is damaged, or not a gateway database (file is not a database)"]


@pytest.mark.parametrize(("changes", "expected"), [
    ({"counts": {"invoices": 4, "blobs": 5, "deliveries": 5, "audit": 2}}, "counts.invoices = 4, the database 5"),
    ({"files": {"gateway.db": {"size": 1, "sha256": "0" * 64}}}, "does not match the SHA-256"),
    ({"key_ids": {"k-new": 5}}, "key_ids.k-old = None, the database 2"),
    ({"format": "einvoice-gateway-backup/3"}, "use the gateway version that made it"),
])
def test_an_edited_manifest_is_reported(state: State, tmp_path: Path, changes: dict[str, object], expected: str) -> None:
    dest = tmp_path / "b"
    backup.create(SNAPSHOTS, state.dir, dest)
    edit_manifest(dest, **changes)
    problems = backup.verify(SNAPSHOTS, dest)
    assert any(expected in p for p in problems), problems
    with pytest.raises(ConfigError, match="does not verify"):
        backup.restore(SNAPSHOTS, dest, tmp_path / "restored")


def test_missing_manifest_and_extra_files_are_reported(state: State, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    backup.create(SNAPSHOTS, state.dir, dest)
    (dest / "gateway.db-wal").write_bytes(b"")
    assert backup.verify(SNAPSHOTS, dest) == ["unexpected file 'gateway.db-wal' in the backup folder"]
    (dest / "manifest.json").unlink()
    assert backup.verify(SNAPSHOTS, dest) == ["manifest.json is missing: the backup is incomplete (interrupted?); make a new one"]
    with pytest.raises(ConfigError, match="manifest.json is missing"):
        backup.restore(SNAPSHOTS, dest, tmp_path / "restored")
    assert backup.verify(SNAPSHOTS, tmp_path / "nothing") == [
        f"{tmp_path / 'nothing'} is not a folder: name the folder a backup was made into"]


def test_a_vault_without_a_needed_key_is_reported(state: State, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    backup.create(SNAPSHOTS, state.dir, dest)
    assert backup.verify(SNAPSHOTS, dest, Vault([NEW])) == [
        "master key 'k-old' (needed by 2 invoices) is not in the vault: add its key file to vault.keys"]


def test_sealed_content_that_does_not_open_is_named_by_message_id(state: State, tmp_path: Path) -> None:
    a, b = list(state.bodies)[2:4]  # both under k-new
    with sqlite3.connect(state.store.path) as conn:  # swap their sealed objects: each is bound to its own message
        blobs = dict(conn.execute("SELECT message_id, sealed FROM blobs WHERE message_id IN (?, ?)", (a, b)).fetchall())
        conn.executemany("UPDATE blobs SET sealed = ? WHERE message_id = ?", [(blobs[b], a), (blobs[a], b)])
    conn.close()
    dest = tmp_path / "b"
    backup.create(SNAPSHOTS, state.dir, dest)
    assert backup.verify(SNAPSHOTS, dest) == []  # consistent as a database; only the keys tell
    problems = backup.verify(SNAPSHOTS, dest, state.vault)
    assert sorted(problems) == sorted(f"message {m}: its sealed content does not open (damaged, or sealed under another key)"
                                      for m in (a, b))
    assert not any(CANARY in p for p in problems)


def test_restore_refuses_a_backup_newer_than_this_gateway(state: State, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    backup.create(SNAPSHOTS, state.dir, dest)
    with sqlite3.connect(dest / "gateway.db") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    edit_manifest(dest, schema_version=99)
    rehash(dest)
    assert backup.verify(SNAPSHOTS, dest) == []
    with pytest.raises(ConfigError, match="schema 99, newer than this gateway"):
        backup.restore(SNAPSHOTS, dest, tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


def test_backups_taken_while_invoices_are_written_are_consistent(state: State, tmp_path: Path) -> None:
    started, errors = threading.Event(), []

    async def write() -> None:
        for i in range(200):
            await state.put(f"w{i}")
            if i == 20:
                started.set()

    def writer() -> None:  # the daemon's writes, on an event loop of their own
        try:
            asyncio.run(write())
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
            started.set()

    thread = threading.Thread(target=writer)
    thread.start()
    snapshots: list[tuple[Path, dict[str, int]]] = []
    try:
        assert started.wait(WAIT)
        while thread.is_alive() and len(snapshots) < 5:
            dest = tmp_path / f"b{len(snapshots)}"
            snapshots.append((dest, backup.create(SNAPSHOTS, state.dir, dest)["counts"]))
    finally:
        thread.join(60)
    assert not errors and not thread.is_alive()
    assert [c["invoices"] for _, c in snapshots] == sorted(c["invoices"] for _, c in snapshots)
    for dest, counts in snapshots:
        assert 5 + 21 <= counts["invoices"] == counts["blobs"] == counts["deliveries"] <= 5 + 200
        assert backup.verify(SNAPSHOTS, dest, state.vault) == []  # integrity ok, counts match, every sealed invoice opens
        with sqlite3.connect(f"{(dest / 'gateway.db').as_uri()}?mode=ro", uri=True) as conn:
            ids = {r[0] for r in conn.execute("SELECT message_id FROM invoices")}
            assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        conn.close()
        assert ids <= set(state.bodies)


# --- the instance's files -------------------------------------------------------------------------------


def small_instance(state: State, tmp_path: Path, big: int = 0) -> Inventory:
    """A configuration folder with a config file, a secret, and (``big`` bytes) a large file; its state is ``state``."""
    conf = tmp_path / "conf"
    (conf / "pki").mkdir(parents=True)
    os.chmod(conf / "pki", 0o750)
    (conf / "config.toml").write_text('# the configuration\n[instance]\n# where\n\n[https]\nlisten_port = 0\n')
    (conf / "pki" / "server.key").write_bytes(b"secret key")
    os.chmod(conf / "pki" / "server.key", 0o600)
    items = [Item("source", conf / "config.toml", CONFIGURATION), Item("https.private_key", conf / "pki" / "server.key", SECRET)]
    if big:
        with (conf / "big.crl").open("wb") as fh:
            fh.truncate(big)
        items.append(Item("operations.crls[0]", conf / "big.crl", FILE))
    return Inventory(conf, state.dir, tuple(items), (Item("destinations[0].path", tmp_path / "inbox", ERP_FOLDER),), ())


def test_instance_files_round_trip_with_modes_and_a_new_state_folder(state: State, tmp_path: Path) -> None:
    inv = small_instance(state, tmp_path)
    (tmp_path / "inbox").mkdir(mode=0o750)
    os.chmod(tmp_path / "inbox", 0o2750)
    dest = tmp_path / "b"
    manifest = backup.create(SNAPSHOTS, state.dir, dest, instance=inv)
    stored = {f["path"]: f for f in manifest["instance"]["files"]}
    assert stored["pki/server.key"] == {"key": "https.private_key", "kind": "secret", "base": "config",
                                        "path": "pki/server.key", "stored": "files/config/pki/server.key", "size": 10,
                                        "sha256": hashlib.sha256(b"secret key").hexdigest(), "mode": "0600",
                                        "owner": "root", "group": "root"}
    assert mode(dest / "files" / "config" / "config.toml") == 0o600
    assert {(f["path"], f["mode"]) for f in manifest["instance"]["folders"]} >= {(".", f"{mode(inv.config_dir):04o}"),
                                                                                 ("pki", "0750")}
    [inbox] = [f for f in manifest["instance"]["folders"] if f["kind"] == ERP_FOLDER]
    assert (inbox["base"], inbox["mode"]) == ("root", "2750")  # outside the configuration's folder: absolute
    assert backup.verify(SNAPSHOTS, dest) == []

    shutil.rmtree(tmp_path / "inbox")
    new_conf, new_state = tmp_path / "new" / "conf", tmp_path / "new" / "state"
    done = backup.restore(SNAPSHOTS, dest, new_state, config_dir=new_conf)
    assert (done.config, done.state_dir, done.files) == (new_conf / "config.toml", new_state, 2)
    assert (new_conf / "pki" / "server.key").read_bytes() == b"secret key" and mode(new_conf / "pki" / "server.key") == 0o600
    assert mode(new_conf / "pki") == 0o750 and mode(tmp_path / "inbox") == 0o2750
    # The configuration had no state_dir line: one is added in [instance], the comments stay.
    text = (new_conf / "config.toml").read_text()
    assert text == f'# the configuration\n[instance]\nstate_dir = "{new_state}"\n# where\n\n[https]\nlisten_port = 0\n'


def test_damage_to_the_instance_files_is_reported(state: State, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    backup.create(SNAPSHOTS, state.dir, dest, instance=small_instance(state, tmp_path))
    key = dest / "files" / "config" / "pki" / "server.key"
    os.chmod(key, 0o644)
    (dest / "files" / "config" / "extra.pem").write_text("x")
    assert backup.verify(SNAPSHOTS, dest) == [
        "files/config/pki/server.key is readable by others than its owner (mode 0644); run chmod 600 on it",
        "unexpected file 'files/config/extra.pem' in the backup folder"]
    key.unlink()
    assert "files/config/pki/server.key (https.private_key) is missing" in backup.verify(SNAPSHOTS, dest)


@pytest.mark.parametrize(("field", "value"), [("path", "../../etc/passwd"), ("stored", "files/../../x"), ("mode", "4755"),
                                              ("base", "elsewhere")])
def test_an_instance_section_this_gateway_did_not_write_is_refused(state: State, tmp_path: Path, field: str,
                                                                    value: str) -> None:
    dest = tmp_path / "b"
    manifest = backup.create(SNAPSHOTS, state.dir, dest, instance=small_instance(state, tmp_path))
    manifest["instance"]["files"][1][field] = value
    edit_manifest(dest, instance=manifest["instance"])
    assert backup.verify(SNAPSHOTS, dest) == [
        "manifest.json: its instance section is not one this gateway wrote (edited?); make a new backup"]
    with pytest.raises(ConfigError, match="does not verify, nothing was restored"):
        backup.restore(SNAPSHOTS, dest, config_dir=tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_large_copy_reports_its_bytes(state: State, tmp_path: Path) -> None:
    seen: list[tuple[str, int, int | None, bool]] = []

    def tick(what: str, done: int, total: int | None = None, *, size: bool = False) -> None:
        seen.append((what, done, total, size))

    big = 20 * backup.CHUNK
    backup.create(SNAPSHOTS, state.dir, tmp_path / "b", instance=small_instance(state, tmp_path, big), tick=tick)
    copying = [s for s in seen if s[0] == "copying big.crl"]
    assert len(copying) == 20 and copying[-1] == ("copying big.crl", big, big, True)
    assert [d for _, d, _, _ in copying] == sorted(d for _, d, _, _ in copying)
    assert ("copying the instance's files", 3, 3, False) in seen and ("snapshot of the database", 1, 1, False) in seen
    assert not any(s[0] == "copying config.toml" for s in seen)  # small files: counted, not measured


async def test_overwrite_replaces_the_database_and_drops_its_leftovers(state: State, tmp_path: Path) -> None:
    dest = tmp_path / "b"
    backup.create(SNAPSHOTS, state.dir, dest, instance=small_instance(state, tmp_path))
    await state.put("after-the-backup")
    await state.store.close()
    (state.dir / "gateway.db-wal").write_bytes(b"stale")
    with pytest.raises(ConfigError, match=r"an instance is in the way, nothing was restored: .*state \(a state folder that is not empty\)"):
        backup.restore(SNAPSHOTS, dest)
    done = backup.restore(SNAPSHOTS, dest, overwrite=True)
    assert done.state_dir == state.dir and not (state.dir / "gateway.db-wal").exists()
    state.store = SqliteStore(state.dir)
    assert (await state.store.reports.counts())["invoices"] == 5  # as backed up


def test_the_state_folder_and_database_get_their_owner_back(state: State, tmp_path: Path) -> None:
    """Restored as root, the state belongs to whom it belonged (the service's user and group), not to root."""
    with os_group("gwstate") as (_, gid):
        os.chown(state.dir, -1, gid)
        dest = tmp_path / "b"
        manifest = backup.create(SNAPSHOTS, state.dir, dest, instance=small_instance(state, tmp_path))
        assert manifest["instance"]["state_dir"]["group"].startswith("gwstate")
        new_state = tmp_path / "new" / "state"
        backup.restore(SNAPSHOTS, dest, new_state, config_dir=tmp_path / "new" / "conf")
        for path, wanted in ((new_state, 0o700), (new_state / "gateway.db", 0o600)):
            assert (path.stat().st_gid, mode(path)) == (gid, wanted), path
