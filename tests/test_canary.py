"""No key material or invoice content appears on disk outside the encrypted store, in logs, or in the audit log.

A real instance accepts an invoice carrying unique canary strings in fields the gateway does not index (a note
and an item name) and delivers it to its directory destination: that folder is the ERP's inbox and holds the
invoice in clear, by design, so it is left out of the search.  Everything else is searched, byte for byte:
every file under the instance folder (configuration, partners, PKI, the state folder with ``gateway.db`` and
its ``-wal``/``-shm`` while the daemon runs and after, temporary files, which the test points into the
instance), the captured log lines, ``/metrics``, ``audit export`` and a ``backup create`` folder.  The master
keys (raw bytes, the base64 text of the key file, hex) may only be in their own key files; the canaries
nowhere, including in a body that was rejected (whose error reply names it, by design).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tempfile
from pathlib import Path

import aiohttp
import pytest

from gateway import logs
from gateway.cli.demo import SAMPLE
from gateway.operations.instance import Instance
from gateway.vault import MasterKey, read_key_file
from tests.helpers import eventually, free_port, numbered, post, run_cli, serving
from tests.helpers.daemon import set_admin

NOTE_CANARY = "CANARY-note-8e41d7c0a9b2"  # BT-22 invoice note
ITEM_CANARY = "CANARY-item-57fa03c6d1e8"  # BT-153 item name
REJECTED_CANARY = "CANARY-rejected-0b9c4e2f"  # in a body that fails the schema: never stored
NOTE = b"<cbc:Note>Sample invoice shipped with einvoice-gateway.</cbc:Note>"
ITEM = b"<cbc:Name>Pallet of invoice paper</cbc:Name>"
assert SAMPLE.count(NOTE) == 1 and SAMPLE.count(ITEM) == 1
DOC = numbered("CANARY-0001", SAMPLE.replace(NOTE, f"<cbc:Note>{NOTE_CANARY}</cbc:Note>".encode()).replace(
    ITEM, f"<cbc:Name>{ITEM_CANARY}</cbc:Name>".encode()))
REJECTED = SAMPLE.replace(b"<cbc:IssueDate>2026-11-02<", f"<cbc:IssueDate>{REJECTED_CANARY}<".encode(), 1)
WAIT_S = 15.0


def key_needles(key: MasterKey) -> dict[str, bytes]:
    return {f"{key.key_id} raw": key.secret, f"{key.key_id} base64": base64.b64encode(key.secret),
            f"{key.key_id} hex": key.secret.hex().encode()}


def needles(keys: list[MasterKey]) -> dict[str, bytes]:
    out = {c: c.encode() for c in (NOTE_CANARY, ITEM_CANARY, REJECTED_CANARY)}
    for key in keys:
        out |= key_needles(key)
    return out


def search(root: Path, wanted: dict[str, bytes], exclude: list[Path]) -> tuple[list[str], list[Path]]:
    """Every file under ``root`` but ``exclude`` (files, or folders with all they hold): what was found where,
    and the files searched."""
    found, searched = [], []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(path == e or e in path.parents for e in exclude):
            continue
        data = path.read_bytes()
        searched.append(path)
        found += [f"{name} in {path}" for name, needle in wanted.items() if needle in data]
    return found, searched


def in_text(text: str, wanted: dict[str, bytes]) -> list[str]:
    data = text.encode()
    return [name for name, needle in wanted.items() if needle in data]


async def cli_out(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The CLI in a thread: it runs its own event loop (the daemon's keeps serving meanwhile)."""
    code = await run_cli(*argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out + captured.err


@pytest.fixture
def private_tmp(inst: Instance, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Temporary files of the gateway and of the processes it starts go inside the instance (and are searched)."""
    folder = inst.root / "tmp"
    folder.mkdir(mode=0o700)
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


async def test_no_content_or_key_material_outside_the_encrypted_store(inst: Instance, private_tmp: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    set_admin(inst, free_port())  # the loopback admin listener (off in an instance made with port 0), for /metrics
    ops = tmp_path / "ops"  # beside the instance (the inst fixture is tmp_path / "gw")
    ops.mkdir()
    stream = io.StringIO()
    master = read_key_file(inst.master_key, "test")
    keys_folder = inst.root / "keys"
    outputs: list[str] = []
    try:
        async with serving(inst, "debug", stream) as running:
            async with running.session() as s:
                answer = await post(s, DOC)
                assert answer.status == 202, answer.text
                message_id = json.loads(answer.text)["message_id"]
                answer = await post(s, REJECTED)
                assert answer.status == 422 and REJECTED_CANARY in answer.text, answer.text  # the premise: the reply names it

            async def all_delivered() -> bool:
                return await running.gw.store.reports.counts() == {"invoices": 1, "deliveries_delivered": 1}

            await eventually(all_delivered, "the invoice to be delivered", WAIT_S)
            delivered = (inst.delivery_folder / f"{message_id}.xml").read_bytes()
            assert delivered == DOC and NOTE_CANARY.encode() in delivered  # the premise: it is in the ERP inbox

            async with aiohttp.ClientSession() as plain, plain.get(f"http://127.0.0.1:{running.gw.admin_port}/metrics") as r:
                metrics = await r.text()
                assert r.status == 200 and 'outcome="accepted"' in metrics, metrics
                outputs.append(metrics)

            # While the daemon runs: the database, its write-ahead log and shared memory, raw.
            wanted = needles([master])
            found, searched = search(inst.root, wanted, [inst.delivery_folder, inst.master_key])
            assert not found, found
            names = {p.name for p in searched}
            assert {"gateway.db", "gateway.db-wal", "config.toml", "partners.toml"} <= names, names

            # Operator commands beside the daemon: rotate, rewrap and retire re-seal the invoice in memory only.
            outputs.append(await cli_out(capsys, "messages", "show", message_id, "-c", str(inst.config)))
            outputs.append(await cli_out(capsys, "messages", "list", "-c", str(inst.config)))
            outputs.append(await cli_out(capsys, "keys", "rotate", "-c", str(inst.config)))
            assert await running.gw.reload() is True
            outputs.append(await cli_out(capsys, "keys", "rewrap", "-c", str(inst.config)))
            outputs.append(await cli_out(capsys, "keys", "retire", inst.key_id, "-c", str(inst.config)))
            key_files = sorted(keys_folder.iterdir())
            assert len(key_files) == 2
            keys = [read_key_file(p, "test") for p in key_files]
            assert sorted(p.suffix for p in key_files) == [".key", ".retired"]  # the old key, retired, and the new one
            assert master in keys and len({k.secret for k in keys}) == 2
            outputs.append(await cli_out(capsys, "audit", "checkpoint", "-c", str(inst.config)))
            outputs.append(await cli_out(capsys, "audit", "export", "-o", str(ops / "audit.jsonl"), "-c", str(inst.config)))
            outputs.append(await cli_out(capsys, "audit", "list", "--json", "-c", str(inst.config)))
            outputs.append(await cli_out(capsys, "backup", "create", str(ops / "backup"), "-c", str(inst.config)))
            outputs.append(await cli_out(capsys, "backup", "verify", "--deep", str(ops / "backup"), "-c", str(inst.config)))
    finally:
        logs.configure("warning")

    wanted = needles(keys)
    # After the daemon stopped (the write-ahead log checkpointed into the database).
    found, searched = search(inst.root, wanted, [inst.delivery_folder, *key_files])
    assert not found, found
    assert any(p.name == "gateway.db" for p in searched) and any(p.parent == inst.root / "pki" for p in searched)

    # The export and the backup, wherever the operator put them.
    found, searched = search(ops, wanted, [])
    assert not found, found
    assert {p.name for p in searched} >= {"audit.jsonl", "gateway.db", "manifest.json"}
    export = (ops / "audit.jsonl").read_text()
    assert message_id in export and hashlib.sha256(DOC).hexdigest() in export  # the premise: it is about this invoice

    # The log lines, the command output, /metrics.
    text = stream.getvalue()
    assert message_id in text and "invoice.rejected" in text  # the premise: the events were captured
    assert not in_text(text, wanted)
    for out in outputs:
        assert not in_text(out, wanted), out
