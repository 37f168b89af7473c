"""Master key rotation on a live instance: ``keys list|rotate|rewrap|retire`` beside an in-process gateway.

The commands run in-process (``cli.main``) on the instance's own configuration, as an operator runs them
beside the daemon; the daemon picks the new key up on ``reload()``.  What must hold throughout: every
accepted invoice stays in the store and opens with the configured keys, new invoices are sealed under the
newest key once the daemon has reloaded, and every step is in the audit log with who did it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import sqlite3
import stat
import threading
import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from gateway import logs
from gateway.cli import common as clicommon
from gateway.cli import keys as keyscli
from gateway.cli import main as cli
from gateway.config import load as config_mod
from gateway.config.model import Config
from gateway.operations import audit
from gateway.operations.instance import Instance
from gateway.storage.records import Resealed
from gateway.storage.sqlite.keys import SqliteKeys
from gateway.storage.sqlite.store import SqliteStore
from gateway.vault import Vault, read_key_file
from tests.helpers import Running, eventually, numbered, post, put_invoices, run_command, run_process, serving, table_rows

WAIT_S = 20.0


def keys_cmd(capsys: pytest.CaptureFixture[str], inst: Instance, *argv: str) -> tuple[int, str, str]:
    return run_command(capsys, "keys", *argv, "-c", str(inst.config))


def listed(capsys: pytest.CaptureFixture[str], inst: Instance) -> list[dict[str, str]]:
    """``keys list``: the table's rows, checked against ``keys list --json``."""
    code, out, err = keys_cmd(capsys, inst, "list")
    assert code == 0, err
    rows = table_rows(out)
    code, out, err = keys_cmd(capsys, inst, "list", "--json")
    assert code == 0, err
    assert [(r["key_id"], str(r["objects"])) for r in json.loads(out)] == [(r["KEY ID"], r["OBJECTS"]) for r in rows]
    return rows


@pytest.fixture
async def gateway(inst: Instance) -> AsyncIterator[Running]:
    """conftest's gateway, its log lines kept off stdout (the commands' output is read from there)."""
    try:
        async with serving(inst, "info", io.StringIO()) as running:
            yield running
    finally:
        logs.configure("warning")


@pytest.fixture
def actor(monkeypatch: pytest.MonkeyPatch) -> str:
    """What the commands record when no --by is given: the OS account (``$USER`` plays no part)."""
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setenv("USER", "operator-erin")
    return f"cli:{clicommon.current_user()}"


def by(name: str) -> str:
    """What the commands record for ``--by NAME``: the OS account, the name beside it."""
    return clicommon.actor(name)


@dataclasses.dataclass
class Sent:
    bodies: dict[str, bytes] = dataclasses.field(default_factory=dict)  # message id → document

    async def post(self, session: aiohttp.ClientSession, body: bytes) -> str:
        status, reply = await post(session, body)
        assert status == 202, reply
        assert reply["sha256"] == hashlib.sha256(body).hexdigest() and reply["duplicate"] is False
        self.bodies[reply["message_id"]] = body
        return str(reply["message_id"])


def stored(inst: Instance) -> dict[str, tuple[str, str, bytes]]:
    """message id → (key id, sha256, sealed object), read with a connection of our own (what is committed)."""
    with contextlib.closing(sqlite3.connect(inst.state_dir / "gateway.db")) as conn:
        return {r[0]: (r[1], r[2], bytes(r[3])) for r in conn.execute(
            "SELECT i.message_id, i.key_id, i.sha256, b.sealed FROM invoices i JOIN blobs b USING (message_id)")}


def configured_vault(inst: Instance) -> Vault:
    cfg = config_mod.load(inst.config)
    return Vault.from_files(cfg.vault.keys, cfg.vault.current)


def assert_all_open(inst: Instance, sent: Sent) -> dict[str, int]:
    """Every invoice sent is stored and opens, with the keys the configuration names now, to what was sent.
    Returns how many objects each key seals."""
    vault, rows = configured_vault(inst), stored(inst)
    assert set(rows) == set(sent.bodies)
    usage: dict[str, int] = {}
    for message_id, (key_id, sha256, sealed) in rows.items():
        assert vault.key_id_of(sealed) == key_id
        assert vault.open(sealed, message_id, sha256) == sent.bodies[message_id]
        usage[key_id] = usage.get(key_id, 0) + 1
    return usage


async def delivered(running: Running, sent: Sent) -> None:
    """Wait until everything sent was delivered, then compare the ERP inbox with what was sent."""
    store = running.gw.store

    async def all_delivered() -> bool:
        return await store.reports.counts() == {"invoices": len(sent.bodies), "deliveries_delivered": len(sent.bodies)}

    await eventually(all_delivered, "everything sent to be delivered", WAIT_S)
    for message_id, body in sent.bodies.items():
        assert (running.inst.delivery_folder / f"{message_id}.xml").read_bytes() == body


def audit_rows(inst: Instance, *actions: str) -> list[dict[str, Any]]:
    """The audit records of several actions in one sequence (tests.helpers.audit_of reads one action through
    the store), read with a connection of our own."""
    with contextlib.closing(sqlite3.connect(inst.state_dir / "gateway.db")) as conn:
        rows = [dict(zip(("seq", "actor", "action", "detail"), r, strict=True)) | {"detail": json.loads(r[3])}
                for r in conn.execute("SELECT seq, actor, action, detail FROM audit ORDER BY seq")]
    return [r for r in rows if r["action"] in actions]


def rotate(capsys: pytest.CaptureFixture[str], inst: Instance, *extra: str) -> tuple[str, Path]:
    code, out, err = keys_cmd(capsys, inst, "rotate", *extra)
    assert code == 0, err
    first = out.splitlines()[0]
    assert first.startswith("new master key ") and "(mode 0600)" in first, out
    key_id = first.split()[3]
    path = Path(first.split(" written to ")[1].split(" (mode")[0])
    return key_id, path


# --- the whole life of a key ------------------------------------------------------------------------------


async def test_rotate_reload_rewrap_retire(gateway: Running, client, capsys: pytest.CaptureFixture[str], actor: str) -> None:
    inst, gw = gateway.inst, gateway.gw
    old = inst.key_id
    sent = Sent()
    s = client()
    for n in range(3):
        await sent.post(s, numbered(f"KEYS-{n:05d}"))

    assert await asyncio.to_thread(listed, capsys, inst) == [
        {"KEY ID": old, "CREATED": configured_vault(inst).created(old), "OBJECTS": "3", "STATE": "current",
         "FILE": str(inst.master_key)}]

    # Rotate: a new 0600 key file in the keys folder, newest, so current for the next reader of the configuration.
    new, path = await asyncio.to_thread(rotate, capsys, inst, "--by", "alice")
    assert path.parent == inst.root / "keys" and path.suffix == ".key" and path != inst.master_key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(path, "test").key_id == new != old
    rows = await asyncio.to_thread(listed, capsys, inst)
    assert [(r["KEY ID"], r["OBJECTS"], r["STATE"]) for r in rows] == [(old, "3", "-"), (new, "0", "current")]

    # The running daemon seals with the key it loaded until it reloads.
    await sent.post(s, numbered("KEYS-00003"))
    assert await gw.store.keys.usage() == {old: 4}
    assert await gw.reload("bob") is True
    await sent.post(s, numbered("KEYS-00004"))
    assert await gw.store.keys.usage() == {old: 4, new: 1}

    # Retiring a key still needed, or the current key, is refused.
    code, _, err = await asyncio.to_thread(keys_cmd, capsys, inst, "retire", old)
    assert code == 2 and err.startswith("einvoice-gateway: refused: keys retire: 4 stored object(s) still need") and "keys rewrap" in err
    code, _, err = await asyncio.to_thread(keys_cmd, capsys, inst, "retire", new)
    assert code == 2 and err.startswith("einvoice-gateway: refused: ") and "is the current key" in err
    code, _, err = await asyncio.to_thread(keys_cmd, capsys, inst, "retire", "k-nonexistent")
    assert code == 2 and err.startswith("einvoice-gateway: not found: ") and "no configured key has the id" in err
    assert inst.master_key.is_file()

    # Rewrap: every object onto the new key; each still opens to what was sent.
    code, out, err = await asyncio.to_thread(keys_cmd, capsys, inst, "rewrap", "--by", "carol")
    assert code == 0, err
    assert out.startswith(f"4 object(s) re-sealed under {new}; no object needs an older key any more"), out
    assert await gw.store.keys.usage() == {new: 5}
    assert assert_all_open(inst, sent) == {new: 5}
    code, out, _ = await asyncio.to_thread(keys_cmd, capsys, inst, "rewrap")  # nothing left to do
    assert code == 0 and out.startswith(f"0 object(s) re-sealed under {new}"), out
    await delivered(gateway, sent)

    # Retire: the old file is renamed, no longer loaded; everything still opens, and the daemon reloads without it.
    code, out, err = await asyncio.to_thread(keys_cmd, capsys, inst, "retire", old)  # no --by: the current user
    assert code == 0, err
    assert not inst.master_key.exists() and inst.master_key.with_suffix(".retired").is_file()
    assert [r["KEY ID"] for r in await asyncio.to_thread(listed, capsys, inst)] == [new]
    assert configured_vault(inst).key_ids == [new]
    assert await gw.reload("bob") is True
    await sent.post(s, numbered("KEYS-00005"))
    assert await gw.store.keys.usage() == {new: 6}
    assert assert_all_open(inst, sent) == {new: 6}
    await delivered(gateway, sent)

    # Who did what, in the audit log, which still verifies.
    records = audit_rows(inst, "keys.rotated", "keys.rewrapped", "keys.retired", "config.reloaded")
    assert [(r["action"], r["actor"]) for r in records] == [
        ("keys.rotated", by("alice")), ("config.reloaded", "bob"), ("keys.rewrapped", by("carol")),
        ("keys.rewrapped", actor), ("keys.retired", actor), ("config.reloaded", "bob")]
    rotated, reloaded, rewrapped, _, retired, _ = (r["detail"] for r in records)
    assert rotated == {"key_id": new}
    assert reloaded["key_id"] == new
    assert rewrapped == {"to": new, "from": [old], "objects": 4, "failed": 0}
    assert retired == {"key_id": old}
    report = audit.verify(await audit.read_chain(gw.store.audit),
                          [x509.load_pem_x509_certificate(inst.signing.cert.read_bytes())])
    assert report.ok, report.problem


async def test_rewrap_and_retire_leave_no_key_material_in_the_audit_log(gateway: Running, client,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    sent = Sent()
    await sent.post(client(), numbered("KEYS-00001"))
    new, path = await asyncio.to_thread(rotate, capsys, gateway.inst)
    assert await gateway.gw.reload() is True
    assert (await asyncio.to_thread(keys_cmd, capsys, gateway.inst, "rewrap"))[0] == 0
    assert (await asyncio.to_thread(keys_cmd, capsys, gateway.inst, "retire", gateway.inst.key_id))[0] == 0
    secrets = [read_key_file(p, "test") for p in (path, gateway.inst.master_key.with_suffix(".retired"))]
    with contextlib.closing(sqlite3.connect(gateway.inst.state_dir / "gateway.db")) as conn:
        text = "\n".join(str(r) for r in conn.execute("SELECT * FROM audit"))
    assert new in text
    for key in secrets:
        assert key.secret.hex() not in text and base64.b64encode(key.secret).decode() not in text


# --- rotation while invoices arrive ------------------------------------------------------------------------


async def test_rotation_and_rewrap_while_invoices_are_accepted(gateway: Running, client, capsys: pytest.CaptureFixture[str],
                                                               actor: str, monkeypatch: pytest.MonkeyPatch) -> None:
    inst, gw = gateway.inst, gateway.gw
    # Small rewrap batches: many short transactions interleaved with the daemon's writes.  After its first batch
    # the rewrap waits for five more arrivals, and the last 30 invoices are sent only once it has begun: the
    # rewrap and the arrivals overlap every time.
    monkeypatch.setattr(keyscli, "REWRAP_BATCH", 2)
    loop = asyncio.get_running_loop()
    began, five_more = asyncio.Event(), threading.Event()
    mark: list[int] = []

    class Interleaved(SqliteKeys):
        async def replace_sealed(self, rows: Sequence[Resealed]) -> int:
            n = await super().replace_sealed(rows)  # durable
            if not mark:
                mark.append(len(sent.bodies))
                loop.call_soon_threadsafe(began.set)
                assert five_more.wait(WAIT_S)  # holds the command (its own thread and event loop), not the daemon
            return n

    def interleaved(cfg: Config) -> SqliteStore:
        """The store the commands open: the instance's, its re-sealing interleaved as above."""
        store = SqliteStore(cfg.state_dir)
        store.keys = Interleaved(store.engine)
        return store

    monkeypatch.setattr(clicommon, "open_store", interleaved)
    total = 60
    sent = Sent()
    s = client()
    gate = asyncio.Semaphore(6)
    progress = asyncio.Condition()
    arrived: list[float] = []

    async def one(n: int) -> None:
        if n >= 30:
            await began.wait()
        async with gate:
            await sent.post(s, numbered(f"KEYS-{n:05d}"))
        arrived.append(time.monotonic())
        if mark and len(sent.bodies) >= mark[0] + 5:
            five_more.set()
        async with progress:
            progress.notify_all()

    async def until(count: int) -> None:
        async with progress:
            await progress.wait_for(lambda: len(sent.bodies) >= count)

    def rewrap() -> tuple[int, float, float]:
        start = time.monotonic()
        code = cli.main(["keys", "rewrap", "--by", "rewrapper", "-c", str(inst.config)])
        return code, start, time.monotonic()

    posting = asyncio.gather(*(one(n) for n in range(total)))
    try:
        async with asyncio.timeout(WAIT_S * 2):
            await until(10)
            new, _ = await asyncio.to_thread(rotate, capsys, inst, "--by", "rotator")
            await until(20)
            assert await gw.reload("reloader") is True
            # Rewrap runs in its own thread and store (as the CLI beside the daemon) while invoices keep coming.
            code, start, end = await asyncio.to_thread(rewrap)
            assert code == 0
            await posting
    finally:
        if not posting.done():
            posting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await posting
    assert any(start < t < end for t in arrived), "the rewrap did not overlap with the arrivals"
    capsys.readouterr()
    assert len(sent.bodies) == total

    # Everything accepted is stored and opens; anything sealed under the old key after the first rewrap
    # (in flight during the reload) moves with a final rewrap.
    usage = assert_all_open(inst, sent)
    assert set(usage) <= {inst.key_id, new} and usage.get(new, 0) >= total - 20
    code, out, err = await asyncio.to_thread(keys_cmd, capsys, inst, "rewrap", "--by", "rewrapper")
    assert code == 0, err
    assert out.startswith(f"{usage.get(inst.key_id, 0)} object(s) re-sealed under {new}; no object needs"), out
    assert assert_all_open(inst, sent) == {new: total}
    assert (await asyncio.to_thread(keys_cmd, capsys, inst, "retire", inst.key_id))[0] == 0
    assert assert_all_open(inst, sent) == {new: total}
    await delivered(gateway, sent)

    records = audit_rows(inst, "keys.rotated", "keys.rewrapped", "config.reloaded", "keys.retired", "invoice.accepted")
    accepted = [r for r in records if r["action"] == "invoice.accepted"]
    assert len(accepted) == total and {r["detail"]["key_id"] for r in accepted} <= {inst.key_id, new}
    assert [(r["action"], r["actor"]) for r in records if r["action"] != "invoice.accepted"] == [
        ("keys.rotated", by("rotator")), ("config.reloaded", "reloader"), ("keys.rewrapped", by("rewrapper")),
        ("keys.rewrapped", by("rewrapper")), ("keys.retired", actor)]
    chain = await audit.read_chain(gw.store.audit)
    report = audit.verify(chain, [x509.load_pem_x509_certificate(inst.signing.cert.read_bytes())])
    assert report.ok and report.records == len(await audit.read_chain(gw.store.audit)), report.problem


# --- refusals and edge cases -------------------------------------------------------------------------------


@pytest.fixture
async def quiet(inst: Instance) -> AsyncIterator[Running]:
    """The gateway with its background delivery loop stopped: ``outbox.run_once()`` is the only deliverer."""
    try:
        async with serving(inst, "warning", io.StringIO()) as running:
            loops = [t for t in asyncio.all_tasks() if t.get_name() == "delivery"]
            assert len(loops) == 1
            loops[0].cancel()
            yield running
    finally:
        logs.configure("warning")


async def test_rewrap_before_the_daemon_reloads_is_refused(quiet: Running, capsys: pytest.CaptureFixture[str]) -> None:
    """Re-sealed under a key the daemon has not loaded, pending invoices could not be delivered: refused."""
    sent = Sent()
    async with quiet.session() as s:
        message_id = await sent.post(s, numbered("KEYS-00001"))
    new, _ = await asyncio.to_thread(rotate, capsys, quiet.inst)
    code, _, err = await asyncio.to_thread(keys_cmd, capsys, quiet.inst, "rewrap")  # the operator forgot the reload
    assert code == 2 and err.startswith("einvoice-gateway: refused: ") and "reload it first" in err and new in err, err
    await quiet.gw.outbox.run_once()
    assert await quiet.gw.store.reports.counts() == {"invoices": 1, "deliveries_delivered": 1}
    assert (quiet.inst.delivery_folder / f"{message_id}.xml").read_bytes() == sent.bodies[message_id]
    assert await quiet.gw.reload() is True
    assert (await asyncio.to_thread(keys_cmd, capsys, quiet.inst, "rewrap"))[0] == 0
    assert await quiet.gw.store.keys.usage() == {new: 1}
    assert assert_all_open(quiet.inst, sent)


class _Frozen(datetime):
    @classmethod
    def now(cls, tz: Any = None) -> _Frozen:
        return cls(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


def test_two_rotations_in_one_second(inst: Instance, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyscli, "datetime", _Frozen)
    first, _ = rotate(capsys, inst)
    code, _, err = keys_cmd(capsys, inst, "rotate")
    assert code in (0, 2), err
    assert first in [r["KEY ID"] for r in listed(capsys, inst)]


def test_rotate_refuses_a_key_list_without_a_folder(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    text = inst.config.read_text()
    assert text.count('keys = ["keys"]') == 1
    inst.config.write_text(text.replace('keys = ["keys"]', 'keys = ["keys/master-1.key"]'))
    code, out, err = keys_cmd(capsys, inst, "rotate")
    assert code == 2 and err.startswith("einvoice-gateway: configuration error: vault.keys lists key files, not a folder")
    assert out == ""
    assert sorted(p.name for p in (inst.root / "keys").iterdir()) == ["master-1.key"]
    code, _, err = keys_cmd(capsys, inst, "retire", inst.key_id)
    assert code == 2


def test_rotate_warns_when_current_is_pinned(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    text = inst.config.read_text()
    inst.config.write_text(text.replace(f'# current = "{inst.key_id}"', f'current = "{inst.key_id}"'))
    assert configured_vault(inst).current == inst.key_id
    code, out, err = keys_cmd(capsys, inst, "rotate")
    new = out.split()[3]
    assert code == 0 and f"vault.current pins {inst.key_id}" in err and new in err
    assert configured_vault(inst).current == inst.key_id  # still pinned: the operator decides
    rows = listed(capsys, inst)
    assert {r["KEY ID"]: r["STATE"] for r in rows} == {inst.key_id: "current", new: "-"}


def test_rewrap_refuses_an_unknown_key(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = keys_cmd(capsys, inst, "rewrap", "--key", "k-nonexistent")
    assert code == 2 and err == "einvoice-gateway: not found: --key: no configured key file holds key 'k-nonexistent'\n"


async def test_list_names_a_key_that_objects_need_and_no_file_holds(quiet: Running, capsys: pytest.CaptureFixture[str]) -> None:
    sent = Sent()
    async with quiet.session() as s:
        await sent.post(s, numbered("KEYS-00001"))
    await asyncio.to_thread(rotate, capsys, quiet.inst)
    quiet.inst.master_key.rename(quiet.inst.root / "master-1.key.away")  # lost, without a rewrap
    rows = await asyncio.to_thread(listed, capsys, quiet.inst)
    assert {"KEY ID": quiet.inst.key_id, "CREATED": "-", "OBJECTS": "1",
            "STATE": "MISSING: no configured key file holds this key", "FILE": "-"} in rows


def test_rewrap_shows_progress_on_a_terminal_only(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    """``keys rewrap`` as a real process on a pty: a status line counts the re-sealed objects and ends with a
    newline (on a pipe stderr stays quiet: tests/cli/test_backup.py, and without a process tests/cli/test_progress.py)."""
    asyncio.run(put_invoices(inst, 3))
    assert keys_cmd(capsys, inst, "rotate")[0] == 0
    code, out, err = run_process("keys", "rewrap", "--daemon-stopped", "-c", str(inst.config), terminal=True)
    assert code == 0 and out.startswith("3 object(s) re-sealed under "), err
    assert err.replace("\r\n", "\n") == "\rre-sealing stored objects: 3 of 3 (100%)\n"
