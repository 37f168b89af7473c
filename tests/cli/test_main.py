"""gateway/cli/main.py: the dispatcher (and ``python -m gateway``, gateway/__main__.py).

Every subcommand the parser knows is dispatched to its group's ``run``, whose exit code is returned; a
configuration error is exit 2 with one line naming it; a usage error (no command, an unknown one, a
group without its action) is argparse's exit 2 with the usage; ``--version`` prints the version.  The
commands themselves are tested beside their modules (tests/cli/test_<group>.py and the modules they drive).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from gateway import __version__
from gateway.cli import documents, main, partners
from gateway.errors import ConfigError
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
