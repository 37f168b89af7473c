"""gateway/errors.py: the one exception tree, drawn in the module's docstring.

Permanent rejections (the sender must change something) and transient failures (retry; nothing was
stored) are told apart by class; each class has a stable ``code`` and an HTTP status, and ``as_json``
is exactly what a sender is shown: code, message and details, nothing else (no traceback, no cause).
"""

from __future__ import annotations

import inspect
import json
import re

import pytest

from gateway import errors
from gateway.errors import (
    Conflict,
    Detail,
    GatewayError,
    InternalError,
    Malformed,
    Rejected,
    SchemaInvalid,
    Transient,
)

CLASSES = {name: cls for name, cls in vars(errors).items() if inspect.isclass(cls) and issubclass(cls, GatewayError)}


def drawn_tree() -> dict[str, tuple[str | None, int | None]]:
    """class name -> (parent drawn above it, HTTP status drawn beside it), read from the module docstring."""
    out: dict[str, tuple[str | None, int | None]] = {}
    stack: list[tuple[int, str]] = []
    for line in (errors.__doc__ or "").splitlines():
        m = re.match(r"^(\s*(?:[│ ]\s*)*(?:[├└]── )?)(\w+)\s+(?:(\d{3})\s)?", line)
        if not m or m.group(2) not in CLASSES:
            continue
        depth = len(m.group(1))
        while stack and stack[-1][0] >= depth:
            stack.pop()
        out[m.group(2)] = (stack[-1][1] if stack else None, int(m.group(3)) if m.group(3) else None)
        stack.append((depth, m.group(2)))
    return out


def test_the_docstring_draws_the_real_tree() -> None:
    """The tree a reader is shown is the tree the code has: every class, its parent and its status."""
    tree = drawn_tree()
    assert sorted(tree) == sorted(CLASSES)
    for name, (parent, status) in tree.items():
        cls = CLASSES[name]
        assert cls.__bases__ == ((CLASSES[parent],) if parent else (Exception,)), name
        if status is not None:
            assert cls.http_status == status, name


def test_permanent_and_transient_are_disjoint_and_answer_as_http_says() -> None:
    rejected = [c for c in CLASSES.values() if issubclass(c, Rejected)]
    transient = [c for c in CLASSES.values() if issubclass(c, Transient)]
    assert rejected and transient and not set(rejected) & set(transient)
    assert all(400 <= c.http_status < 500 for c in rejected)  # the client's to fix
    assert all(c.http_status >= 500 for c in transient)  # ours; the sender retries
    assert {c.__name__ for c in transient if c.http_status == 503} == {"Transient", "StorageUnavailable", "Overloaded"}
    assert InternalError.http_status == 500


def test_codes_are_distinct_screaming_snake_case() -> None:
    codes = [c.code for c in CLASSES.values()]
    assert len(set(codes)) == len(codes), codes
    assert all(re.fullmatch(r"[A-Z]+(?:_[A-Z]+)*", c) for c in codes), codes


def test_as_json_is_what_the_sender_sees() -> None:
    exc = SchemaInvalid("the Invoice does not conform to the UBL 2.1 schema (2 violation(s))",
                        [Detail("cbc:IssueDate: '2026-13-01' is not a valid date", line=12, path="/Invoice/cbc:IssueDate"),
                         Detail("element cbc:Foo is not expected")])
    assert exc.as_json() == {
        "error": "SCHEMA_INVALID",
        "message": "the Invoice does not conform to the UBL 2.1 schema (2 violation(s))",
        "details": [{"message": "cbc:IssueDate: '2026-13-01' is not a valid date", "line": 12, "path": "/Invoice/cbc:IssueDate"},
                    {"message": "element cbc:Foo is not expected"}],
    }
    assert json.loads(json.dumps(exc.as_json())) == exc.as_json()  # plain JSON
    assert str(exc) == exc.message and exc.http_status == 422


def test_detail_keeps_line_zero_and_an_empty_path() -> None:
    """Only an absent line or path is left out; 0 and "" are values."""
    assert Detail("m", line=0, path="").as_json() == {"message": "m", "line": 0, "path": ""}
    assert Detail("m").as_json() == {"message": "m"}


def test_a_code_given_to_one_error_stays_with_that_error() -> None:
    specific = Malformed("any DTD is refused", code="DTD_FORBIDDEN")
    assert (specific.code, specific.http_status) == ("DTD_FORBIDDEN", 400)
    assert specific.as_json()["error"] == "DTD_FORBIDDEN"
    assert Malformed("x").code == Malformed.code == "MALFORMED"  # the class and later errors keep theirs
    assert isinstance(specific, Rejected)


def test_details_are_copied() -> None:
    """An error's details cannot be changed through the list it was made from (one list reused per request)."""
    found = [Detail("first")]
    exc = Conflict("same invoice number, other content", found)
    found.append(Detail("added later"))
    assert [d.message for d in exc.details] == ["first"]
    assert GatewayError("x").details == [] and GatewayError("x", None).as_json()["details"] == []


def test_detail_is_frozen() -> None:
    d = Detail("m", line=1)
    with pytest.raises(AttributeError):
        d.line = 2  # type: ignore[misc]


def test_internal_error_tells_the_sender_nothing_but_to_retry() -> None:
    try:
        try:
            raise KeyError("/var/lib/einvoice/keys/master-1.key")
        except KeyError as exc:
            raise InternalError() from exc
    except InternalError as err:
        shown = json.dumps(err.as_json())
    assert json.loads(shown) == {"error": "INTERNAL_ERROR", "message": "the gateway failed to process the request; retry later",
                                 "details": []}
    assert "master-1.key" not in shown  # the cause is for the log, never the reply
