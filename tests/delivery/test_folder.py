"""The outbox with a directory destination: a real store and vault, a fake clock and no sleeping."""

from __future__ import annotations

import hashlib
import io
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

from gateway import files, logs
from gateway.cli.demo import SAMPLE
from gateway.config.model import DeliveryConfig, Destination
from gateway.delivery.folder import DirectorySender, access_warnings
from gateway.delivery.outbox import Outbox
from gateway.delivery.sender import DeliveryFailed
from gateway.storage.sqlite.store import SqliteStore
from gateway.vault import MasterKey, Vault
from tests.helpers import SetTime, audit_of, numbered, os_group
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


@pytest.fixture(params=["syncfs", "fsync"])
def sync_method(request, monkeypatch) -> str:
    """Each way a batch is made durable: one syncfs (where the C library has it), or an fsync of each file."""
    if request.param == "fsync":
        monkeypatch.setattr(files, "_libc_syncfs", lambda: None)
    elif files.sync_method() != "syncfs":
        pytest.fail("syncfs(2) is not available here: the fallback alone is tested") if os.environ.get("CI") == "true" \
            else pytest.skip("syncfs(2) is not available here")
    return request.param


class Syncs:
    """Counts the syncs of a batch (syncfs calls, fsyncs) and fails the one numbered ``fail_at`` with EIO."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_at: int = 0):
        self.syncfs = self.fsync = 0
        self.fail_at = fail_at
        real_syncfs, real_fsync = files.syncfs, os.fsync

        def syncfs(fd: int) -> None:
            self.syncfs += 1
            self._maybe_fail()
            real_syncfs(fd)

        def fsync(fd: int) -> None:
            self.fsync += 1
            self._maybe_fail()
            real_fsync(fd)

        monkeypatch.setattr(files, "syncfs", syncfs)
        monkeypatch.setattr(os, "fsync", fsync)

    def _maybe_fail(self) -> None:
        if self.syncfs + self.fsync == self.fail_at:
            raise OSError(5, "Input/output error")


async def test_a_failed_sync_leaves_no_visible_file(env, monkeypatch, sync_method):
    """The first sync fails (syncfs of the batch, or the sidecar's fsync): nothing gets its real name, and
    no dot-file stays behind; the job is retried and then delivered."""
    mid = await env.accept()
    after_creation(env, mid)
    Syncs(monkeypatch, fail_at=1)
    await env.deliverer.run_once()
    assert env.files() == []
    job = env.job(mid)
    assert job["state"] == "pending" and job["attempts"] == 1 and "Input/output error" in job["last_error"]
    env.clock.now = job["next_attempt_at"]
    assert await env.deliverer.run_once() == 1
    assert env.files() == [f"{mid}.json", f"{mid}.xml"]
    assert env.job(mid)["state"] == "delivered"


async def test_a_batch_is_made_durable_with_one_sync_and_one_folder_fsync(env, monkeypatch, sync_method):
    mids = [await env.accept(numbered(f"ONE-SYNC-{n}")) for n in range(5)]
    after_creation(env, mids[-1])
    syncs = Syncs(monkeypatch)
    assert await env.deliverer.run_once() == 5
    assert env.files() == sorted(f"{mid}.{ext}" for mid in mids for ext in ("json", "xml"))
    assert all(env.job(mid)["state"] == "delivered" for mid in mids)
    if sync_method == "syncfs":
        assert (syncs.syncfs, syncs.fsync) == (1, 1)  # the file system once, then the folder
    else:
        assert (syncs.syncfs, syncs.fsync) == (0, 2 * 5 + 1)  # each file, then the folder once
    delivered = await audit_of(env.store, "delivery.delivered")
    assert sorted(r["message_id"] for r in delivered) == sorted(mids)


async def test_a_file_that_cannot_be_written_fails_its_own_job_only(env, sync_method):
    """One document's name is taken by a folder: that job is retried with a reason naming the file; the
    others of its batch are delivered."""
    mids = [await env.accept(numbered(f"ONE-FAILS-{n}")) for n in range(3)]
    after_creation(env, mids[-1])
    (env.outbox / f"{mids[1]}.xml").mkdir()
    assert await env.deliverer.run_once() == 3
    for mid in (mids[0], mids[2]):
        assert env.job(mid)["state"] == "delivered"
        assert (env.outbox / f"{mid}.xml").read_bytes() == numbered(f"ONE-FAILS-{mids.index(mid)}")
    failed = env.job(mids[1])
    assert (failed["state"], failed["attempts"]) == ("pending", 1)
    assert failed["last_error"] == f"cannot write {mids[1]}.xml in {env.outbox}: Is a directory"
    assert not [name for name in env.files() if name.startswith(".")]  # its temporary document was removed
    status = await env.store.intake.status(mids[1], "acme")
    assert status is not None and status.status == "accepted"
    (env.outbox / f"{mids[1]}.xml").rmdir()  # the operator moves the folder away
    env.clock.now = failed["next_attempt_at"]
    assert await env.deliverer.run_once() == 1
    assert env.job(mids[1])["state"] == "delivered"
    assert (env.outbox / f"{mids[1]}.xml").read_bytes() == numbered("ONE-FAILS-1")


def test_the_sync_method_is_said_when_the_sender_is_built(tmp_path, monkeypatch, sync_method):
    stream = io.StringIO()
    logs.configure("info", stream)
    try:
        folder_sender(tmp_path)
    finally:
        logs.configure("info")
    [line] = [json.loads(line) for line in stream.getvalue().splitlines() if "delivery.folder_sync" in line]
    assert (line["destination"], line["path"], line["method"]) == ("erp", str(tmp_path), sync_method)


class Crash(BaseException):
    """The process dies here (a BaseException: nothing on the way handles it as a failure)."""


@pytest.mark.parametrize("crash_at", [1, 4])
async def test_a_crash_between_the_sync_and_the_renames_is_redelivered(env, monkeypatch, crash_at):
    """The batch's files are durable under their dot-names; the process dies at the first rename (nothing
    visible yet) or at the fourth (the first job's two files and the second's sidecar visible).  Nothing
    is cleaned up, as after a SIGKILL.  Every name visible holds a whole file; nothing was recorded
    delivered, so after the restart every job is delivered again: the same names with the same bytes."""
    bodies = {await env.accept(numbered(f"CRASH-{n}")): numbered(f"CRASH-{n}") for n in range(3)}
    after_creation(env, list(bodies)[-1])
    renames: list[str] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        renames.append(Path(dst).name)
        if len(renames) == crash_at:
            raise Crash
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(files, "_discard", lambda written: None)  # a killed process removes nothing
    await env.deliverer.run_once()
    monkeypatch.undo()
    visible = [name for name in env.files() if not name.startswith(".")]
    assert visible == sorted(renames[:crash_at - 1])
    for name in visible:  # whole files only
        mid, ext = name.rsplit(".", 1)
        if ext == "xml":
            assert (env.outbox / name).read_bytes() == bodies[mid]
        else:
            assert json.loads((env.outbox / name).read_text())["message_id"] == mid
    assert all(env.job(mid)["state"] == "pending" and env.job(mid)["attempts"] == 0 for mid in bodies)
    await env.store.outbox.release("test")  # the restarted node takes back its own leases (Outbox.run)
    assert await env.deliverer.run_once() == 3
    assert [name for name in env.files() if not name.startswith(".")] == \
        sorted(f"{mid}.{ext}" for mid in bodies for ext in ("json", "xml"))
    for mid, body in bodies.items():
        assert (env.outbox / f"{mid}.xml").read_bytes() == body
        assert env.job(mid)["state"] == "delivered"
    stray = [name for name in env.files() if name.startswith(".")]
    assert all(name.endswith(".tmp") for name in stray) and len(stray) == 2 * 3 - (crash_at - 1)


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
