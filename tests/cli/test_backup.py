"""gateway/cli/backup.py: ``backup create``, ``verify [--deep]`` and ``restore`` on a real instance's state.

What each command prints and its exit code: create names the counts and the master keys the backup
needs (and that they are not in it); verify says OK (exit 0) or lists each problem and FAILED (exit 1),
``--deep`` opening every stored invoice with the keys of the configuration; restore goes into
``--state-dir`` or the configured state folder, and refuses one that is not empty (exit 2, ``refused:``,
naming it).
What a backup holds and how damage is found is tested in tests/operations/test_backup.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import replace

import pytest

from gateway.config import load as config_mod
from gateway.operations import instance
from gateway.storage.sqlite.store import SqliteStore
from gateway.vault import Vault, write_key_file
from tests.helpers import rewrite_config, run_command
from tests.helpers.records import WAIT, accepted_invoice


async def put_invoices(inst: instance.Instance, count: int) -> None:
    """``count`` invoices in the instance's store, sealed under its master key as the daemon would."""
    cfg = config_mod.load(inst.config)
    vault = Vault.from_files(cfg.vault.keys, cfg.vault.current)
    store = SqliteStore(inst.state_dir)
    try:
        for n in range(count):
            inv = accepted_invoice(f"B-{n}", partner=instance.DEMO_PARTNER, destinations=("erp-inbox",))
            body = inv.sealed.removeprefix(b"sealed:")  # accepted_invoice puts a placeholder around the document
            assert hashlib.sha256(body).hexdigest() == inv.sha256
            blob, key_id = vault.seal(body, inv.message_id, inv.sha256)
            await asyncio.wait_for(store.intake.put(replace(inv, sealed=blob, key_id=key_id)), WAIT)
        await store.audit.append("pytest", "test.note", None, None, {"why": "backup command test"})
    finally:
        await store.close()


@pytest.fixture
def stored(inst: instance.Instance) -> instance.Instance:
    """The fresh instance with two invoices and an audit record in its state."""
    asyncio.run(put_invoices(inst, 2))
    return inst


def test_create_verify_and_restore(stored, tmp_path, capsys):
    cfg = str(stored.config)
    dest = tmp_path / "backups" / "b1"
    code, out, err = run_command(capsys, "backup", "create", str(dest), "-c", cfg)
    assert code == 0, err
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["counts"]["invoices"] == 2 and manifest["key_ids"] == {stored.key_id: 2}
    head, counts, tail = out.partition("{")[0], "{" + out.partition("{")[2].rpartition("}")[0] + "}", out.rpartition("}")[2]
    assert (head, tail) == (f"backup written to {dest}: ", f"; the master keys are not in it (it needs {stored.key_id})\n")
    assert json.loads(counts) == manifest["counts"]

    for extra in ((), ("--deep",)):
        code, out, err = run_command(capsys, "backup", "verify", *extra, str(dest), "-c", cfg)
        assert (code, out) == (0, "backup OK\n"), err

    target = tmp_path / "restored"
    code, out, err = run_command(capsys, "backup", "restore", str(dest), "--state-dir", str(target), "-c", cfg)
    assert (code, out) == (0, f"restored into {target}; start the gateway on it\n"), err
    assert (target / "gateway.db").is_file()


def test_an_empty_state_is_backed_up_needing_no_key(inst, tmp_path, capsys):
    asyncio.run(put_invoices(inst, 0))
    dest = tmp_path / "b"
    code, out, err = run_command(capsys, "backup", "create", str(dest), "-c", str(inst.config))
    assert code == 0, err
    assert out.endswith("; the master keys are not in it (it needs no key)\n"), out


def test_verify_lists_each_problem_and_exits_1(stored, tmp_path, capsys):
    dest = tmp_path / "b"
    assert run_command(capsys, "backup", "create", str(dest), "-c", str(stored.config))[0] == 0
    db = dest / "gateway.db"
    data = bytearray(db.read_bytes())
    data[len(data) // 2] ^= 0x01
    db.write_bytes(data)
    code, out, _ = run_command(capsys, "backup", "verify", str(dest), "-c", str(stored.config))
    *problems, last = out.splitlines()
    assert code == 1 and problems and all(p.startswith("problem: ") for p in problems), out
    assert any("does not match the SHA-256" in p for p in problems)
    assert last == f"backup FAILED: {len(problems)} problem(s)"


def test_deep_verify_opens_with_the_configured_keys(stored, tmp_path, capsys):
    dest = tmp_path / "b"
    assert run_command(capsys, "backup", "create", str(dest), "-c", str(stored.config))[0] == 0
    other = tmp_path / "other-keys"
    other.mkdir(mode=0o700)
    write_key_file(other / "master-2.key")
    rewrite_config(stored.config, lambda c: c["vault"].update(keys=[str(other)]))  # the instance's key is not configured
    code, out, _ = run_command(capsys, "backup", "verify", str(dest), "-c", str(stored.config))
    assert (code, out) == (0, "backup OK\n")  # the database alone is fine
    code, out, _ = run_command(capsys, "backup", "verify", "--deep", str(dest), "-c", str(stored.config))
    assert code == 1 and out.splitlines() == [
        f"problem: master key '{stored.key_id}' (needed by 2 invoices) is not in the vault: add its key file to vault.keys",
        "backup FAILED: 1 problem(s)"]


def test_restore_refuses_the_live_state_folder(stored, tmp_path, capsys):
    dest = tmp_path / "b"
    assert run_command(capsys, "backup", "create", str(dest), "-c", str(stored.config))[0] == 0
    before = sorted(p.name for p in stored.state_dir.iterdir())
    code, out, err = run_command(capsys, "backup", "restore", str(dest), "-c", str(stored.config))  # no --state-dir
    assert code == 2 and out == ""
    assert err.startswith("einvoice-gateway: refused: restore: ") and str(stored.state_dir) in err
    assert "not an empty folder" in err, err
    assert sorted(p.name for p in stored.state_dir.iterdir()) == before


def test_create_refuses_a_used_destination_and_writes_nothing(stored, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "other").write_text("x")
    code, out, err = run_command(capsys, "backup", "create", str(used), "-c", str(stored.config))
    assert code == 2 and out == "" and err.startswith("einvoice-gateway: refused: ") and "not an empty folder" in err, err
    assert [p.name for p in used.iterdir()] == ["other"]


def test_create_without_a_state_is_exit_2_naming_the_folder(inst, tmp_path, capsys):
    dest = tmp_path / "b"
    code, out, err = run_command(capsys, "backup", "create", str(dest), "-c", str(inst.config))
    assert code == 2 and out == "" and str(inst.state_dir) in err and "gateway.db" in err, err
    assert not dest.exists()
