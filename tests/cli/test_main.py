"""gateway/cli/main.py: the dispatcher (and ``python -m gateway``, gateway/__main__.py).

Every subcommand the parser knows is dispatched to its group's ``run``, whose exit code is returned; an
error a command raises is one line on stderr with its kind and exit code (gateway/cli/errors.py), from
every group, never a traceback; a usage error (no command, an unknown one, a group without its action)
is argparse's exit 2 with the usage; every command, option and argument has help; ``--version`` prints
the version.  The commands themselves are tested beside their modules (tests/cli/test_<group>.py and the
modules they drive).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from gateway import __version__
from gateway.cli import documents, main, partners
from gateway.cli.errors import Failed, NotFound, Refused, UsageError
from gateway.errors import ConfigError, GatewayError, Malformed, StorageUnavailable
from gateway.storage.base import NotHeld
from tests.helpers import ENV


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = main._parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_subcommand_has_a_group_that_runs_it():
    assert set(subcommands()) == set(main.GROUPS)
    for command, group in main.GROUPS.items():
        assert callable(group.run) and callable(group.add_parsers), command


def test_a_command_is_run_by_its_group_and_its_exit_code_returned(monkeypatch):
    seen: list[argparse.Namespace] = []

    def run(args: argparse.Namespace) -> int:
        seen.append(args)
        return 1

    monkeypatch.setattr(documents, "run", run)
    assert main.main(["verify", "invoice.xml", "--cert", "a.pem"]) == 1
    [args] = seen
    assert (args.command, args.file, args.cert) == ("verify", "invoice.xml", ["a.pem"])


def test_a_configuration_error_is_exit_2_with_one_line_naming_it(monkeypatch, capsys):
    def run(args: argparse.Namespace) -> int:
        raise ConfigError("partners.file: something is wrong")

    monkeypatch.setattr(partners, "run", run)
    assert main.main(["partners", "list", "-c", "x.toml"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "einvoice-gateway: configuration error: partners.file: something is wrong\n"


# One command of each group, as the parser takes it.
ONE_OF_EACH = [["init", "d"], ["serve"], ["check-config"], ["demo"], ["partners", "list"], ["quarantine", "list"],
               ["messages", "list"], ["dead-letters"], ["sign", "a.xml", "b.xml"], ["verify", "a.xml"], ["keys", "list"],
               ["audit", "list"], ["backup", "verify", "b"], ["users", "list"], ["send", "a.xml"],
               ["pki", "issue-partner", "acme"]]
ERRORS: list[tuple[BaseException, int, str]] = [
    (UsageError("--cert and --key go together"), 2, "usage error: --cert and --key go together"),
    (NotFound("no message m-1"), 2, "not found: no message m-1"),
    (Refused("m-1 is signed already"), 2, "refused: m-1 is signed already"),
    (NotHeld("message m-1 was already rejected"), 2, "refused: message m-1 was already rejected"),
    (Malformed("the body is not well-formed XML"), 2, "refused: the body is not well-formed XML"),
    (ConfigError("https.listen_port: not a port"), 2, "configuration error: https.listen_port: not a port"),
    (Failed("the store is busy"), 1, "failed: the store is busy"),
    (StorageUnavailable("database is locked"), 1, "failed: database is locked"),
    (FileNotFoundError(2, "No such file or directory", "a.xml"), 1, "failed: a.xml: No such file or directory"),
]


@pytest.mark.parametrize("argv", ONE_OF_EACH, ids=" ".join)
@pytest.mark.parametrize(("error", "code", "line"), ERRORS, ids=[type(e).__name__ for e, _, _ in ERRORS])
def test_every_group_says_its_errors_in_one_line_with_their_exit_code(monkeypatch, capsys, argv, error, code, line):
    assert set(main.GROUPS) == {a[0] for a in ONE_OF_EACH}

    def run(args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setattr(main.GROUPS[argv[0]], "run", run)
    assert main.main(argv) == code
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"einvoice-gateway: {line}\n")


def test_a_bug_is_not_dressed_up_as_a_refusal(monkeypatch):
    def run(args: argparse.Namespace) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(partners, "run", run)
    with pytest.raises(KeyError):  # a traceback, for a report: not "refused"
        main.main(["partners", "list"])
    assert issubclass(NotHeld, GatewayError)


# A command whose output is far larger than a pipe holds, as `messages list` over a big store would print.
CHATTY = """
import sys
from gateway.cli import documents, main
documents.run = lambda args: [print("row", i) for i in range(200_000)] and 0
sys.exit(main.main(["verify", "any.xml"]))
"""


def test_a_reader_that_goes_away_stops_the_command_quietly():
    with subprocess.Popen([sys.executable, "-c", CHATTY], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline() == b"row 0\n"
        proc.stdout.close()  # what `| head -1` does once it has its line
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == main.READER_GONE
    assert err == b""  # no "failed: [Errno 32] Broken pipe", no "Exception ignored" from the last flush


def test_a_broken_pipe_elsewhere_is_still_a_failure(monkeypatch, capsys):
    def run(args: argparse.Namespace) -> int:
        raise BrokenPipeError(32, "Broken pipe")  # a socket or a child's pipe: standard output is fine

    monkeypatch.setattr(documents, "run", run)
    assert main.main(["verify", "any.xml"]) == 1
    assert capsys.readouterr().err.startswith("einvoice-gateway: failed: ")


def walk(parser: argparse.ArgumentParser, path: str = "einvoice-gateway") -> list[tuple[str, argparse.ArgumentParser]]:
    """The parser and every subcommand's, with the command line that reaches it."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                found += walk(sp, f"{path} {name}")
    return found


def without_help(parser: argparse.ArgumentParser) -> list[str]:
    """Every command, option and argument under ``parser`` that has no help text, as a command line."""
    missing = []
    for where, p in walk(parser):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}  # (argparse lists only those given help)
                missing += [f"{where} {name}" for name in action.choices if name not in helped]
            elif not action.help or not action.help.strip():
                missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")
    return missing


def test_every_command_option_and_argument_has_help():
    assert len(walk(main._parser())) > 40  # every command of every group is walked
    missing = without_help(main._parser())
    assert not missing, "no help text:\n" + "\n".join(missing)


def test_the_help_walk_finds_what_has_no_help():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", help="the command")
    sp = sub.add_parser("thing", help="does a thing")
    sp.add_argument("--quiet", action="store_true")
    sp.add_argument("file", help=" ")
    sp.add_argument("--hidden", help=argparse.SUPPRESS)  # hidden on purpose: not missing
    sub.add_parser("other")
    assert without_help(parser) == ["einvoice-gateway other", "einvoice-gateway thing --quiet",
                                    "einvoice-gateway thing file"]


def test_a_missing_configuration_file_is_a_configuration_error(tmp_path, capsys):
    missing = tmp_path / "nowhere.toml"
    assert main.main(["check-config", "-c", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"einvoice-gateway: configuration error: {missing}: configuration file not found\n"


@pytest.mark.parametrize(("argv", "says"), [
    ([], "the following arguments are required: command"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["partners"], "the following arguments are required: action"),
    (["backup", "create"], "the following arguments are required: dest"),
    (["partners", "add", "acme", "--signature-policy", "sometimes"], "invalid choice: 'sometimes'"),
])
def test_a_usage_error_is_exit_2_with_the_usage(capsys, argv, says):
    with pytest.raises(SystemExit) as caught:
        main.main(argv)
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("usage: einvoice-gateway") and says in captured.err, captured.err


def test_version(capsys):
    with pytest.raises(SystemExit) as caught:
        main.main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out == f"einvoice-gateway {__version__}\n"


def test_python_m_gateway_is_the_command_line():
    result = subprocess.run([sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True, timeout=60, env=ENV)
    assert (result.returncode, result.stdout) == (0, f"einvoice-gateway {__version__}\n"), result.stderr
    result = subprocess.run([sys.executable, "-m", "gateway"], capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 2 and "the following arguments are required: command" in result.stderr
