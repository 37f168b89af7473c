"""The outbox with a directory destination: a real store and vault, a fake clock and no sleeping."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.cli.demo import SAMPLE
from gateway.config.model import DeliveryConfig, Destination
from gateway.delivery.folder import DirectorySender, access_warnings
from gateway.delivery.outbox import Outbox
from gateway.delivery.sender import DeliveryFailed
from gateway.storage.sqlite.store import SqliteStore
from gateway.vault import MasterKey, Vault
from tests.helpers import SetTime, os_group
from tests.helpers.outbox import committed_row, stored

HORIZON_S = 3600.0
CFG = DeliveryConfig(horizon_s=HORIZON_S)
RETRY_BASE_S, RETRY_CAP_S = CFG.retry_base_s, CFG.retry_cap_s


@dataclass
class Env:
    store: SqliteStore
    vault: Vault
    outbox: Path
    clock: SetTime
    deliverer: Outbox

    async def accept(self, body: bytes = SAMPLE) -> str:
        return await stored(self.store, self.vault, body, str(uuid.uuid4()))

    def sql(self, query: str, *args: Any) -> Any:
        return committed_row(self.store, query, *args)

    def job(self, message_id: str) -> dict[str, Any]:
        row = self.sql("SELECT state, attempts, created_at, next_attempt_at, last_error FROM deliveries WHERE message_id = ?",
                       message_id)
        return dict(zip(("state", "attempts", "created_at", "next_attempt_at", "last_error"), row, strict=True))

    def files(self) -> list[str]:
        return sorted(os.listdir(self.outbox))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    store = SqliteStore(tmp_path / "state")
    vault = Vault([MasterKey("k1", "", os.urandom(32))])
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    clock = SetTime(0.0)
    executor = ThreadPoolExecutor(2)
    sender = DirectorySender(Destination("erp", "directory", outbox), executor)
    deliverer = Outbox(store.outbox, vault, {"erp": sender}, CFG, executor, owner="test", clock=clock)
    e = Env(store, vault, outbox, clock, deliverer)
    yield e
    executor.shutdown(wait=True)
    await store.close()


def after_creation(env: Env, message_id: str, seconds: float = 1.0) -> None:
    env.clock.now = env.job(message_id)["created_at"] + seconds


async def test_delivers_json_then_xml_atomically(env, monkeypatch):
    mid = await env.accept()
    after_creation(env, mid)
    renames: list[tuple[str, str]] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        renames.append((Path(src).name, Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)  # as the folder sender (gateway/files.py) calls it
    assert await env.deliverer.run_once() == 1
    assert [dst for _, dst in renames] == [f"{mid}.json", f"{mid}.xml"]
    for src, dst in renames:  # written under a hidden, unique temporary name first
        assert src.startswith(f".{dst}.") and src.endswith(".tmp")
    assert env.files() == [f"{mid}.json", f"{mid}.xml"]  # nothing else, no .tmp left
    assert (env.outbox / f"{mid}.xml").read_bytes() == SAMPLE
    meta = json.loads((env.outbox / f"{mid}.json").read_text())
    assert (meta["message_id"], meta["sha256"], meta["partner"]) == (mid, hashlib.sha256(SAMPLE).hexdigest(), "acme")
    assert env.job(mid)["state"] == "delivered" and env.job(mid)["attempts"] == 1
    assert await env.deliverer.run_once() == 0


async def test_a_failed_write_leaves_no_partial_file(env, monkeypatch):
    mid = await env.accept()
    after_creation(env, mid)
    calls = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:  # the .xml file's fsync
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await env.deliverer.run_once()
    assert env.files() == [f"{mid}.json"]  # the sidecar may be there; no .xml, no .tmp
    job = env.job(mid)
    assert job["state"] == "pending" and job["attempts"] == 1 and "Input/output error" in job["last_error"]
    env.clock.now = job["next_attempt_at"]
    assert await env.deliverer.run_once() == 1
    assert env.files() == [f"{mid}.json", f"{mid}.xml"]
    assert env.job(mid)["state"] == "delivered"


def break_missing(outbox: Path) -> None:
    outbox.rmdir()


def break_read_only(outbox: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders; the missing and not-a-folder cases cover the retry path")
    outbox.chmod(0o500)


def break_not_a_folder(outbox: Path) -> None:
    outbox.rmdir()
    outbox.write_bytes(b"")


def repair(outbox: Path) -> None:
    if outbox.is_file():
        outbox.unlink()
    outbox.mkdir(exist_ok=True)
    outbox.chmod(0o700)


@pytest.mark.parametrize("damage", [break_missing, break_read_only, break_not_a_folder])
async def test_unwritable_folder_is_retried_later(env, damage):
    mid = await env.accept()
    after_creation(env, mid)
    damage(env.outbox)
    for attempt in (1, 2):
        start = env.clock.now
        assert await env.deliverer.run_once() == 1
        job = env.job(mid)
        assert (job["state"], job["attempts"]) == ("pending", attempt)
        assert start + RETRY_BASE_S / 2 <= job["next_attempt_at"] <= start + RETRY_CAP_S
        assert job["last_error"]
        assert await env.deliverer.run_once() == 0  # not due yet
        env.clock.now = job["next_attempt_at"]
    repair(env.outbox)
    assert await env.deliverer.run_once() == 1
    assert env.job(mid)["state"] == "delivered"
    assert (env.outbox / f"{mid}.xml").read_bytes() == SAMPLE


async def test_past_the_horizon_is_dead_letter(env):
    mid = await env.accept()
    env.outbox.rmdir()
    after_creation(env, mid, HORIZON_S + 1)
    assert await env.deliverer.run_once() == 1
    job = env.job(mid)
    assert (job["state"], job["attempts"]) == ("dead", 1)
    status = await env.store.intake.status(mid, "acme")
    assert status is not None and status.status == "dead-letter"
    env.outbox.mkdir()
    env.clock.now += 10 * HORIZON_S
    assert await env.deliverer.run_once() == 0  # parked, never retried nor dropped
    assert env.files() == []


@pytest.mark.parametrize("offset", [0, 4, 5, 30, 60, -17, -1])
async def test_tampered_blob_is_dead_letter_never_delivered(env, offset):
    mid = await env.accept()
    after_creation(env, mid)
    stored = await env.store.outbox.load_sealed(mid)
    assert stored is not None
    sealed = bytearray(stored)
    sealed[offset] ^= 0x01
    env.sql("UPDATE blobs SET sealed = ? WHERE message_id = ?", bytes(sealed), mid)
    assert await env.deliverer.run_once() == 1
    assert env.job(mid)["state"] == "dead"
    assert env.files() == []
    env.clock.now += 10 * HORIZON_S
    assert await env.deliverer.run_once() == 0


async def test_redelivery_rewrites_the_same_names_with_the_same_bytes(env):
    mid = await env.accept()
    after_creation(env, mid)
    await env.deliverer.run_once()
    first = {name: ((env.outbox / name).read_bytes(), (env.outbox / name).stat().st_ino) for name in env.files()}
    assert set(first) == {f"{mid}.json", f"{mid}.xml"}
    # As if the gateway crashed after writing but before recording the delivery.
    env.sql("UPDATE deliveries SET state = 'pending', delivered_at = NULL WHERE message_id = ?", mid)
    assert await env.deliverer.run_once() == 1
    assert env.files() == sorted(first)
    for name, (data, inode) in first.items():
        assert (env.outbox / name).read_bytes() == data
        assert (env.outbox / name).stat().st_ino != inode  # really written again, not left alone
    assert (env.job(mid)["state"], env.job(mid)["attempts"]) == ("delivered", 2)
    assert await env.deliverer.run_once() == 0


# --- the ERP's group and the files' mode (destinations[].group, .mode) -----------------------------


@pytest.fixture
def erp_group() -> Iterator[tuple[str, int]]:
    with os_group("gwerp") as group:
        yield group


def folder_sender(folder: Path, **options: Any) -> DirectorySender:
    return DirectorySender(Destination("erp", "directory", folder, **options), ThreadPoolExecutor(1))


def facts_of(media_type: str = "application/xml") -> Any:
    return type("Facts", (), {"media_type": media_type, "as_json": lambda self: {"message_id": "m-1"}})()


def test_the_group_owns_the_folder_and_every_file(tmp_path, erp_group):
    name, gid = erp_group
    folder = tmp_path / "inbox"
    folder.mkdir(mode=0o700)
    sender = folder_sender(folder, group=name)
    sender.write("m-1", SAMPLE, facts_of())
    st = folder.stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o2770)  # setgid: new files get the group from the kernel
    for f in ("m-1.json", "m-1.xml"):
        fs = (folder / f).stat()
        assert (fs.st_gid, stat.S_IMODE(fs.st_mode)) == (gid, 0o640), f
    (folder / "stray").write_bytes(b"x")  # made by someone else in the setgid folder: the group too
    assert (folder / "stray").stat().st_gid == gid


def test_a_file_whose_group_differs_is_given_the_group(tmp_path, erp_group):
    """Without the setgid bit (someone removed it after the start), each file is chowned itself."""
    name, gid = erp_group
    folder = tmp_path / "inbox"
    folder.mkdir()
    sender = folder_sender(folder, group=name, mode=0o600)
    sender.prepare()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o2700
    os.chmod(folder, 0o700)
    sender.write("m-1", SAMPLE, facts_of())
    fs = (folder / "m-1.xml").stat()
    assert (fs.st_gid, stat.S_IMODE(fs.st_mode)) == (gid, 0o600)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700  # the folder was prepared once, at the first write


def test_without_a_group_the_folder_keeps_its_group_and_setgid_bit(tmp_path, erp_group, monkeypatch):
    """As tmpfiles.d leaves the systemd layout's inbox (2770, group einvoice-erp): the daemon changes nothing."""
    _, gid = erp_group
    folder = tmp_path / "inbox"
    folder.mkdir()
    os.chown(folder, -1, gid)
    os.chmod(folder, 0o2770)
    changes: list[Any] = []
    real_chmod, real_chown = os.chmod, os.chown
    monkeypatch.setattr(os, "chmod", lambda *a, **k: changes.append(a) or real_chmod(*a, **k))
    monkeypatch.setattr(os, "chown", lambda *a, **k: changes.append(a) or real_chown(*a, **k))
    folder_sender(folder).write("m-1", SAMPLE, facts_of("application/pdf"))
    assert changes == [] and folder.stat().st_mode & 0o7777 == 0o2770
    fs = (folder / "m-1.pdf").stat()
    assert (fs.st_gid, stat.S_IMODE(fs.st_mode)) == (gid, 0o640)


async def test_a_group_that_does_not_exist_is_a_transient_failure_naming_it(tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    sender = folder_sender(folder, group="no-such-group-7f3a")
    with pytest.raises(DeliveryFailed, match="'no-such-group-7f3a'.*does not exist: create it"):
        sender.write("m-1", SAMPLE, facts_of())
    assert os.listdir(folder) == []


@pytest.fixture
def searchable() -> Iterator[Path]:
    """A folder every user may search, in a path every user may search (pytest's tmp_path is below a 0700 one)."""
    path = Path(tempfile.mkdtemp(prefix="gw-erp-"))
    os.chmod(path, 0o755)
    assert all(p.stat().st_mode & 0o001 for p in path.parents)
    yield path
    shutil.rmtree(path)


def test_access_warnings_name_the_directory_and_the_fix(searchable, erp_group):
    name, gid = erp_group
    state = searchable / "state"
    inbox = state / "inbox"
    inbox.mkdir(parents=True)
    os.chmod(state, 0o700)  # the systemd layout's private state directory
    os.chmod(inbox, 0o700)
    dest = Destination("erp", "directory", inbox, group=name)
    warnings = access_warnings(dest, "destinations[0]")
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"destinations[0].path: {inbox} (mode 0700, group root) does not let the group "
                                  f"'{name}' read it and remove what it took yet")
    assert f"chgrp {name} {inbox} && chmod 2770 {inbox}" in warnings[0]
    assert warnings[1].startswith(f"destinations[0].path: {state} (mode 0700, group root) does not let the group "
                                  f"'{name}' search it") and f"chmod g+x {state}" in warnings[1]
    os.chown(state, -1, gid)
    os.chmod(state, 0o710)
    folder_sender(inbox, group=name).prepare()
    assert access_warnings(dest, "destinations[0]") == []
    os.chown(state, -1, 0)
    os.chmod(state, 0o701)  # "others" may search: so may the group's members
    assert access_warnings(dest, "destinations[0]") == []
    assert access_warnings(Destination("erp", "directory", inbox), "destinations[0]") == []  # no group: nothing to check
    gone = access_warnings(Destination("erp", "directory", inbox, group="no-such-group-7f3a"), "destinations[0]")
    assert gone == ["destinations[0].group: the group 'no-such-group-7f3a' does not exist, so the ERP cannot read "
                    f"{inbox}: create it (groupadd no-such-group-7f3a) and add the ERP's account to it "
                    "(usermod -aG no-such-group-7f3a ERP-USER)"]
