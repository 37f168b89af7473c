"""Failed TLS handshakes are seen (gateway/inbound/handshake.py), on the partner listener of a real gateway.

Each way a partner fails to connect is made by an independent client (``openssl s_client``, curl, or a
plain socket): the failure is counted in /metrics by reason, logged once as ``tls.handshake_failed``
with the reason and what it means, and a flood from one address is counted in full but logged at most
ten times a minute.  A good client is served as before, early data and all.
"""

from __future__ import annotations

import asyncio
import io
import json
import socket
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway import devpki
from gateway.inbound import handshake
from gateway.inbound.handshake import failure_reason
from gateway.ratelimit import RateLimiter
from tests.helpers import Running, eventually, log_events, numbered, post, serving_logged


@pytest.fixture
async def logged(inst: Any) -> Any:
    handshake.HANDSHAKE_LOGS = RateLimiter(burst=10, every_s=6.0)  # a fresh allowance for each test
    async with serving_logged(inst) as (running, stream):
        yield running, stream


def failures(r: Running) -> dict[str, float]:
    """einvoice_tls_handshake_failures_total on the partner listener, by reason."""
    out = {}
    for family in r.gw.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "einvoice_tls_handshake_failures_total" and sample.labels["listener"] == "https":
                out[sample.labels["reason"]] = sample.value
    return out


def s_client(r: Running, *args: str) -> subprocess.CompletedProcess[str]:
    """openssl s_client against the partner listener, sending nothing after the handshake."""
    return subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{r.gw.port}", "-CAfile", str(r.inst.ca.cert),
                           *args], input="", capture_output=True, text=True, timeout=30)


async def failed(r: Running, stream: io.StringIO, reason: str, count: int = 1) -> dict[str, Any]:
    await eventually(lambda: failures(r).get(reason) == count, f"{count} handshake failure(s) {reason}")
    events = [e for e in log_events(stream, "tls.handshake_failed") if e["reason"] == reason]
    assert events and events[-1]["listener"] == "https" and events[-1]["peer"] == "127.0.0.1"
    return events[-1]


async def test_a_client_without_a_certificate_is_counted_and_told_apart(logged):
    r, stream = logged
    await asyncio.to_thread(s_client, r, "-tls1_3")
    event = await failed(r, stream, "PEER_DID_NOT_RETURN_A_CERTIFICATE")
    assert event["meaning"].startswith("the client presented no certificate")


async def test_a_certificate_from_another_ca_names_the_check_that_failed(logged, tmp_path: Path):
    r, stream = logged
    other = devpki.make_ca(tmp_path / "other")
    stranger = devpki.issue(other, tmp_path, "stranger", role="client")
    await asyncio.to_thread(s_client, r, "-cert", str(stranger.cert), "-key", str(stranger.key), "-tls1_2")
    event = await failed(r, stream, "CERTIFICATE_VERIFY_FAILED")
    assert event["detail"] == "unable to get local issuer certificate"


async def test_an_expired_certificate_says_so(logged):
    r, stream = logged
    now = datetime.now(UTC)
    old = devpki.issue(r.inst.ca, r.inst.root / "pki" / "clients", "expired", role="client",
                       not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))
    await asyncio.to_thread(s_client, r, "-cert", str(old.cert), "-key", str(old.key), "-tls1_2")
    event = await failed(r, stream, "CERTIFICATE_VERIFY_FAILED")
    assert event["detail"] == "certificate has expired"


async def test_an_old_tls_version_and_plain_http_are_named(logged):
    r, stream = logged
    await asyncio.to_thread(s_client, r, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0")
    await eventually(lambda: sum(failures(r).values()) == 1, "the TLS 1.1 attempt to be counted")
    (reason,) = failures(r)
    assert reason in ("UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER", "NO_PROTOCOLS_AVAILABLE"), reason
    assert "TLS 1.2 or 1.3" in log_events(stream, "tls.handshake_failed")[-1]["meaning"]

    with socket.create_connection(("127.0.0.1", r.gw.port), timeout=10) as plain:
        plain.sendall(b"POST /v1/invoices HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
        assert await asyncio.to_thread(plain.recv, 1024) == b""  # closed: no HTTP answer on the TLS port
    event = await failed(r, stream, "HTTP_REQUEST")
    assert event["meaning"] == "the client spoke plain HTTP to the TLS port; it must use https://"


async def test_a_connection_closed_before_its_handshake_is_counted_not_logged(logged):
    r, stream = logged
    for _ in range(3):  # a port check: connect, close
        socket.create_connection(("127.0.0.1", r.gw.port), timeout=10).close()
    await eventually(lambda: failures(r).get("CONNECTION_LOST") == 3, "three port checks to be counted")
    assert log_events(stream, "tls.handshake_failed") == []


async def test_a_flood_from_one_address_is_counted_in_full_and_logged_ten_times(logged):
    r, stream = logged

    def no_certificate() -> None:
        ctx = ssl.create_default_context(cafile=str(r.inst.ca.cert))
        with socket.create_connection(("127.0.0.1", r.gw.port), timeout=10) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.recv(1)  # TLS 1.3: the refusal of the missing certificate arrives after the client's Finished
            except (ssl.SSLError, OSError):
                pass

    for _ in range(25):
        await asyncio.to_thread(no_certificate)
    await eventually(lambda: failures(r).get("PEER_DID_NOT_RETURN_A_CERTIFICATE") == 25, "25 failures to be counted")
    assert len(log_events(stream, "tls.handshake_failed")) == 10


async def test_a_good_client_is_served_as_before(logged):
    r, stream = logged
    async with r.session() as s:
        status, reply = await post(s, numbered("TLS-OK-1"))
    assert status == 202, reply
    # curl sends its request in the same flight as the end of its handshake where it can.
    done = await asyncio.to_thread(subprocess.run, [
        "curl", "-sS", "--cacert", str(r.inst.ca.cert), "--cert", str(r.inst.demo_client.cert), "--key",
        str(r.inst.demo_client.key), "-H", "Content-Type: application/xml", "--data-binary", "@-",
        f"https://127.0.0.1:{r.gw.port}/v1/invoices"], input=numbered("TLS-OK-2"), capture_output=True, timeout=30)
    assert json.loads(done.stdout)["status"] == "accepted", done
    assert failures(r) == {} and log_events(stream, "tls.handshake_failed") == []


@pytest.mark.parametrize(("exc", "reason"), [
    (ConnectionAbortedError("SSL handshake is taking longer than 10.0 seconds: aborting the connection"),
     "HANDSHAKE_TIMEOUT"),
    (ConnectionResetError("Connection lost"), "CONNECTION_LOST"),
    (ValueError("odd"), "VALUEERROR"),
])
def test_every_failure_has_a_bounded_reason(exc: BaseException, reason: str):
    assert failure_reason(exc) == (reason, None)
