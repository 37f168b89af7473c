"""gateway/cli/backup.py: ``backup create``, ``verify [--deep]`` and ``restore`` on a real instance.

What each command prints and its exit code: create names the counts, how many of the instance's files
it took and the master keys the backup needs (in it only with ``--include-master-keys``, said loudly);
verify says OK (exit 0) or lists each problem and FAILED (exit 1), ``--deep`` opening every stored
invoice with the keys of the configuration; restore puts everything back where it was or under
``--config-dir``/``--state-dir``, refuses to replace an instance (exit 2, ``refused:``, naming what is
in the way) unless ``--overwrite``, and says which master key files to supply.  The restored instance
passes check-config and accepts an invoice.  Progress shows on a terminal only.
What a backup holds and how damage is found is tested in tests/operations/test_backup.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.cli.demo import SAMPLE
from gateway.config import load as config_mod
from gateway.operations import backup, instance
from gateway.storage.factory import snapshots
from gateway.storage.sqlite.store import SqliteStore
from gateway.vault import write_key_file
from tests.helpers import post, put_invoices, rewrite_config, run_command, run_command_aside, run_process, serving


@pytest.fixture
def stored(inst: instance.Instance) -> instance.Instance:
    """The fresh instance with two invoices and an audit record in its state."""
    asyncio.run(put_invoices(inst, 2))
    return inst


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple[str, int]]:
    """Every file below ``root`` (relative path -> SHA-256, mode), leaving out the top folders ``skip``."""
    return {p.relative_to(root).as_posix(): (sha256(p), mode(p)) for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in skip}


def test_create_verify_and_restore_into_a_fresh_place(stored, tmp_path, capsys):
    cfg = str(stored.config)
    os.chmod(stored.root / "pki" / "server.crt", 0o640)  # a mode of its own, to be kept
    dest = tmp_path / "backups" / "b1"
    code, out, err = run_command(capsys, "backup", "create", str(dest), "-c", cfg)
    assert code == 0 and err == "", err
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["counts"]["invoices"] == 2 and manifest["key_ids"] == {stored.key_id: 2}
    files = manifest["instance"]["files"]
    first, second = out.splitlines()
    head, counts, tail = first.partition("{")[0], "{" + first.partition("{")[2].rpartition("}")[0] + "}", first.rpartition("}")[2]
    assert (head, tail) == (f"backup written to {dest}: ", f"; {len(files)} file(s) of the instance")
    assert json.loads(counts) == manifest["counts"]
    assert second == f"the master keys are not in it (it needs {stored.key_id}): back up their files separately"
    by_path = {f["path"]: f for f in files}
    for name, kind in (("config.toml", "configuration"), ("partners.toml", "partners"), ("pki/server.key", "secret"),
                       ("pki/ca.key", "secret"), ("pki/ca.crt", "file"), ("pki/signing.key", "secret"),
                       ("pki/smime.key", "secret")):
        assert by_path[name]["kind"] == kind and by_path[name]["base"] == "config", name
    assert by_path["pki/server.crt"]["mode"] == "0640" and by_path["pki/server.key"]["mode"] == "0600"
    assert any(f["key"].startswith("partners.demo-supplier.client_certs") for f in files)
    assert "keys/master-1.key" not in by_path
    assert manifest["instance"]["master_key_files"] == [{"key": "vault.keys[0]", "base": "config",
                                                         "path": "keys/master-1.key", "key_id": stored.key_id}]
    for f in files:  # every copy in the backup is private, whatever its mode at home
        assert mode(dest / f["stored"]) == 0o600 and sha256(dest / f["stored"]) == f["sha256"] == sha256(stored.root / f["path"])

    for extra in ((), ("--deep",)):
        code, out, err = run_command(capsys, "backup", "verify", *extra, str(dest), "-c", cfg)
        assert (code, out) == (0, "backup OK\n"), err

    fresh = tmp_path / "elsewhere" / "gw2"
    code, out, err = run_command(capsys, "backup", "restore", str(dest), "--config-dir", str(fresh))
    assert code == 0, err
    config = fresh / "config.toml"
    assert out.splitlines() == [
        f"restored {config} and the instance's files ({len(files)} written), the database into {fresh / 'state'}",
        "the master keys are not in this backup: put their key files back (mode 0600) before starting the gateway:",
        f"  master key {stored.key_id}: {fresh / 'keys' / 'master-1.key'}",
        f"then check it: einvoice-gateway check-config -c {config}"]
    # The same bytes and modes, and nothing else (no lock file, no key of a client the configuration does not name).
    assert tree(fresh, skip=("state",)) == {p: v for p, v in tree(stored.root).items() if p in by_path}
    assert mode(fresh) == mode(stored.root) == 0o700 and mode(fresh / "keys") == 0o700
    assert (fresh / "outbox").is_dir() and list((fresh / "outbox").iterdir()) == []  # the ERP folder, made again
    assert sha256(fresh / "state" / "gateway.db") == sha256(dest / "gateway.db") and mode(fresh / "state") == 0o700
    assert not (fresh / "keys" / "master-1.key").exists()

    code, _, err = run_command(capsys, "check-config", "-c", str(config))  # without its key it cannot start
    assert code == 2 and "vault.keys[0]" in err
    shutil.copy2(stored.master_key, fresh / "keys" / "master-1.key")
    code, out, err = run_command(capsys, "check-config", "-c", str(config))
    assert code == 0 and out.startswith(f"{config}: OK"), err


def test_master_keys_only_when_asked_and_loudly(stored, tmp_path, capsys):
    dest = tmp_path / "b"
    code, out, err = run_command(capsys, "backup", "create", "--include-master-keys", str(dest), "-c", str(stored.config))
    assert code == 0, err
    assert err.count("warning: --include-master-keys: this backup holds the master keys, so whoever can read it can "
                     "decrypt every invoice in it.") == 2  # before the work starts and under the result
    assert out.splitlines()[1] == (f"the master keys are IN it ({stored.key_id}): it decrypts every invoice; guard it "
                                   "like the keys")
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["master_keys"].startswith("INCLUDED") and manifest["instance"]["master_keys_included"] is True
    [key] = [f for f in manifest["instance"]["files"] if f["kind"] == "master key"]
    assert key["path"] == "keys/master-1.key" and mode(dest / key["stored"]) == 0o600
    assert sha256(dest / key["stored"]) == sha256(stored.master_key)


@pytest.mark.slow
async def test_a_restored_instance_serves_and_accepts_an_invoice(stored, tmp_path, capsys):
    dest, fresh = tmp_path / "b", tmp_path / "restored"
    code, _, err = await run_command_aside(capsys, "backup", "create", "--include-master-keys", str(dest),
                                           "-c", str(stored.config))
    assert code == 0, err
    code, out, err = await run_command_aside(capsys, "backup", "restore", str(dest), "--config-dir", str(fresh))
    assert code == 0 and "master keys are not in this backup" not in out, err
    assert sha256(fresh / "keys" / "master-1.key") == sha256(stored.master_key)
    assert mode(fresh / "keys" / "master-1.key") == 0o600
    code, out, err = await run_command_aside(capsys, "check-config", "-c", str(fresh / "config.toml"))
    assert code == 0, err
    restored = replace(stored, root=fresh, config=fresh / "config.toml", partners=fresh / "partners.toml",
                       state_dir=fresh / "state", delivery_folder=fresh / "outbox")
    async with serving(restored) as running, running.session() as session:  # the demo partner's certificate from home
        status, reply = await post(session, SAMPLE)
        assert status == 202, reply
        store = SqliteStore(fresh / "state")
        try:
            assert (await store.reports.counts())["invoices"] == 3  # the two restored and the new one
        finally:
            await store.close()


def test_restore_to_another_state_folder_rewrites_the_configuration(stored, tmp_path, capsys):
    dest, fresh, state = tmp_path / "b", tmp_path / "gw2", tmp_path / "var" / "state"
    assert run_command(capsys, "backup", "create", "--include-master-keys", str(dest), "-c", str(stored.config))[0] == 0
    code, out, err = run_command(capsys, "backup", "restore", str(dest), "--config-dir", str(fresh), "--state-dir", str(state))
    assert code == 0, err
    text = (fresh / "config.toml").read_text()
    assert f'state_dir = "{state}"' in text and "# SQLite index, encrypted invoices" in text  # comments stay
    assert config_mod.load(fresh / "config.toml").state_dir == state
    assert sha256(state / "gateway.db") == sha256(dest / "gateway.db") and not (fresh / "state").exists()
    code, _, err = run_command(capsys, "check-config", "-c", str(fresh / "config.toml"))
    assert code == 0, err


def test_restore_refuses_to_replace_an_instance_unless_asked(stored, tmp_path, capsys):
    dest = tmp_path / "b"
    assert run_command(capsys, "backup", "create", str(dest), "-c", str(stored.config))[0] == 0
    before = tree(stored.root)
    (stored.root / "partners.toml").write_text((stored.root / "partners.toml").read_text() + "# changed\n")
    code, out, err = run_command(capsys, "backup", "restore", str(dest))  # back where it was: the live instance
    assert code == 2 and out == ""
    assert err.startswith(f"einvoice-gateway: refused: restore: an instance is in the way, nothing was restored: "
                          f"{stored.state_dir} (a state folder that is not empty), {stored.root / 'partners.toml'} "
                          "(differs from the backup)"), err
    assert "--overwrite" in err
    assert tree(stored.root)["partners.toml"] != before["partners.toml"]  # nothing was touched
    code, out, err = run_command(capsys, "backup", "restore", "--overwrite", str(dest))  # (the gateway is not running)
    assert code == 0, err
    after = tree(stored.root)
    assert after["partners.toml"] == before["partners.toml"] and after["pki/server.key"] == before["pki/server.key"]
    assert after["state/gateway.db"][0] == sha256(dest / "gateway.db")


def test_a_tampered_file_fails_verify_and_is_not_restored(stored, tmp_path, capsys):
    dest = tmp_path / "b"
    assert run_command(capsys, "backup", "create", str(dest), "-c", str(stored.config))[0] == 0
    copy = dest / "files" / "config" / "pki" / "ca.crt"
    copy.write_bytes(copy.read_bytes().replace(b"MII", b"MIJ", 1))
    code, out, _ = run_command(capsys, "backup", "verify", str(dest), "-c", str(stored.config))
    assert code == 1 and out.splitlines() == ["problem: files/config/pki/ca.crt does not match the SHA-256 in the "
                                              "manifest (damaged or changed)", "backup FAILED: 1 problem(s)"]
    code, out, err = run_command(capsys, "backup", "restore", str(dest), "--config-dir", str(tmp_path / "gw2"))
    assert code == 2 and "does not verify, nothing was restored: files/config/pki/ca.crt does not match" in err, err
    assert not (tmp_path / "gw2").exists()


def test_progress_on_a_terminal_only(stored, tmp_path):
    """``backup create`` as a real process: on a pty its stderr shows the progress line, ended by a newline;
    on a pipe stderr stays empty."""
    def create(dest: Path, on_tty: bool) -> tuple[int, str, str]:
        return run_process("backup", "create", str(dest), "-c", str(stored.config), terminal=on_tty)

    code, out, err = create(tmp_path / "b1", on_tty=True)
    assert code == 0 and out.startswith("backup written to"), err
    assert "\rsnapshot of the database: 1 of 1 (100%)" in err
    assert "copying the instance's files: 12 of 12 (100%)" in err and err.endswith("\n"), repr(err)
    code, out, err = create(tmp_path / "b2", on_tty=False)
    assert code == 0 and out.startswith("backup written to") and err == ""


def test_a_backup_of_the_database_alone_still_restores(stored, tmp_path, capsys):
    """Format 1 (before the instance's files were taken): restored into --state-dir or the configured state folder."""
    dest = tmp_path / "b"
    backup.create(snapshots(), stored.state_dir, dest)
    edit = json.loads((dest / "manifest.json").read_text()) | {"format": "einvoice-gateway-backup/1"}
    (dest / "manifest.json").write_text(json.dumps(edit))
    code, out, err = run_command(capsys, "backup", "verify", str(dest), "-c", str(stored.config))
    assert (code, out) == (0, "backup OK\n"), err
    target = tmp_path / "restored"
    code, out, err = run_command(capsys, "backup", "restore", str(dest), "--state-dir", str(target), "-c", str(stored.config))
    assert (code, out) == (0, f"restored into {target}; start the gateway on it\n"), err
    assert sha256(target / "gateway.db") == sha256(dest / "gateway.db")


def test_an_empty_state_is_backed_up_needing_no_key(inst, tmp_path, capsys):
    asyncio.run(put_invoices(inst, 0))
    dest = tmp_path / "b"
    code, out, err = run_command(capsys, "backup", "create", str(dest), "-c", str(inst.config))
    assert code == 0, err
    assert out.endswith("the master keys are not in it (it needs no key): back up their files separately\n"), out


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
