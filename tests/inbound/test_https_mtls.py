"""The partner HTTPS listener's mutual TLS (gateway/inbound/https.py): transport identity (SECURITY-TESTS.md
§A T-01…T-07, and I-01 for the supplier binding).

Certificates are made at test time with gateway.devpki.  openssl and curl run as asyncio
subprocesses: the gateway serves from the same event loop as the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import ssl
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway import devpki
from gateway.cli.demo import SAMPLE
from gateway.identifiers import identifier
from gateway.model import PartnerStatus, stamp
from gateway.operations import instance
from gateway.operations.instance import DEMO_PARTNER
from gateway.partners.book import editing
from gateway.partners.edit import register_partner, store_certificate, with_status
from gateway.tls import client_context
from tests.helpers import (
    FOREIGN,
    FOREIGN_IDS,
    HANDSHAKE_FAILED,
    FakeClock,
    Running,
    add_partner,
    numbered,
    post,
    rewrite_config,
    serving,
)
from tests.helpers.identities import DISGUISES, forms, naming, vat_forms


async def get(session: aiohttp.ClientSession, message_id: str) -> tuple[int, dict]:
    async with session.get(f"/v1/invoices/{message_id}") as r:
        return r.status, await r.json()


def edit_demo(gateway, change) -> None:
    with editing(gateway.inst.partners) as ps:
        ps[:] = [change(p) if p.name == DEMO_PARTNER else p for p in ps]
    gateway.gw.parts.partners.refresh()


async def run(*argv: str, timeout: float = 20) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


# --- handshake refusals (T-01…T-03) --------------------------------------------------------------


def refused_cert(gateway, tmp_path: Path, kind: str) -> devpki.Issued:
    now, day = datetime.now(UTC), timedelta(days=1)
    if kind == "foreign CA":  # T-02: same CN as the demo partner, from a CA the gateway does not trust
        evil = devpki.make_ca(tmp_path / "evil", "evil-ca")
        return devpki.issue(evil, tmp_path / "evil", "evil", role="client", cn=f"{DEMO_PARTNER} (demo partner)")
    if kind == "expired":  # T-03
        return gateway.issue_client("expired", not_before=now - 400 * day, not_after=now - 30 * day)
    return gateway.issue_client("early", not_before=now + 30 * day, not_after=now + 400 * day)  # T-03 not yet valid


@pytest.mark.parametrize("kind", ["no certificate", "foreign CA", "expired", "not yet valid"])
async def test_handshake_refused(gateway, client, tmp_path, kind):  # T-01…T-03
    ctx = client_context(gateway.inst.ca.cert)
    if kind != "no certificate":
        cert = refused_cert(gateway, tmp_path, kind)
        # even a registered key is refused in the handshake
        register_partner(gateway.inst.partners, "refused", [cert.cert], ["0088:4000008000002"], ["billing@refused.example"], "pytest")
        gateway.gw.parts.partners.refresh()  # what the daemon does every partners.reload_interval_s
        assert gateway.gw.parts.partners.current.get("refused") is not None
        ctx = client_context(gateway.inst.ca.cert, cert.cert, cert.key)
    async with aiohttp.ClientSession(gateway.url, connector=aiohttp.TCPConnector(ssl=ctx)) as s:
        with pytest.raises(HANDSHAKE_FAILED):
            await post(s, numbered("MT-0001"))
    status, _ = await post(client(), numbered("MT-0002"))  # the listener is alive: the demo partner gets through
    assert status == 202
    assert (await gateway.gw.store.reports.counts())["invoices"] == 1


@pytest.mark.parametrize(("args", "with_cert", "ok"), [
    (["-tls1", "-cipher", "DEFAULT@SECLEVEL=0"], True, False),
    (["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"], True, False),
    (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA256"], True, False),  # CBC (the dev server key is EC P-256)
    (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA"], True, False),
    (["-tls1_2"], False, False),  # no client certificate
    (["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"], True, True),
    (["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"], True, True),
    (["-tls1_3"], True, True),
], ids=["tls1.0", "tls1.1", "cbc-sha256", "cbc-sha1", "tls1.2-no-cert", "aes-gcm", "chacha20", "tls1.3"])
async def test_openssl_s_client(gateway, args, with_cert, ok):  # T-01, T-06
    inst = gateway.inst
    cert = ["-cert", str(inst.demo_client.cert), "-key", str(inst.demo_client.key)] if with_cert else []
    rc, out, err = await run("openssl", "s_client", "-connect", f"127.0.0.1:{gateway.gw.port}", "-CAfile", str(inst.ca.cert),
                             *cert, *args, timeout=10)
    out += err
    if ok:
        assert rc == 0, out
        cipher = args[args.index("-cipher") + 1] if "-cipher" in args else r"TLS_\S+"
        assert re.search(rf"New, TLSv1\.[23], Cipher is {cipher}\n", out), out
        assert "Verify return code: 0 (ok)" in out
    else:  # the server hung up on us (not a refusal by the local openssl)
        assert rc != 0 and "unexpected eof while reading" in out, out


# --- allowlist: partner identity is the registered key (T-07, I-01) --------------------------------


async def test_ca_valid_but_unregistered_certificate(gateway, client):  # T-07; same CN as the demo partner (T-02)
    stranger = gateway.issue_client("stranger", cn=f"{DEMO_PARTNER} (demo partner)")
    s = client(stranger.cert, stranger.key)
    status, body = await post(s, SAMPLE)
    assert (status, body["error"]) == (403, "PARTNER_UNKNOWN")
    status, body = await get(s, "00000000-0000-0000-0000-000000000000")
    assert (status, body["error"]) == (403, "PARTNER_UNKNOWN")
    assert (await gateway.gw.store.reports.counts())["invoices"] == 0


async def test_suspended_partner_then_resumed(gateway, client):  # T-07 hot reload, both ways
    s = client()
    edit_demo(gateway, lambda p: with_status(p, PartnerStatus.SUSPENDED))
    status, body = await post(s, numbered("MT-0001"))
    assert (status, body["error"]) == (403, "PARTNER_SUSPENDED")
    edit_demo(gateway, lambda p: with_status(p, PartnerStatus.ACTIVE))
    status, body = await post(s, numbered("MT-0001"))
    assert (status, body["status"]) == (202, "accepted")


async def test_certificate_rotation(gateway, client):  # T-07: overlap, then the old key is removed
    new = gateway.issue_client("demo-supplier-next")
    stored, _ = store_certificate(gateway.inst.partners, DEMO_PARTNER, new.cert)
    edit_demo(gateway, lambda p: replace(p, client_certs=(*p.client_certs, str(stored))))
    old_s, new_s = client(), client(new.cert, new.key)
    assert (await post(old_s, numbered("MT-0001"))).status == 202
    assert (await post(new_s, numbered("MT-0002"))).status == 202
    edit_demo(gateway, lambda p: replace(p, client_certs=(str(stored),)))
    status, body = await post(old_s, numbered("MT-0003"))
    assert (status, body["error"]) == (403, "PARTNER_UNKNOWN")
    assert (await post(new_s, numbered("MT-0003"))).status == 202


async def test_supplier_ids_of_another_partner(gateway, client):  # I-01
    other = add_partner(gateway.inst, "other", FOREIGN_IDS, emails=["billing@other.example"])
    gateway.gw.parts.partners.refresh()
    demo_s, other_s = client(), client(other.cert, other.key)
    mixed = numbered("MT-0001").replace(b"<cbc:CompanyID>DE123456789<", b"<cbc:CompanyID>FR12345678901<")  # one foreign id
    for session, body in ((demo_s, FOREIGN), (demo_s, mixed), (other_s, SAMPLE)):
        status, reply = await post(session, body)
        assert (status, reply["error"]) == (403, "SUPPLIER_NOT_AUTHORIZED"), reply
    status, reply = await post(other_s, FOREIGN)  # positive control: its own invoice
    assert (status, reply["status"]) == (202, "accepted")
    assert (await gateway.gw.store.reports.counts())["invoices"] == 1


async def test_another_partners_identifier_in_any_form_is_refused_and_nothing_stored(gateway, client):
    """I-01 with disguises (issue 20, item 3): the demo partner's invoice keeps its own identifiers and names
    the victim's GLN or VAT number written otherwise — spaced, dotted, dashed, NBSP, zero-width, full-width,
    lower case, under another scheme or none — in the supplier party or a party acting for the seller."""
    add_partner(gateway.inst, "victim", ["0088:5790000435975", "BE0123456789"], emails=["billing@victim.example"])
    gateway.gw.parts.partners.refresh()
    attacks: dict[str, tuple[str, bytes]] = {}  # name → (the identifier as written, the invoice)
    for name, (scheme, value) in forms("0088", "5790000435975").items():
        for place in ("EndpointID", "PartyIdentification"):
            attacks[f"GLN, {name}, in {place}"] = (identifier(scheme, value), naming(f"ID-{len(attacks)}", scheme, value, place))
    for name, (scheme, value) in vat_forms("BE", "0123456789", "9925").items():
        place = "PartyTaxScheme" if not scheme else "EndpointID"
        attacks[f"VAT, {name}, in {place}"] = (identifier(scheme, value), naming(f"ID-{len(attacks)}", scheme, value, place))
    for place in ("PartyLegalEntity", "payee", "tax representative", "seller"):
        attacks[f"VAT in the {place}"] = ("9925:BE 0123.456.789", naming(f"ID-{len(attacks)}", "9925", "BE 0123.456.789", place))
    attacks["GLN without a scheme"] = ("5790000435975", naming(f"ID-{len(attacks)}", "", "5790000435975"))

    s = client()
    wrong = {}
    for name, (written, body) in attacks.items():
        answer = await post(s, body)
        if (answer.status, (answer.json or {}).get("error")) != (403, "SUPPLIER_NOT_AUTHORIZED") \
                or not any(repr(written) in d["message"] for d in answer.json["details"]) or "victim" in answer.text:
            wrong[name] = answer.text
    assert not wrong, wrong
    assert (await gateway.gw.store.reports.counts()) == {"invoices": 0}  # nothing stored, so nothing to deliver
    await gateway.gw.outbox.run_once()
    assert list(gateway.inst.delivery_folder.iterdir()) == []

    # Positive control: the partner's own identifiers, disguised the same ways, and a payee that is no partner.
    own = naming("OWN-1", "", "DE 123.456\u00a0789", "PartyTaxScheme",  # (BR-CO-09: an upper-case prefix)
                 doc=naming("DEMO-2026-0001", "0088", DISGUISES["all at once"]("4000001000006"), "EndpointID"))
    factor = naming("OWN-2", "0088", "7300010000001", "payee")
    for body in (own, factor):
        answer = await post(s, body)
        assert answer.status == 202, answer.text
    assert (await gateway.gw.store.reports.counts())["invoices"] == 2


async def test_status_only_for_the_sender(gateway, client):  # GET /v1/invoices/{id}
    other = add_partner(gateway.inst, "other", FOREIGN_IDS, emails=["billing@other.example"])
    gateway.gw.parts.partners.refresh()
    status, receipt = await post(client(), SAMPLE)
    assert status == 202
    status, body = await get(client(), receipt["message_id"])
    assert (status, body["message_id"], body["invoice_number"]) == (200, receipt["message_id"], "DEMO-2026-0001")
    status, body = await get(client(other.cert, other.key), receipt["message_id"])
    assert (status, body["error"]) == (404, "NOT_FOUND")
    assert receipt["message_id"] not in json.dumps(body)


# --- an independent client -------------------------------------------------------------------------


async def test_curl(gateway, tmp_path: Path):  # T-01 with curl, with and without a client certificate
    inst = gateway.inst
    invoice = tmp_path / "invoice.xml"
    invoice.write_bytes(SAMPLE)
    common = ["curl", "-sS", "--max-time", "15", "--cacert", str(inst.ca.cert), "-H", "Content-Type: application/xml",
              "--data-binary", f"@{invoice}", "-w", "\n%{http_code}", f"{gateway.url}/v1/invoices"]
    rc, out, err = await run(*common, "--cert", str(inst.demo_client.cert), "--key", str(inst.demo_client.key))
    body, code = out.rsplit("\n", 1)
    assert (rc, code) == (0, "202"), out + err
    reply = json.loads(body)
    assert reply["status"] == "accepted" and reply["duplicate"] is False
    assert reply["sha256"] == hashlib.sha256(SAMPLE).hexdigest()
    rc, out, err = await run(*common)  # no client certificate: no HTTP reply at all
    assert rc != 0 and out == "\n000", out + err


# --- a TLS session outlives the handshake that checked the certificate (issue 20, items 9 and 10) ---------


def _https_request(running: Running, method: str, path: str, body: bytes, context: ssl.SSLContext,
                   session: ssl.SSLSession | None = None) -> tuple[int, dict[str, Any], ssl.SSLSession | None, bool]:
    """One request on a fresh connection, resuming ``session`` when given: (status, JSON reply, the session to
    resume next time, whether this one was resumed).  Blocking: run it in a thread."""
    with socket.create_connection(("127.0.0.1", running.gw.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        head = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        tls.sendall(head + body)
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
        status = int(reply.split(b" ", 2)[1])
        return status, json.loads(reply.partition(b"\r\n\r\n")[2]), tls.session, tls.session_reused


async def test_a_resumed_session_is_refused_once_its_certificate_expired(inst) -> None:
    clock = FakeClock()
    async with serving(inst, clock=clock) as running:
        context = running.ssl()
        status, first, session, _ = await asyncio.to_thread(_https_request, running, "POST", "/v1/invoices", SAMPLE, context)
        assert status == 202, first
        status, again, session, resumed = await asyncio.to_thread(
            _https_request, running, "GET", f"/v1/invoices/{first['message_id']}", b"", context, session)
        assert (status, resumed) == (200, True), again  # a resumed session, no handshake: no certificate check by TLS
        expiry = x509.load_pem_x509_certificate(inst.demo_client.cert.read_bytes()).not_valid_after_utc
        await clock.advance(expiry.timestamp() - clock.time() + 60)
        for method, path, body in (("POST", "/v1/invoices", numbered("RESUMED-2")),
                                   ("GET", f"/v1/invoices/{first['message_id']}", b"")):
            status, reply, session, resumed = await asyncio.to_thread(_https_request, running, method, path, body,
                                                                      context, session)
            assert (resumed, status, reply["error"]) == (True, 403, "CERT_EXPIRED"), reply
            assert f"expired at {stamp(expiry)}" in reply["message"]
        assert (await running.gw.store.reports.counts())["invoices"] == 1


async def test_a_kept_alive_connection_is_refused_once_its_certificate_expired(inst) -> None:
    clock = FakeClock()
    async with serving(inst, clock=clock) as running, running.session() as s:
        first = await post(s, SAMPLE)
        assert first.status == 202, first.text
        expiry = x509.load_pem_x509_certificate(inst.demo_client.cert.read_bytes()).not_valid_after_utc
        await clock.advance(expiry.timestamp() - clock.time() + 1)
        late = await post(s, numbered("KEPT-ALIVE-2"))
        assert (late.status, late.json["error"]) == (403, "CERT_EXPIRED"), late.text
        async with s.get(f"/v1/invoices/{first.json['message_id']}") as r:
            assert (r.status, (await r.json())["error"]) == (403, "CERT_EXPIRED")


def revoke(inst: instance.Instance, cert_path: Path) -> Path:
    """A CRL from the instance CA that revokes ``cert_path``; named in the configuration's [revocation]."""
    ca = x509.load_pem_x509_certificate(inst.ca.cert.read_bytes())
    ca_key = serialization.load_pem_private_key(inst.ca.key.read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    serial = x509.load_pem_x509_certificate(cert_path.read_bytes()).serial_number
    now = datetime.now(UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject).last_update(now - timedelta(hours=1))
           .next_update(now + timedelta(days=1))
           .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                    .revocation_date(now - timedelta(minutes=5)).build())
           .sign(ca_key, hashes.SHA256()))
    path = inst.root / "pki" / "ca.crl"
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    rewrite_config(inst.config, lambda c: c.setdefault("revocation", {}).update(crls=[str(path)]))
    return path


async def test_revocation_is_checked_on_status_requests_too(inst) -> None:
    revoke(inst, inst.demo_client.cert)
    async with serving(inst) as running, running.session() as s:
        posted = await post(s, SAMPLE)
        assert (posted.status, posted.json["error"]) == (403, "CERT_REVOKED"), posted.text
        async with s.get("/v1/invoices/0d9a0000-0000-4000-8000-000000000000") as r:
            assert (r.status, (await r.json())["error"]) == (403, "CERT_REVOKED")
