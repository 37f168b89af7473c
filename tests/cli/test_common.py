"""gateway/cli/common.py: what every command group shares.

``-c/--config`` and its default (EINVOICE_GATEWAY_CONFIG, else /etc/einvoice-gateway/config.toml); the
acting user for the audit log (the user behind sudo first); ``opened``, the instance's store for one
command, closed however the command ends; ``when``, the dates and times options take (in UTC);
listings as JSON or tab-separated lines; one record, or exit 1 naming what is missing; a refusal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from gateway.cli import common
from gateway.cli.common import current_user, opened, print_one, print_rows, refused, when, with_config
from gateway.config import load as config_mod
from gateway.storage.sqlite.store import SqliteStore
from tests.helpers import ENV, audit_of


@dataclass(frozen=True)
class Row:
    name: str
    n: int

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "n": self.n}


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


def test_current_user_is_the_user_behind_sudo_first(monkeypatch):
    monkeypatch.setenv("USER", "root")
    monkeypatch.setenv("SUDO_USER", "alice")
    assert current_user() == "alice"
    monkeypatch.delenv("SUDO_USER")
    assert current_user() == "root"
    monkeypatch.setenv("SUDO_USER", "")  # set but empty: not a user
    assert current_user() == "root"
    monkeypatch.delenv("USER")
    assert current_user() == str(os.getuid())


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


# --- output ------------------------------------------------------------------------------------------------


def test_print_rows_as_json_or_lines(capsys):
    rows = [Row("a", 1), Row("b", 2)]
    assert print_rows(rows, True, lambda r: f"{r.name}\t{r.n}") == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "a", "n": 1}, {"name": "b", "n": 2}]
    assert print_rows(rows, False, lambda r: f"{r.name}\t{r.n}") == 0
    assert capsys.readouterr().out == "a\t1\nb\t2\n"
    assert print_rows([], True, str) == 0 and json.loads(capsys.readouterr().out) == []
    assert print_rows([], False, str) == 0 and capsys.readouterr().out == ""


def test_print_one_shows_the_record_or_exits_1_naming_what_is_missing(capsys):
    assert print_one(Row("a", 1), "no such row") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"name": "a", "n": 1} and captured.err == ""
    assert print_one(None, "no message 1234") == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "einvoice-gateway: no message 1234\n")


def test_refused_is_exit_1_on_stderr(capsys):
    assert refused("the message is not held") == 1
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "einvoice-gateway: the message is not held\n")

