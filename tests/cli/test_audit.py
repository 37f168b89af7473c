"""gateway/cli/audit.py: the ``audit`` commands' own behaviour on a real instance's log.

``audit list`` shows the newest records first, one tab-separated line each; ``audit export`` refuses a
file that exists (exit 2, naming it) and never overwrites it; ``audit verify --file`` refuses a file
that is not an export (exit 2, nothing on stdout).  The log is the populated instance of
tests/helpers/audit.py (made once per session, shared with tests/operations/test_audit.py, which tests the
chain, its checkpoints and exports); each test works on its own copy.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from gateway.cli import main as cli
from tests.helpers import run_command
from tests.helpers.audit import Populated, State, copy_of


@pytest.fixture
def state(audited: Populated, tmp_path: Path) -> State:
    return copy_of(audited, tmp_path)


# --- audit list ----------------------------------------------------------------------------------------


def test_audit_list_shows_the_newest_records_first(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_command(capsys, "audit", "list", "--limit", "3", "-c", state.config)
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    rows = state.rows()
    assert [int(f[0]) for f in lines] == [rows[-1]["seq"], rows[-2]["seq"], rows[-3]["seq"]]
    assert [f[3] for f in lines] == ["operator.note", "audit.checkpoint", "delivery.delivered"]


# --- audit export ---------------------------------------------------------------------------------------


def test_export_refuses_an_existing_file_with_a_message(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    out.write_text("keep me\n")
    code, _, err = run_command(capsys, "audit", "export", "-o", str(out), "-c", state.config)
    assert code == 2 and str(out) in err
    assert out.read_text() == "keep me\n"


def test_export_never_overwrites_an_existing_file(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    out.write_text("keep me\n")
    with contextlib.suppress(FileExistsError):
        cli.main(["audit", "export", "-o", str(out), "-c", state.config])
    capsys.readouterr()
    assert out.read_text() == "keep me\n"


# --- audit verify --file --------------------------------------------------------------------------------


def test_verify_refuses_a_file_that_is_not_an_export(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for text in ("", "not json\n", json.dumps({"format": "something else"}) + "\n"):
        path = tmp_path / "bad.jsonl"
        path.write_text(text)
        code, out, err = run_command(capsys, "audit", "verify", "--file", str(path), "-c", state.config)
        assert code == 2 and ("is not an audit export" in err or "does not start with" in err), (text, err)
        assert out == ""
