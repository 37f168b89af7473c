"""gateway/cli/output.py: what commands print.

A listing is an aligned table under a header, or a JSON array with --json; empty, it prints nothing on
stdout and says so on stderr (``[]`` with --json), exit 0.  One record is ``label: value`` lines (nested
lists indented) or one JSON object.  Control and format characters from outside (an invoice number, a
remote error text) are printed escaped: they cannot move the cursor or reorder a line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from gateway.cli.output import listing, printable, record, record_lines, table


@dataclass(frozen=True)
class Row:
    name: str
    n: int

    def as_json(self) -> dict[str, object]:
        return {"name": self.name, "n": self.n}


COLUMNS = [("name", lambda r: r.name), ("count", lambda r: r.n)]


def test_a_listing_is_a_table_under_a_header(capsys):
    assert listing([Row("alpha", 1), Row("b", 22)], False, COLUMNS, "no rows") == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["NAME   COUNT", "alpha  1", "b      22"]
    assert captured.err == ""


def test_a_listing_as_json(capsys):
    assert listing([Row("a", 1), Row("b", 2)], True, COLUMNS, "no rows") == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "a", "n": 1}, {"name": "b", "n": 2}]
    assert listing([Row("a", 1)], True, COLUMNS, "no rows", lambda r: {"only": r.name}) == 0
    assert json.loads(capsys.readouterr().out) == [{"only": "a"}]


def test_an_empty_listing_says_so_on_stderr_or_is_an_empty_array(capsys):
    assert listing([], False, COLUMNS, "no rows match") == 0
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "no rows match\n")
    assert listing([], True, COLUMNS, "no rows match") == 0
    captured = capsys.readouterr()
    assert (json.loads(captured.out), captured.err) == ([], "")


def test_table_aligns_columns_and_keeps_the_last_one_whole():
    lines = table(["A", "B", "C"], [["x", None, "a long last cell"], ["yyyy", True, ""]])
    assert lines == ["A     B    C", "x     -    a long last cell", "yyyy  yes  -"]


@pytest.mark.parametrize(("value", "shown"), [
    (None, "-"), ("", "-"), (True, "yes"), (False, "no"), (3, "3"), ("plain text", "plain text"), ("Zürich €", "Zürich €"),
    ("INV-1\x1b[2J\x1b[31m", "INV-1\\x1b[2J\\x1b[31m"),  # a terminal escape from a partner's invoice number
    ("abc\u202edcba", "abc\\u202edcba"),  # a bidi override that would reorder the line
    ("line one\nline two\ttab\r", "line one line two tab "),
    ("zero\u200bwidth", "zero\\u200bwidth"), ("\x7f", "\\x7f"), ("\u0085", "\\x85"),
])
def test_printable_escapes_what_would_act_on_the_terminal(value, shown):
    assert printable(value) == shown


def test_a_record_is_labelled_lines(capsys):
    data = {"message_id": "m-1", "signature": None, "valid": True, "party_ids": ["0088:1", "DE1"], "emails": [],
            "ceilings": {"EUR": "100"}, "limits": {},
            "deliveries": [{"destination": "erp", "attempts": 2}, {"destination": "archive", "attempts": 0}]}
    assert record(data, False) == 0
    assert capsys.readouterr().out.splitlines() == [
        "message id: m-1",
        "signature:  -",
        "valid:      yes",
        "party ids:  0088:1, DE1",
        "emails:     -",
        "ceilings:",
        "  EUR: 100",
        "limits:     -",
        "deliveries:",
        "  - destination: erp",
        "    attempts:    2",
        "  - destination: archive",
        "    attempts:    0",
    ]
    assert record(data, True) == 0
    assert json.loads(capsys.readouterr().out) == data


def test_record_lines_escape_values_and_show_an_empty_record():
    assert record_lines({"subject": "CN=evil\x1b]0;owned\x07"}) == ["subject: CN=evil\\x1b]0;owned\\x07"]
    assert record_lines({}) == ["-"]
    assert record_lines({"history": [{"detail": {"note": "x"}}, "plain"]}) == [
        "history:", "  - detail:", "      note: x", "  - plain"]
