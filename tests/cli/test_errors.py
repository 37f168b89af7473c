"""gateway/cli/errors.py: what a command says when it does not do what was asked, and its exit code.

Each error a command may raise is one line on stderr, ``einvoice-gateway: KIND: …``: the CLI's own
(usage error, not found, refused: exit 2; failed: exit 1), a configuration error (exit 2), the
gateway's refusals (exit 2) and transient failures (exit 1), and a file that cannot be read (exit 1).
How ``main`` uses it, for every group, is in tests/cli/test_main.py.
"""

from __future__ import annotations

import errno

import pytest

from gateway.cli.errors import Failed, NotFound, Refused, UsageError, classify, said, said_as
from gateway.errors import ConfigError, Conflict, Forbidden, Malformed, StorageUnavailable, VaultError
from gateway.storage.base import AccountError, NotHeld


@pytest.mark.parametrize(("exc", "expected"), [
    (UsageError("--cert and --key go together"), ("usage error", 2, "--cert and --key go together")),
    (NotFound("no message m-1"), ("not found", 2, "no message m-1")),
    (Refused("message m-1 was already rejected"), ("refused", 2, "message m-1 was already rejected")),
    (Failed("the store is busy"), ("failed", 1, "the store is busy")),
    (ConfigError("https.listen_port: not a port"), ("configuration error", 2, "https.listen_port: not a port")),
    (NotHeld("message m-1 was already rejected"), ("refused", 2, "message m-1 was already rejected")),
    (AccountError("a user named 'carol' exists already"), ("refused", 2, "a user named 'carol' exists already")),
    (Malformed("the body is not well-formed XML"), ("refused", 2, "the body is not well-formed XML")),
    (Forbidden("suspended"), ("refused", 2, "suspended")),
    (Conflict("same number"), ("refused", 2, "same number")),
    (StorageUnavailable("database is locked"), ("failed", 1, "database is locked")),
    (VaultError("the object does not open"), ("failed", 1, "the object does not open")),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "in.xml"),
     ("failed", 1, "in.xml: No such file or directory")),
    (PermissionError(errno.EACCES, "Permission denied"), ("failed", 1, "Permission denied")),
    (OSError("something odd"), ("failed", 1, "something odd")),
])
def test_each_error_has_its_kind_and_exit_code(exc, expected):
    assert classify(exc) == expected


def test_said_is_one_line_on_stderr(capsys):
    assert said(Refused("two\nlines, and an escape \x1b[2J")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "einvoice-gateway: refused: two lines, and an escape \\x1b[2J\n"


def test_said_as_gives_a_lower_layers_configuration_error_its_kind():
    with pytest.raises(Refused) as caught, said_as(Refused):
        raise ConfigError("--party-id[0]: '0088:1' is already registered for partner 'acme'")
    assert caught.value.message == "--party-id[0]: '0088:1' is already registered for partner 'acme'"
    with pytest.raises(NotFound), said_as(Refused):  # the CLI's own errors pass as they are
        raise NotFound("no partner named 'x'")
    with pytest.raises(ValueError), said_as(UsageError):  # and anything else too
        raise ValueError("a bug")
