"""The no-loss harness (benchmarks/noloss.py, SECURITY-TESTS.md §5.2) in its reduced form, and the
ERP stub it relies on (benchmarks/erpstub.py).

The full run (>= 1,000 invoices, >= 20 kills) is ``python benchmarks/noloss.py`` (see its docstring).
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/ is a folder of scripts, not a package

from erpstub import ErpStub, Ledger, Post, signed_headers  # noqa: E402
from noloss import Item, check  # noqa: E402

KEY = os.urandom(32).hex().encode()
BODY = b"<Invoice>stub test</Invoice>"


@pytest.fixture
async def stub(tmp_path: Path) -> AsyncIterator[ErpStub]:
    s = ErpStub(KEY, tmp_path / "erp", bearer_token="t0ken")
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def session(stub: ErpStub) -> AsyncIterator[aiohttp.ClientSession]:
    ctx = ssl.create_default_context(cafile=str(stub.ca_cert))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        yield s


def headers(message_id: str, key: bytes = KEY, token: str = "t0ken") -> dict[str, str]:
    return {**signed_headers(key, message_id, BODY), "Authorization": f"Bearer {token}"}


async def post(session: aiohttp.ClientSession, stub: ErpStub, hdrs: dict[str, str], body: bytes = BODY) -> int:
    async with session.post(stub.url, data=body, headers=hdrs) as resp:
        await resp.read()
        return resp.status


async def test_stub_refuses_a_wrong_signature_token_or_body(stub: ErpStub, session: aiohttp.ClientSession) -> None:
    assert await post(session, stub, headers("m-1", key=os.urandom(32))) == 401
    assert await post(session, stub, headers("m-2", token="wrong")) == 401
    assert await post(session, stub, headers("m-3"), body=BODY + b" ") == 401  # signed bytes differ from the body
    tampered = {**headers("m-4"), "X-Einvoice-Sha256": "0" * 64}
    assert await post(session, stub, tampered) == 400
    old = {**signed_headers(KEY, "m-5", BODY, timestamp=1_000_000_000), "Authorization": "Bearer t0ken"}
    assert await post(session, stub, old) == 401  # outside the replay window
    assert stub.ledger.bookings == {}
    assert stub.ledger.refused == {"bad-signature": 2, "bad-bearer-token": 1, "sha256-mismatch": 1, "stale-timestamp": 1}


async def test_stub_books_once_per_idempotency_key(stub: ErpStub, session: aiohttp.ClientSession) -> None:
    assert await post(session, stub, headers("m-1")) == 201
    assert await post(session, stub, headers("m-1")) == 200  # a retry is answered, not booked again
    assert await post(session, stub, headers("m-2")) == 201
    other = b"<Invoice>another</Invoice>"
    reused = {**signed_headers(KEY, "m-1", other), "Authorization": "Bearer t0ken"}
    assert await post(session, stub, reused, body=other) == 422  # the same key for other bytes
    assert sorted(stub.ledger.bookings) == ["m-1", "m-2"]
    assert stub.ledger.dup_attempts == 1
    assert len(stub.ledger.posts) == 4


async def test_stub_commit_then_drop_books_and_gives_no_answer(stub: ErpStub, session: aiohttp.ClientSession) -> None:
    await stub.set_mode("commit-then-drop")
    with pytest.raises(aiohttp.ClientError):
        await post(session, stub, headers("m-1"))
    assert list(stub.ledger.bookings) == ["m-1"]
    await stub.set_mode("normal")
    assert await post(session, stub, headers("m-1")) == 200
    assert stub.ledger.dup_attempts == 1


async def test_stub_down_refuses_connections_and_503_books_nothing(stub: ErpStub, session: aiohttp.ClientSession) -> None:
    port = stub.port
    await stub.set_mode("down")
    with pytest.raises(aiohttp.ClientConnectorError):
        await post(session, stub, headers("m-1"))
    await stub.set_mode("503")
    assert stub.port == port
    assert await post(session, stub, headers("m-1")) == 503
    await stub.set_mode("normal")
    assert await post(session, stub, headers("m-1")) == 201
    assert list(stub.ledger.bookings) == ["m-1"]


def test_checker_counts_each_kind_of_failure() -> None:
    def item(n: int, kind: str = "valid", mid: str = "", indeterminate: int = 0) -> Item:
        it = Item(n, kind, b"", f"{n:064x}", indeterminate=indeterminate)
        if mid:
            it.outcome, it.receipt_status, it.message_ids, it.receipt_sha256 = "acked", "accepted", {mid}, {mid: it.sha256}
        elif kind != "valid":
            it.outcome = "nacked"
        return it

    def booking(mid: str, sha: str) -> Post:
        return Post(mid, mid, sha, 0.0, 201, True)

    items = [item(0, mid="ok"), item(1, mid="lost"), item(2, mid="changed"), item(3, mid="twice"), item(4, kind="foreign"),
             item(5, indeterminate=1)]
    led = Ledger()
    for post in (booking("ok", items[0].sha256), booking("changed", "f" * 64), booking("stranger", "e" * 64),
                 booking("twice", items[3].sha256), booking("twice-again", items[3].sha256), booking("late", items[5].sha256)):
        led.bookings[post.idempotency_key] = post
        led.posts.append(post)
    led.posts.append(Post("", "", items[4].sha256, 0.0, 401, False, "bad-signature"))  # refused, but it reached the ERP
    report = check(items, led)
    assert {k: report[k] for k in ("lost", "unexpected", "mismatch", "erp_dupes", "nacked_but_delivered", "recovered")} == \
        {"lost": 1, "unexpected": 1, "mismatch": 1, "erp_dupes": 1, "nacked_but_delivered": 1, "recovered": 1}
    assert report["examples"]["lost"] == ["lost"] and report["examples"]["unexpected"] == ["stranger"]
    assert (report["acked"], report["nacked"], report["unresolved"]) == (4, 1, 1)


@pytest.mark.slow
def test_no_invoice_lost_while_the_daemon_is_killed() -> None:
    """200 invoices, 10 rejects, 5 SIGKILLs, ERP down/503/commit-then-drop spells: every gate is 0."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "noloss.py"), "--invoices", "200", "--kills", "5",
                             "--rejects", "10", "--time-limit", "240", "--json"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    summary = result.stdout[-4000:]
    for gate in ("lost", "unexpected", "mismatch", "erp_dupes", "nacked_but_delivered"):
        assert report[gate] == 0, summary
    assert report["acked"] == 200, summary  # unanswered attempts are resent until acknowledged
    assert report["nacked"] == 10 and report["unresolved"] == 0 and report["held"] == 0, summary
    assert report["kills"] == 5 and report["crashes"] == 0, summary
    assert report["daemon_exit"] == 0, summary
    assert report["ok"] and result.returncode == 0, summary


def test_stub_standalone_help() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "erpstub.py"), "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--hmac-key-file" in result.stdout
