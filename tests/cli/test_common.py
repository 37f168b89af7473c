"""gateway/cli/common.py: what every command group shares.

``-c/--config`` and its default (EINVOICE_GATEWAY_CONFIG, else /etc/einvoice-gateway/config.toml); who
acts, for the audit log: the OS account by the effective uid (never ``$USER``, never "0" or empty),
with the sudo user and ``--by`` beside it; ``opened``, the instance's store for one command, closed
however the command ends; ``when``, the dates and times options take (in UTC); ``count``, a limit.
"""

from __future__ import annotations

import argparse
import os
import pwd
import subprocess
import sys
from datetime import UTC, datetime

import pytest

from gateway.cli import common
from gateway.cli.common import actor, count, current_user, opened, when, with_by, with_config
from gateway.config import load as config_mod
from gateway.storage.sqlite.store import SqliteStore
from tests.helpers import ENV, audit_of

# --- the configuration option -------------------------------------------------------------------------


def test_with_config_adds_c_and_config_with_the_default():
    parser = with_config(argparse.ArgumentParser())
    assert parser.parse_args([]).config == common.DEFAULT_CONFIG
    assert parser.parse_args(["-c", "a.toml"]).config == "a.toml"
    assert parser.parse_args(["--config", "b.toml"]).config == "b.toml"
    [option] = [a for a in parser._actions if a.dest == "config"]
    assert option.option_strings == ["-c", "--config"] and common.DEFAULT_CONFIG in (option.help or "")


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "/etc/einvoice-gateway/config.toml"),
    ({"EINVOICE_GATEWAY_CONFIG": "/srv/gw/config.toml"}, "/srv/gw/config.toml"),
])
def test_the_default_configuration_comes_from_the_environment(env, expected):
    base = {k: v for k, v in ENV.items() if k != "EINVOICE_GATEWAY_CONFIG"}
    result = subprocess.run([sys.executable, "-c", "from gateway.cli.common import DEFAULT_CONFIG; print(DEFAULT_CONFIG)"],
                            capture_output=True, text=True, timeout=60, env=base | env)
    assert (result.returncode, result.stdout) == (0, expected + "\n"), result.stderr


# --- the acting user ------------------------------------------------------------------------------------


def fake_accounts(monkeypatch: pytest.MonkeyPatch, euid: int, accounts: dict[int, str]) -> None:
    """The process runs as ``euid``; the password database holds ``accounts`` (uid → name)."""
    def getpwuid(uid: int) -> pwd.struct_passwd:
        if uid not in accounts:
            raise KeyError(f"getpwuid(): uid not found: {uid}")
        return pwd.struct_passwd((accounts[uid], "x", uid, uid, "", "/", "/bin/sh"))

    def getpwnam(name: str) -> pwd.struct_passwd:
        return getpwuid(next((u for u, n in accounts.items() if n == name), -1))

    monkeypatch.setattr(common.os, "geteuid", lambda: euid)
    monkeypatch.setattr(common.pwd, "getpwuid", getpwuid)
    monkeypatch.setattr(common.pwd, "getpwnam", getpwnam)


@pytest.mark.parametrize("env", [{}, {"USER": ""}, {"USER": "mallory"}, {"USER": "0"}, {"LOGNAME": "mallory"}])
def test_the_actor_is_the_os_account_whatever_user_says(monkeypatch, env):
    """cron, systemd and some shells leave $USER unset; anyone can set it: it is never read."""
    for name in ("USER", "LOGNAME", "SUDO_USER"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    fake_accounts(monkeypatch, 1000, {0: "root", 1000: "erin"})
    assert (current_user(), actor()) == ("erin", "cli:erin")
    fake_accounts(monkeypatch, 0, {0: "root", 1000: "erin"})
    assert (current_user(), actor()) == ("root", "cli:root")


def test_a_uid_without_an_account_is_named_by_its_number(monkeypatch):
    monkeypatch.delenv("SUDO_USER", raising=False)
    fake_accounts(monkeypatch, 12345, {0: "root"})  # a container run with --user 12345
    assert (current_user(), actor()) == ("uid:12345", "cli:uid:12345")


def test_the_real_account_is_used_without_fakes(monkeypatch):
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.delenv("USER", raising=False)
    assert current_user() == pwd.getpwuid(os.geteuid()).pw_name
    assert actor() == f"cli:{current_user()}" and actor() not in ("cli:", "cli:0")


def test_sudo_and_by_stand_beside_the_os_account(monkeypatch):
    fake_accounts(monkeypatch, 0, {0: "root", 1000: "erin", 1001: "alice"})
    monkeypatch.setenv("SUDO_USER", "erin")
    assert actor() == "cli:root (sudo erin)"
    assert actor("alice") == "cli:root (sudo erin; --by alice)"
    monkeypatch.delenv("SUDO_USER")
    assert actor("alice") == "cli:root (--by alice)"
    for claimed in ("", "root", "nobody-known"):  # unset, the account itself, or no such account: no claim
        monkeypatch.setenv("SUDO_USER", claimed)
        assert actor() == "cli:root", claimed


@pytest.mark.parametrize(("text", "expected"), [("alice", "alice"), ("  Alice Smith ", "Alice Smith"),
                                                ("ticket #4711", "ticket #4711"), ("a" * common.NAME_MAX, "a" * common.NAME_MAX)])
def test_by_takes_a_printable_name(text, expected):
    parser = with_by(argparse.ArgumentParser())
    assert parser.parse_args(["--by", text]).by == expected
    assert parser.parse_args([]).by is None


@pytest.mark.parametrize("text", ["", "   ", "alice\nbob", "al\x1b[2Jice", "a" * (common.NAME_MAX + 1), "ali\u202ece"])
def test_by_refuses_what_is_not_a_name(capsys, text):
    parser = with_by(argparse.ArgumentParser(prog="einvoice-gateway"))
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["--by", text])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --by: {text!r} is not a name" in err and "\x1b" not in err


# --- the store for one command --------------------------------------------------------------------------


async def test_opened_gives_the_instance_store_and_closes_it(inst):
    cfg = config_mod.load(inst.config)
    assert list(inst.state_dir.iterdir()) == []  # nothing has written to the fresh instance yet
    async with opened(cfg) as store:
        await store.audit.append("pytest", "test.note", None, None, {"n": 1})
        assert store.path.parent == inst.state_dir
    check = SqliteStore(inst.state_dir)  # what it wrote is there for the next command (and the daemon)
    try:
        [rec] = await audit_of(check, "test.note")
        assert (rec["actor"], rec["detail"]) == ("pytest", {"n": 1})
    finally:
        await check.close()


async def test_opened_closes_the_store_when_the_command_fails(inst, monkeypatch):
    closed: list[bool] = []

    class Spy(SqliteStore):
        async def close(self) -> None:
            closed.append(True)
            await super().close()

    monkeypatch.setattr(common, "open_store", lambda cfg: Spy(cfg.state_dir))
    with pytest.raises(RuntimeError, match="the command failed"):
        async with opened(config_mod.load(inst.config)):
            raise RuntimeError("the command failed")
    assert closed == [True]


# --- dates and times ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("2026-11-20", datetime(2026, 11, 20, tzinfo=UTC)),
    ("2026-11-20T14:00:00Z", datetime(2026, 11, 20, 14, tzinfo=UTC)),
    ("2026-11-20T14:00:00", datetime(2026, 11, 20, 14, tzinfo=UTC)),  # no zone: UTC
    ("2026-11-20T16:30:00+02:00", datetime(2026, 11, 20, 14, 30, tzinfo=UTC)),
])
def test_when_reads_a_date_or_a_time_in_utc(text, expected):
    got = when(text)
    assert got == expected and got.utcoffset() is not None and got.utcoffset().total_seconds() == 0


@pytest.mark.parametrize("text", ["", "yesterday", "20.11.2026", "2026-13-01", "2026-11-20T25:00:00Z"])
def test_when_refuses_what_is_not_a_date_saying_how_to_write_one(text):
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        when(text)
    assert str(caught.value) == f"{text!r} is not a date (YYYY-MM-DD) or time (2026-11-20T14:00:00Z)"


def test_when_as_an_option_type_is_a_usage_error(capsys):
    parser = argparse.ArgumentParser(prog="einvoice-gateway")
    parser.add_argument("--since", type=when)
    assert parser.parse_args(["--since", "2026-11-20"]).since == datetime(2026, 11, 20, tzinfo=UTC)
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(["--since", "soon"])
    assert caught.value.code == 2
    assert "argument --since: 'soon' is not a date (YYYY-MM-DD)" in capsys.readouterr().err


# --- limits -----------------------------------------------------------------------------------------------


def test_count_is_a_whole_number_of_at_least_one(capsys):
    parser = argparse.ArgumentParser(prog="einvoice-gateway")
    parser.add_argument("--limit", type=count)
    assert parser.parse_args(["--limit", "3"]).limit == 3
    for bad in ("0", "-1", "x", "1.5", ""):
        with pytest.raises(SystemExit):
            parser.parse_args(["--limit", bad])
        assert f"argument --limit: {bad!r} is not a whole number of at least 1" in capsys.readouterr().err
