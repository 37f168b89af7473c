"""Logs: JSON lines, one INFO event per outcome, and no invoice content or key material in them."""

from __future__ import annotations

import io
import json
import logging
import tomllib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway import logs
from gateway.cli.demo import SAMPLE
from gateway.errors import StorageUnavailable
from gateway.operations.instance import DEMO_PARTNER
from gateway.tls import spki_sha256_der
from tests.helpers import post

CANARY = "CANARY7f3a9c2e51d0"
NOTE = b"<cbc:Note>Sample invoice shipped with einvoice-gateway.</cbc:Note>"


def variant(old: bytes, new: bytes) -> bytes:
    assert old in SAMPLE
    return SAMPLE.replace(old, new, 1)


ACCEPTED = variant(NOTE, f"<cbc:Note>{CANARY}</cbc:Note>".encode())
# The schema error names the bad value, so the canary is in the rejection the partner gets.
SCHEMA_INVALID = variant(b"<cbc:IssueDate>2026-11-02<", f"<cbc:IssueDate>{CANARY}<".encode())
# An unclosed element named after the canary: the syntax error names it.
NOT_WELL_FORMED = variant(NOTE, f"<{CANARY}>".encode())


async def test_no_content_or_secrets_in_logs(gateway, client, log_stream):
    session = client()
    replies = {}
    for name, body, expected in (("accepted", ACCEPTED, 202), ("schema", SCHEMA_INVALID, 422), ("malformed", NOT_WELL_FORMED, 400)):
        answer = await post(session, body)
        assert answer.status == expected, answer.text
        replies[name] = json.loads(answer.text)
        if name != "accepted":
            assert CANARY in answer.text  # the premise: the error itself carries the canary

    text = log_stream.getvalue()
    assert CANARY not in text
    inst = gateway.inst
    master = tomllib.loads(inst.master_key.read_text())["key"]
    assert master not in text
    for pem in (inst.demo_client.key.read_text(), inst.server.key.read_text()):
        lines = [line for line in pem.splitlines() if len(line) >= 16 and not line.startswith("-----")]
        assert lines and not any(line in text for line in lines)

    events = [json.loads(line) for line in text.splitlines()]
    assert events and all(isinstance(e, dict) for e in events)
    outcomes = [e for e in events if e["event"] in ("invoice.accepted", "invoice.rejected")]
    assert all(e["level"] == "info" and e["partner"] == DEMO_PARTNER for e in outcomes)
    [accepted] = [e for e in outcomes if e["event"] == "invoice.accepted"]
    assert accepted["message_id"] == replies["accepted"]["message_id"] and accepted["code"] == "ACCEPTED"
    rejected = [e for e in outcomes if e["event"] == "invoice.rejected"]
    assert sorted(e["code"] for e in rejected) == ["MALFORMED_XML", "SCHEMA_INVALID"]
    assert replies["schema"]["error"] == "SCHEMA_INVALID" and replies["malformed"]["error"] == "MALFORMED_XML"


def test_redact():
    event = {
        "event": "x",
        "private_key": "-----BEGIN PRIVATE KEY-----",
        "Body": "<Invoice/>",
        "api_token": "t0k3n",
        "PassWord": "hunter2",
        "xml_text": "<a/>",
        "sealed": b"\x01\x02",
        "key_id": "k1",
        "content_type": "application/xml",
        "raw": b"12345",
        "view": memoryview(b"123"),
        "long": "a" * 1000,
        "exact": "b" * logs.MAX_FIELD_CHARS,
        "count": 3,
    }
    out = logs.redact(None, "info", dict(event))
    for k in ("private_key", "Body", "api_token", "PassWord", "xml_text", "sealed"):
        assert out[k] == logs.REDACTED, k
    assert out["key_id"] == "k1" and out["content_type"] == "application/xml"
    assert out["raw"] == "[5 bytes]" and out["view"] == "[3 bytes]"
    assert out["long"] == "a" * logs.MAX_FIELD_CHARS + "…"
    assert out["exact"] == event["exact"] and out["count"] == 3 and out["event"] == "x"


def test_configured_output_is_json_and_redacted():
    stream = io.StringIO()
    logs.configure("info", stream)
    try:
        log = logs.get("test")
        log.debug("hidden.debug")
        log.info("shown", secret="s3cr3t", payload=b"abc", note="line\nbreak")
    finally:
        logs.configure("debug")
    [line] = stream.getvalue().splitlines()
    event = json.loads(line)
    assert event["event"] == "shown" and event["level"] == "info" and event["component"] == "test"
    assert event["secret"] == logs.REDACTED and event["payload"] == logs.REDACTED
    assert event["note"] == "line\nbreak" and "s3cr3t" not in line


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param(variant(b"<cbc:CustomizationID>", f"<cbc:UBLVersionID>{CANARY}</cbc:UBLVersionID><cbc:CustomizationID>".encode()),
                     "UNSUPPORTED_UBL_VERSION", id="ubl-version"),
        pytest.param(SAMPLE.replace(b"<Invoice ", f"<{CANARY} ".encode(), 1).replace(b"</Invoice>", f"</{CANARY}>".encode()),
                     "UNSUPPORTED_DOCUMENT_TYPE", id="root-element"),
        pytest.param(SAMPLE.replace(b"4000001000006", CANARY.encode()).replace(b"DE123456789", b"FR12345678901"),
                     "SUPPLIER_NOT_AUTHORIZED", id="supplier-ids"),
    ],
)
async def test_other_rejections_keep_content_out_of_logs(gateway, client, log_stream, body, code):
    reply = (await post(client(), body)).json
    assert reply["error"] == code and CANARY in json.dumps(reply)  # the partner is told what was wrong
    events = [json.loads(line) for line in log_stream.getvalue().splitlines()]
    assert [e["code"] for e in events if e["event"] == "invoice.rejected"] == [code]
    assert CANARY not in log_stream.getvalue()


# --- no traceback in the log, ever (issue 20, item 14) -----------------------------------------------------


@pytest.fixture
def captured() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    stream = io.StringIO()
    logs.configure("info", stream)
    yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    logs.configure("debug")


def test_an_exception_is_one_line_naming_where_it_was_raised(captured: Callable[[], list[dict[str, Any]]]) -> None:
    try:
        spki_sha256_der(f"not a certificate {CANARY}".encode())
    except ValueError:
        logs.get("test").exception("test.failed", step="parse")
    [event] = captured()
    assert (event["event"], event["step"], event["error_type"], event["level"]) == ("test.failed", "parse", "ValueError", "error")
    assert event["where"].startswith("gateway/tls.py:") and event["where"].endswith(" in spki_sha256_der")
    assert "exception" not in event and "Traceback" not in json.dumps(event) and event["error"]


def test_a_gateway_error_keeps_its_message(captured: Callable[[], list[dict[str, Any]]]) -> None:
    try:
        raise StorageUnavailable("the store did not answer; retry later")
    except StorageUnavailable:
        logs.get("test").exception("test.failed")
    [event] = captured()
    assert (event["error_type"], event["error"]) == ("StorageUnavailable", "the store did not answer; retry later")
    assert "where" not in event  # raised here, in a test: no frame of the gateway's


def test_the_libraries_own_records_are_json_events_too(captured: Callable[[], list[dict[str, Any]]]) -> None:
    try:
        raise ConnectionResetError(f"reset while reading {CANARY}")
    except ConnectionResetError:
        logging.getLogger("aiohttp.server").error("Error handling request from %s", "127.0.0.1", exc_info=True)
    logging.getLogger("aiosmtpd.smtp").info("chatter below the warning level is not logged")
    [event] = captured()
    assert (event["event"], event["logger"], event["text"], event["level"]) == (
        "library.log", "aiohttp.server", "Error handling request from 127.0.0.1", "error")
    assert (event["error_type"], event["error"]) == ("ConnectionResetError", f"reset while reading {CANARY}")
    assert "Traceback" not in json.dumps(event)
