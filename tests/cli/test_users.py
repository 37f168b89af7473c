"""``einvoice-gateway users …`` (``gateway/cli/users.py``): console accounts from the host, no gateway
running; every change an audit record naming the OS account (``--by`` beside it), sealed into the chain;
the list a table under a header or JSON (empty: said on stderr); refusals in one line with their kind."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.cli.common import actor as cli_actor
from gateway.cli.common import current_user
from gateway.console import security
from gateway.storage.sqlite.store import SqliteStore
from tests.helpers import run_cli, table_rows
from tests.helpers.console import audits


async def audit_records(store: SqliteStore, limit: int = 1_000_000) -> list[dict[str, Any]]:
    """The newest audit records as dicts, ``detail`` parsed from its JSON text."""
    return [r.as_json() | {"detail": json.loads(r.detail)} for r in await store.audit.newest(limit)]


async def users_cli(capsys: pytest.CaptureFixture[str], config: Path, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = await run_cli("users", *argv, "-c", str(config))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_users_cli(inst, capsys):
    cfg = inst.config
    code, out, err = await users_cli(capsys, cfg, "add", "carol", "--role", "operator", "--content", "--json")
    assert code == 0, err
    made = json.loads(out)
    assert (made["name"], made["roles"]) == ("carol", ["operator"]) and len(made["password"]) >= 16
    code, out, err = await users_cli(capsys, cfg, "add", "dave", "--role", "auditor")
    assert code == 0, err
    assert out.startswith("dave: initial password ")
    dave_password = out.split()[3]

    code, out, err = await users_cli(capsys, cfg, "add", "carol", "--role", "admin")
    assert code == 2 and err == "einvoice-gateway: refused: a user named 'carol' exists already\n"
    code, out, err = await users_cli(capsys, cfg, "add", "Carol!", "--role", "admin")
    assert code == 2 and err.startswith("einvoice-gateway: usage error: users add: 'Carol!' is not a user name")
    for action in ("disable", "enable", "reset-mfa", "unlock", "reset-password"):
        code, out, err = await users_cli(capsys, cfg, action, "nobody")
        assert (code, out) == (2, "")
        assert err == "einvoice-gateway: not found: no user 'nobody' (see: einvoice-gateway users list)\n"

    code, out, err = await users_cli(capsys, cfg, "list", "--json")
    assert code == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert set(rows) == {"carol", "dave"}
    assert {k: rows["carol"][k] for k in ("roles", "content", "state", "failed_logins", "second_factor",
                                          "must_change_password")} == \
        {"roles": ["operator"], "content": True, "state": "active", "failed_logins": 0, "second_factor": False,
         "must_change_password": True}
    assert rows["dave"]["roles"] == ["auditor"] and rows["dave"]["content"] is False

    store = SqliteStore(inst.state_dir)
    try:
        acc = store.accounts
        assert security.verify_password((await acc.user("carol")).password_hash, made["password"])
        assert security.verify_password((await acc.user("dave")).password_hash, dave_password)
        await acc.enroll_totp("carol", security.new_totp_secret(), 1, [security.recovery_hash("aaaaa-bbbbb")])
        for _ in range(5):
            await acc.failed("carol", "password", "127.0.0.1", "wrong-password", ("127.0.0.1",), time.time(), 0.0)
        assert (await acc.user("carol")).failed_logins == 5
    finally:
        await store.close()

    code, out, err = await users_cli(capsys, cfg, "list")
    assert code == 0 and "5 failed logins" in {r["NAME"]: r["NOTES"] for r in table_rows(out)}["carol"], out + err
    for action in ("disable", "enable", "reset-mfa", "unlock"):
        code, out, err = await users_cli(capsys, cfg, action, "carol")
        assert (code, out.strip()) == (0, f"carol: {action} done"), err
    code, out, err = await users_cli(capsys, cfg, "reset-password", "carol", "--json")
    assert code == 0, err
    reset = json.loads(out)
    assert reset["name"] == "carol" and reset["password"] != made["password"]
    code, out, err = await users_cli(capsys, cfg, "disable", "dave")
    assert code == 0, err

    code, out, err = await users_cli(capsys, cfg, "list")
    assert code == 0, err
    assert out.split()[:4] == ["NAME", "ROLES", "STATE", "NOTES"]
    rows = {r["NAME"]: r for r in table_rows(out)}
    assert (rows["carol"]["ROLES"], rows["carol"]["STATE"]) == ("operator +content", "active")
    assert "no second factor yet" in rows["carol"]["NOTES"] and "must change password" in rows["carol"]["NOTES"]
    assert "failed logins" not in rows["carol"]["NOTES"]  # unlock forgot them
    assert rows["dave"]["STATE"] == "disabled"

    store = SqliteStore(inst.state_dir)
    try:
        carol = await store.accounts.user("carol")
        assert (carol.enrolled, carol.failed_logins, carol.must_change, carol.state) == (False, 0, True, "active")
        assert security.verify_password(carol.password_hash, reset["password"])
        assert not security.verify_password(carol.password_hash, made["password"])
        actor = cli_actor()
        assert actor == f"cli:{current_user()}"
        records = [r for r in await audit_records(store, 1000) if r["action"].startswith("user.")]
        got = sorted((r["seq"], r["action"], r["detail"].get("user")) for r in records if r["actor"] == actor)
        assert [(a, u) for _, a, u in got] == [
            ("user.added", "carol"), ("user.added", "dave"), ("user.disabled", "carol"), ("user.enabled", "carol"),
            ("user.mfa_reset", "carol"), ("user.unlocked", "carol"), ("user.password_reset", "carol"),
            ("user.disabled", "dave")]
        assert all(r["actor"] == actor for r in records)
    finally:
        await store.close()
    capsys.readouterr()
    code = await run_cli("audit", "verify", "-c", str(cfg))
    out, err = capsys.readouterr()
    assert code == 0 and "audit log OK" in out, out + err  # every CLI change sealed into the chain


async def test_cli_password_reset_is_audited_as_a_reset_whoever_runs_it(inst, capsys, monkeypatch):
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.setenv("USER", "erin")  # not who runs it: the OS account is
    code, _, err = await users_cli(capsys, inst.config, "add", "erin", "--role", "operator")
    assert code == 0, err
    code, _, err = await users_cli(capsys, inst.config, "reset-password", "erin", "--by", "helpdesk ticket 4711")
    assert code == 0, err
    store = SqliteStore(inst.state_dir)
    try:
        [added] = await audits(store, "user.added")
        [reset] = await audits(store, "user.password_reset")
        assert (added["actor"], reset["actor"]) == (cli_actor(), cli_actor("helpdesk ticket 4711"))
        assert reset["actor"] == f"cli:{current_user()} (--by helpdesk ticket 4711)"
    finally:
        await store.close()


async def test_an_instance_without_accounts_says_so(inst, capsys):
    code, out, err = await users_cli(capsys, inst.config, "list")
    assert (code, out, err) == (0, "", "no console accounts (add one: einvoice-gateway users add)\n")
    code, out, err = await users_cli(capsys, inst.config, "list", "--json")
    assert (code, json.loads(out), err) == (0, [], "")
