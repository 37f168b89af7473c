"""gateway/config/reader.py: typed access to TOML tables that remembers each key's path, and secret files.

A ``Reader`` returns a key's value only if it has the asked-for type and range (a TOML boolean is
not a number), refuses otherwise with a message that starts with the key's full path, and at
``done()`` refuses any key nobody asked for.  Relative paths are the configuration file's folder's.
A secret file may be read by its owner only (or root's); under systemd the service's credential of
the same name (LoadCredential=) is read instead, and is exempt.  A master key entry is a file or a
folder of ``*.key`` files.

What loading a whole configuration shows (key paths of unknown keys, wrong types, ranges, missing
files) is tests/config/test_load.py; this file is the Reader's own contract, one key at a time.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from gateway.config import reader as reader_mod
from gateway.config.reader import Reader, check_secret_file, credential, key_files
from gateway.errors import ConfigError


def message(fn) -> str:
    with pytest.raises(ConfigError) as err:
        fn()
    return err.value.message


def secret_file(path: Path, mode: int = 0o600, data: bytes = b"k" * 32) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture
def no_credentials(monkeypatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def test_a_table_is_required_and_named() -> None:
    assert message(lambda: Reader(["not", "a", "table"], "", Path("/"))) == "(top level): expected a table"
    top = Reader({"https": 443, "routes": {"a": 1}}, "", Path("/"))
    assert message(lambda: top.table("https")) == "https: expected a table"
    assert message(lambda: top.tables("routes")) == "routes: expected an array of tables ([[routes]])"


def test_key_paths_follow_nested_tables_and_arrays() -> None:
    top = Reader({"destinations": [{"name": "a"}, {"name": "b", "tls": {"port": "x"}}]}, "", Path("/"))
    second = top.tables("destinations")[1]
    assert second.key("url") == "destinations[1].url"
    assert message(lambda: second.table("tls").integer("port", 0)) == "destinations[1].tls.port: expected an integer, got 'x'"
    assert top.table("absent").key("x") == "absent.x"  # an absent table reads as empty, with its path


@pytest.mark.parametrize(("method", "value", "says"), [
    ("integer", True, "expected an integer, got True"),  # TOML true is not 1
    ("integer", 1.0, "expected an integer, got 1.0"),
    ("number", False, "expected a number, got False"),
    ("number", "1.5", "expected a number, got '1.5'"),
    ("boolean", "yes", "expected true or false, got 'yes'"),
    ("boolean", 1, "expected true or false, got 1"),
    ("string", 42, "expected a string, got int"),
])
def test_values_of_the_wrong_type_are_refused(method: str, value: object, says: str) -> None:
    r = Reader({"k": value}, "section", Path("/"))
    default = {"integer": 0, "number": 0.0, "boolean": False, "string": ""}[method]
    assert message(lambda: getattr(r, method)("k", default)) == f"section.k: {says}"


def test_numbers_and_ranges() -> None:
    r = Reader({"workers": 64, "n": 3, "neg": -0.5, "port": 0}, "s", Path("/"))
    assert message(lambda: r.integer("workers", 0, minimum=0, maximum=32)) == "s.workers: 64 is out of range (must be between 0 and 32)"
    assert message(lambda: r.number("neg", 1.0)) == "s.neg: -0.5 is out of range (must be >= 0.0, and finite)"
    assert message(lambda: r.integer("port", 1, minimum=1)) == "s.port: 0 is out of range (must be >= 1)"
    n = r.number("n", 0.0)
    assert n == 3.0 and isinstance(n, float)  # an integer where a number is asked for is that number
    assert r.integer("absent", 7, minimum=1, maximum=9) == 7 and r.number("absent2", 2.5) == 2.5
    assert r.boolean("absent3", True) is True


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_and_infinity_are_not_numbers_in_range(value: float) -> None:
    # nan compares false with everything; inf would switch a timeout or an interval off without saying so
    r = Reader({"read_timeout_s": value}, "https", Path("/"))
    assert message(lambda: r.number("read_timeout_s", 60.0, minimum=1.0)) == \
        f"https.read_timeout_s: {value} is out of range (must be >= 1.0, and finite)"


def test_lists() -> None:
    r = Reader({"days": [30, 7, 1], "bad": [30, True], "big": [400], "names": ["a", 1], "none": []}, "ops", Path("/"))
    assert r.int_list("days", [], 1, 365) == [30, 7, 1]
    assert r.int_list("absent", [14], 1, 365) == [14]
    for key in ("bad", "big"):
        assert message(lambda key=key: r.int_list(key, [], 1, 365)) == f"ops.{key}: expected a list of whole numbers between 1 and 365"
    assert message(lambda: r.str_list("names")) == "ops.names: expected a list of strings"
    assert message(lambda: r.str_list("missing", required=True)) == "ops.missing: missing (required)"
    assert r.str_list("missing2") == []
    assert message(lambda: r.files("none", required=True)) == "ops.none: must name at least one file"


def test_entries_mix_strings_and_tables_with_their_paths() -> None:
    r = Reader({"destinations": ["erp", {"name": "archive"}], "bad": ["erp", 3]}, "routes[0]", Path("/"))
    first, second = r.entries("destinations")
    assert first == "erp"
    assert isinstance(second, Reader) and second.string("name") == "archive"
    assert second.key("name") == "routes[0].destinations[1].name"
    assert message(lambda: r.entries("bad")) == "routes[0].bad: expected a list of strings or tables"


def test_choice_names_the_choices() -> None:
    r = Reader({"invalid_iban": "warn"}, "fraud", Path("/"))
    assert message(lambda: r.choice("invalid_iban", ("reject", "hold"), "reject")) == \
        "fraud.invalid_iban: 'warn' is not one of reject, hold"
    assert r.choice("absent", ("reject", "hold"), "hold") == "hold"


def test_done_refuses_the_keys_nobody_asked_for() -> None:
    r = Reader({"port": 1, "zeta": 0, "colour": "red", "has_only": 1}, "https", Path("/"))
    r.integer("port", 0)
    assert r.has("has_only") and not r.has("absent")
    assert message(r.done) == "https.colour: unknown key (check the spelling)"  # the first, alphabetically
    r.string("colour")
    r.integer("zeta", 0)
    assert message(r.done) == "https.has_only: unknown key (check the spelling)"  # asking whether it is there is not reading it
    r.integer("has_only", 0)
    r.done()


def test_paths_are_relative_to_the_configuration_folder(tmp_path: Path, monkeypatch) -> None:
    base = tmp_path / "etc"
    (base / "pki").mkdir(parents=True)
    (base / "pki" / "ca.crt").write_text("x")
    monkeypatch.chdir(tmp_path)  # not the working directory's
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    r = Reader({"ca": "pki/ca.crt", "gone": "pki/gone.crt", "dir": "pki"}, "https", base)
    assert r.file("ca") == base / "pki" / "ca.crt"
    assert r.resolve("/abs/x") == Path("/abs/x")
    assert r.resolve("~/x") == tmp_path / "home" / "x"
    assert message(lambda: r.file("gone")) == f"https.gone: file not found ({base / 'pki' / 'gone.crt'})"
    assert message(lambda: r.file("dir")) == f"https.dir: not a regular file ({base / 'pki'})"
    assert message(lambda: r.file("ca", "pki/nope", 2)) == f"https.ca[2]: file not found ({base / 'pki' / 'nope'})"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o610, 0o601, 0o660])
def test_a_secret_readable_by_group_or_others_is_refused_with_the_fix(tmp_path: Path, no_credentials, mode: int) -> None:
    key = secret_file(tmp_path / "keys" / "hmac.key", mode)
    r = Reader({"hmac_key_file": "keys/hmac.key"}, "destinations[1]", tmp_path)
    assert message(lambda: r.secret("hmac_key_file")) == (
        f"destinations[1].hmac_key_file: {key} is accessible by group or others (mode {mode:04o}); run: chmod 600 {key}")
    key.chmod(0o400)
    assert r.secret("hmac_key_file") == key  # owner-only is fine, read-only too


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_a_secret_of_another_user_is_refused(tmp_path: Path, no_credentials, monkeypatch) -> None:
    key = secret_file(tmp_path / "token")
    os.chown(key, 4242, 4242)
    with monkeypatch.context() as m:
        m.setattr(reader_mod.os, "geteuid", lambda: 1000)  # the service's user
        assert message(lambda: check_secret_file(key, "admin.token_file")) == \
            f"admin.token_file: {key} belongs to uid 4242, not to the gateway's user (1000)"
        os.chown(key, 0, 0)
        check_secret_file(key, "admin.token_file")  # root's file: root put it there for the service
    os.chown(key, 4242, 4242)
    check_secret_file(key, "admin.token_file")  # the service running as root reads anyone's


def test_a_systemd_credential_replaces_the_file_and_is_exempt(tmp_path: Path, monkeypatch) -> None:
    creds = tmp_path / "credentials"
    configured = secret_file(tmp_path / "etc" / "keys" / "hmac.key", 0o644)  # would be refused if read
    copy = secret_file(creds / "hmac.key", 0o440)  # root-owned 0440 with an ACL, as systemd may leave it
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    r = Reader({"hmac_key_file": "keys/hmac.key"}, "destinations[1]", tmp_path / "etc")
    assert r.secret("hmac_key_file") == copy
    assert credential(configured) == copy
    other = secret_file(tmp_path / "etc" / "other.key")
    assert credential(other) == other  # no credential of that name: the file itself
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    assert credential(configured) == configured


def test_a_credential_for_a_file_in_a_loaded_folder(tmp_path: Path, monkeypatch) -> None:
    """LoadCredential=keys:/etc/gw/keys gives the folder's files as keys_<file>."""
    creds = tmp_path / "credentials"
    configured = secret_file(tmp_path / "etc" / "keys" / "master-1.key")
    copy = secret_file(creds / "keys_master-1.key", 0o440)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert credential(configured) == copy
    check_secret_file(copy, "vault.keys[0]")  # exempt: systemd gives the service alone access
    with pytest.raises(ConfigError):
        check_secret_file(secret_file(tmp_path / "elsewhere" / "x.key", 0o440), "vault.keys[0]")  # only in that folder


def test_master_key_entries(tmp_path: Path, no_credentials, monkeypatch) -> None:
    keys = tmp_path / "keys"
    for name in ("master-2.key", "master-1.key", "notes.txt", "old.key.retired"):
        secret_file(keys / name)
    assert key_files(keys, "vault.keys[0]") == [keys / "master-1.key", keys / "master-2.key"]  # *.key only, sorted
    assert key_files(keys / "master-2.key", "vault.keys[0]") == [keys / "master-2.key"]
    (tmp_path / "empty").mkdir()
    assert message(lambda: key_files(tmp_path / "empty", "vault.keys[1]")) == \
        f"vault.keys[1]: the folder {tmp_path / 'empty'} holds no *.key file"
    assert message(lambda: key_files(tmp_path / "absent.key", "vault.keys[2]")) == \
        f"vault.keys[2]: file not found ({tmp_path / 'absent.key'})"

    creds = tmp_path / "credentials"
    copies = [secret_file(creds / f"keys_master-{i}.key", 0o440) for i in (3, 1)]
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert key_files(keys, "vault.keys[0]") == sorted(copies)  # the folder as systemd gave it
