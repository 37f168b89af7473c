"""What commands print: tables and records for people, JSON for programs.

A listing is a table with a header (columns aligned, two spaces apart, the last one as long as it
is), or with ``--json`` one JSON array; an empty listing prints nothing on stdout and says so on
stderr (``[]`` with ``--json``), exit 0.  One record (``show``) is ``label: value`` lines, nested
lists indented under their label, or with ``--json`` one JSON object.

Much of what is shown came from outside (invoice numbers, certificate subjects, a remote ERP's error
text): control and format characters are printed escaped, so that a partner cannot move the
operator's cursor, rewrite a line or reorder it (bidi overrides).  JSON escapes them by itself.
"""

from __future__ import annotations

import json
import sys
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
Column = tuple[str, Callable[[T], object]]  # header, and the cell of a row
GAP = "  "


def printable(value: object) -> str:
    """``value`` as one line of text: None and "" are "-", booleans yes/no, control and format characters escaped."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c == " " or unicodedata.category(c)[0] not in "CZ" else
                   " " if c in "\t\n\r" else c.encode("unicode_escape").decode("ascii") for c in text)


def table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of an aligned table, the header first."""
    cells = [[printable(h) for h in header], *([printable(c) for c in r] for r in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return [GAP.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def listing(rows: Sequence[T], as_json: bool, columns: Sequence[Column[T]], empty: str,
            as_dict: Callable[[T], Any] | None = None) -> int:
    """A listing (exit 0): a table of ``columns``, or a JSON array of ``as_dict`` (default: each row's
    ``as_json()``); no rows: ``empty`` on stderr, or ``[]``."""
    if as_json:
        print_json([as_dict(r) if as_dict is not None else r.as_json() for r in rows])  # type: ignore[attr-defined]
    elif not rows:
        print(empty, file=sys.stderr)
    else:
        for line in table([h.upper() for h, _ in columns], ([cell(r) for _, cell in columns] for r in rows)):
            print(line)
    return 0


def _label(key: str) -> str:
    return key.replace("_", " ")


def _scalar(value: object) -> bool:
    return not isinstance(value, Mapping | list | tuple)


def record_lines(data: Mapping[str, Any], indent: str = "") -> list[str]:
    """A record as ``label: value`` lines: labels aligned, a list of plain values on one line, lists of
    records and nested records indented under their label."""
    if not data:
        return [f"{indent}-"]
    width = max(len(_label(k)) for k in data) + 1
    lines = []
    for key, value in data.items():
        head = f"{indent}{(_label(key) + ':').ljust(width)}"
        if _scalar(value):
            lines.append(f"{head} {printable(value)}")
        elif not value:
            lines.append(f"{head} -")
        elif isinstance(value, Mapping):
            lines += [head.rstrip(), *record_lines(value, indent + "  ")]
        elif all(_scalar(v) for v in value):
            lines.append(f"{head} {', '.join(printable(v) for v in value)}")
        else:
            lines.append(head.rstrip())
            for item in value:
                inner = record_lines(item, indent + "    ") if isinstance(item, Mapping) else [f"{indent}    {printable(item)}"]
                lines += [f"{indent}  - {inner[0].lstrip()}", *inner[1:]]
    return lines


def record(data: Mapping[str, Any], as_json: bool) -> int:
    """One record (exit 0): labelled lines, or one JSON object."""
    if as_json:
        print_json(data)
    else:
        for line in record_lines(data):
            print(line)
    return 0
