"""gateway/cli/audit.py: the ``audit`` commands' own behaviour on a real instance's log.

``audit list`` shows the newest records first, a table under a header (or JSON; an empty log says so);
``audit export`` refuses a file that exists (exit 2, naming it) and never overwrites it, and a time that is
not one; ``audit verify --file`` refuses a file that is not an export (exit 2, nothing on stdout).  The log is the populated instance of
tests/helpers/audit.py (made once per session, shared with tests/operations/test_audit.py, which tests the
chain, its checkpoints and exports); each test works on its own copy.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from gateway.cli import main as cli
from tests.helpers import run_command, table_rows
from tests.helpers.audit import Populated, State, copy_of


@pytest.fixture
def state(audited: Populated, tmp_path: Path) -> State:
    return copy_of(audited, tmp_path)


# --- audit list ----------------------------------------------------------------------------------------


def test_audit_list_shows_the_newest_records_first(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_command(capsys, "audit", "list", "--limit", "3", "-c", state.config)
    assert code == 0, err
    assert out.split()[:6] == ["SEQ", "AT", "ACTOR", "ACTION", "PARTNER", "MESSAGE"]
    rows = state.rows()
    shown = table_rows(out)
    assert [int(r["SEQ"]) for r in shown] == [rows[-1]["seq"], rows[-2]["seq"], rows[-3]["seq"]]
    assert [r["ACTION"] for r in shown] == ["operator.note", "audit.checkpoint", "delivery.delivered"]
    assert [r["ACTOR"] for r in shown] == [rows[-1]["actor"], rows[-2]["actor"], rows[-3]["actor"]]

    code, out, err = run_command(capsys, "audit", "list", "--limit", "2", "--json", "-c", state.config)
    assert code == 0, err
    listed = json.loads(out)
    assert [r["seq"] for r in listed] == [rows[-1]["seq"], rows[-2]["seq"]] and isinstance(listed[0]["detail"], dict)


@pytest.mark.parametrize("limit", ["0", "-3", "many"])
def test_audit_list_refuses_a_limit_that_is_not_a_count(state: State, capsys: pytest.CaptureFixture[str], limit: str) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["audit", "list", "--limit", limit, "-c", state.config])
    assert caught.value.code == 2 and "is not a whole number of at least 1" in capsys.readouterr().err


def test_audit_list_of_an_empty_log_says_so(inst, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_command(capsys, "audit", "list", "-c", str(inst.config))
    assert (code, out, err) == (0, "", "the audit log is empty\n")
    code, out, err = run_command(capsys, "audit", "list", "--json", "-c", str(inst.config))
    assert (code, json.loads(out), err) == (0, [], "")


# --- audit export ---------------------------------------------------------------------------------------


def test_export_refuses_an_existing_file_with_a_message(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    out.write_text("keep me\n")
    code, _, err = run_command(capsys, "audit", "export", "-o", str(out), "-c", state.config)
    assert code == 2 and err == f"einvoice-gateway: refused: -o: {out} exists; choose a new file name (an export is never overwritten)\n"
    assert out.read_text() == "keep me\n"


def test_export_refuses_a_time_that_is_not_one(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["audit", "export", "-o", str(tmp_path / "a.jsonl"), "--since", "last week", "-c", state.config])
    assert caught.value.code == 2 and "argument --since: 'last week' is not a date" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()


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
        assert code == 2 and err.startswith("einvoice-gateway: usage error: --file: "), (text, err)
        assert "is not an audit export" in err or "does not start with" in err, (text, err)
        assert out == ""
