"""``type = "https"`` destinations (gateway/delivery/webhook.py): the POST to an ERP endpoint, and how its
replies are classified.

Driven through the outbox as the gateway drives it: a real TLS listener on 127.0.0.1 plays the ERP
(``start_erp``: tests/helpers/erp.py records every request and answers from a script), invoices are
accepted straight into a real store and vault, and the clocks are fake (``env``: tests/helpers/outbox.py),
so no test sleeps for a backoff.  ``classify`` and ``signature_header`` are also checked on their own.
What the outbox does with an outcome (backoff, the horizon, the breaker, leases, operators) is
tests/delivery/test_outbox.py.
"""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from gateway.delivery.sender import DeliveryFailed
from gateway.delivery.webhook import classify, signature_header
from tests.helpers import free_port
from tests.helpers.erp import HANG
from tests.helpers.outbox import CFG, Env, StartErp

# --- the request --------------------------------------------------------------------------------------


async def test_post_carries_the_document_and_verifiable_headers(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    token = env.folder / "erp.token"
    token.write_text("s3cret-token\n")
    token.chmod(0o600)
    box = env.outbox(env.https(erp.url, bearer_token_file=token))
    mid = await env.accept()
    env.due(mid, 2.5)
    assert await box.run_once() == 1
    assert len(erp.seen) == 1
    seen = erp.seen[0]
    body = env.body(mid)
    assert seen.path == "/erp" and seen.body == body
    h = seen.headers
    assert h["Idempotency-Key"] == h["X-Einvoice-Message-Id"] == mid
    assert h["X-Einvoice-Sha256"] == hashlib.sha256(body).hexdigest()
    assert h["Content-Type"] == "application/xml"
    assert h["X-Einvoice-Partner"] == "acme"
    assert h["X-Einvoice-Document-Type"] == "ubl:Invoice"
    assert h["X-Einvoice-Direction"] == "in"
    assert h["Authorization"] == "Bearer s3cret-token"
    ts = h["X-Einvoice-Timestamp"]
    assert ts == str(int(env.clock.now))
    # Checked as an ERP would, from the key file's bytes, not with the gateway's own helper.
    expected = hmac.new(env.hmac_key.read_bytes(), f"{ts}.{mid}.".encode() + body, hashlib.sha256).hexdigest()
    assert h["X-Einvoice-Signature"] == f"v1={expected}"
    forged = hmac.new(env.hmac_key.read_bytes(), f"{ts}.{mid}.".encode() + body + b" ", hashlib.sha256).hexdigest()
    assert h["X-Einvoice-Signature"] != f"v1={forged}"
    job = env.job(mid)
    assert (job["state"], job["attempts"], job["lease_owner"]) == ("delivered", 1, None)
    assert await box.run_once() == 0


async def test_no_authorization_header_without_a_bearer_token(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    box = env.outbox(env.https(erp.url))
    env.due(await env.accept())
    await box.run_once()
    assert len(erp.seen) == 1 and "Authorization" not in erp.seen[0].headers


async def test_client_certificate_is_presented(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp(mtls=True)
    box = env.outbox(env.https(erp.url, client_certificate=env.pki.client.cert, client_key=env.pki.client.key))
    mid = await env.accept()
    env.due(mid)
    assert await box.run_once() == 1
    assert [s.peer_cn for s in erp.seen] == ["gateway-client"]
    assert env.job(mid)["state"] == "delivered"


async def test_without_client_certificate_a_mutual_tls_erp_is_retried(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp(mtls=True)
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    env.due(mid)
    assert await box.run_once() == 1
    job = env.job(mid)
    assert (job["state"], job["attempts"]) == ("pending", 1) and job["last_error"]
    assert erp.seen == []


async def test_every_attempt_carries_the_same_idempotency_key(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.script = [(503, "busy", {}), (503, "busy", {})]
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    env.due(mid)
    for attempt in (1, 2):
        assert await box.run_once() == 1
        job = env.job(mid)
        assert (job["state"], job["attempts"]) == ("pending", attempt)
        env.clock.now = job["next_attempt_at"]
    assert await box.run_once() == 1
    assert env.job(mid)["state"] == "delivered" and env.job(mid)["attempts"] == 3
    assert erp.keys == [mid, mid, mid]
    assert [s.headers["X-Einvoice-Message-Id"] for s in erp.seen] == [mid] * 3
    assert all(s.body == env.body(mid) for s in erp.seen)


# --- how replies are classified -----------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204])
async def test_success_statuses_deliver(env: Env, start_erp: StartErp, status: int) -> None:
    erp = await start_erp()
    erp.default = (status, "" if status == 204 else "ok", {})
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    env.due(mid)
    assert await box.run_once() == 1
    job = env.job(mid)
    assert (job["state"], job["attempts"], job["last_error"]) == ("delivered", 1, None)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
async def test_refusals_dead_letter_at_once(env: Env, start_erp: StartErp, status: int) -> None:
    erp = await start_erp()
    erp.default = (status, f"refused\nby ERP {status}", {})
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    env.due(mid)
    assert await box.run_once() == 1
    job = env.job(mid)
    assert (job["state"], job["attempts"]) == ("dead", 1)
    assert job["last_error"] == f"HTTP {status}: refused by ERP {status}"
    [record] = await env.audit("delivery.dead_letter", mid)
    assert record["partner"] == "acme" and record["actor"] == "gateway"
    assert record["detail"] == {"destination": "erp", "attempts": 1, "error": job["last_error"]}
    shown = await env.store.intake.status(mid, "acme")
    assert shown is not None and shown.status == "dead-letter"
    env.clock.now += 10 * CFG.horizon_s
    assert await box.run_once() == 0
    assert len(erp.seen) == 1


async def test_a_long_refusal_is_cut(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.default = (400, "x" * 20_000, {})
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    env.due(mid)
    await box.run_once()
    error = env.job(mid)["last_error"]
    assert error.startswith("HTTP 400: xxx") and len(error) <= 300


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
async def test_transient_statuses_are_retried(env: Env, start_erp: StartErp, status: int) -> None:
    erp = await start_erp()
    erp.script = [(status, "later", {})]
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    env.due(mid)
    now = env.clock.now
    assert await box.run_once() == 1
    job = env.job(mid)
    assert (job["state"], job["attempts"], job["lease_owner"]) == ("pending", 1, None)
    assert job["last_error"] == f"HTTP {status}: later"
    # The first delay: retry_base_s with jitter in its upper half.
    assert now + CFG.retry_base_s / 2 <= job["next_attempt_at"] <= now + CFG.retry_base_s
    assert await box.run_once() == 0  # not due yet
    env.clock.now = job["next_attempt_at"]
    assert await box.run_once() == 1
    assert env.job(mid)["state"] == "delivered"
    assert await env.audit("delivery.dead_letter", mid) == []


async def test_a_redirect_is_permanent_and_not_followed(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.default = (301, "moved", {"Location": "/elsewhere"})
    box = env.outbox(env.https(erp.url))
    mid = await env.accept()
    env.due(mid)
    await box.run_once()
    job = env.job(mid)
    assert job["state"] == "dead"
    assert job["last_error"].startswith("HTTP 301: moved") and "redirects are not followed" in job["last_error"]
    assert [s.path for s in erp.seen] == ["/erp"]


async def test_connection_refused_is_retried(env: Env) -> None:
    box = env.outbox(env.https(f"https://127.0.0.1:{free_port()}/erp"))
    mid = await env.accept()
    env.due(mid)
    now = env.clock.now
    assert await box.run_once() == 1
    job = env.job(mid)
    assert (job["state"], job["attempts"]) == ("pending", 1)
    assert "Connect" in job["last_error"]
    assert job["next_attempt_at"] > now


async def test_an_erp_that_never_answers_times_out_and_is_retried(env: Env, start_erp: StartErp) -> None:
    erp = await start_erp()
    erp.script = [(HANG, "", {})]
    box = env.outbox(env.https(erp.url, timeout_s=0.5))
    mid = await env.accept()
    env.due(mid)
    started = time.monotonic()
    assert await box.run_once() == 1
    assert time.monotonic() - started < 5
    job = env.job(mid)
    assert (job["state"], job["attempts"]) == ("pending", 1)
    assert "Timeout" in job["last_error"]
    env.clock.now = job["next_attempt_at"]
    assert await box.run_once() == 1
    assert env.job(mid)["state"] == "delivered"
    assert erp.keys == [mid, mid]


# --- the pure helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_classify_success(status: int) -> None:
    assert classify(status, None, "whatever") is None


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 599])
def test_classify_transient(status: int) -> None:
    failure = classify(status, None, "  try later \n")
    assert isinstance(failure, DeliveryFailed)
    assert (failure.permanent, failure.retry_after, failure.error) == (False, None, f"HTTP {status}: try later")


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 409, 410, 413, 415, 422, 451])
def test_classify_permanent(status: int) -> None:
    failure = classify(status, "60", "")
    assert isinstance(failure, DeliveryFailed)
    assert (failure.permanent, failure.error) == (True, f"HTTP {status}")


@pytest.mark.parametrize("status", [300, 301, 302, 303, 307, 308])
def test_classify_redirect(status: int) -> None:
    failure = classify(status, None, "")
    assert failure is not None and failure.permanent
    assert failure.error == f"HTTP {status} (redirects are not followed; correct the destination's url)"


@pytest.mark.parametrize(("header", "expected"), [
    ("120", 120.0), (" 7 ", 7.0), ("0", 0.0), (None, None), ("", None), ("-5", None), ("1.5", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", None),
])
def test_classify_retry_after(header: str | None, expected: float | None) -> None:
    failure = classify(503, header, "")
    assert failure is not None and failure.retry_after == expected


def test_signature_header() -> None:
    key, body = b"k" * 32, b"<Invoice/>"
    expected = hmac.new(key, b"1700000000.m-1.<Invoice/>", hashlib.sha256).hexdigest()
    assert signature_header(key, 1700000000, "m-1", body) == f"v1={expected}"
    assert len(expected) == 64
    others = {signature_header(key, 1700000001, "m-1", body), signature_header(key, 1700000000, "m-2", body),
              signature_header(key, 1700000000, "m-1", body + b" "), signature_header(b"j" * 32, 1700000000, "m-1", body)}
    assert f"v1={expected}" not in others and len(others) == 4
