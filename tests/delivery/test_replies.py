"""The SMTP listener's reply e-mails (gateway/delivery/replies.py): the outcome of each received invoice
message, signed, encrypted to the partner when its certificate allows, and sent from the outbox.

A partner's mail program is played by ``openssl cms`` (``smime_message``) and ``smtplib`` against
the gateway's SMTP listener; the replies arrive at a real smarthost stub on 127.0.0.1 (``Relay``,
tests/helpers/mail.py) and are opened with ``openssl cms``, not with the gateway's own code.
"""

from __future__ import annotations

import asyncio
import base64
import json
import smtplib
import ssl
from pathlib import Path
from typing import Any

import pytest

from gateway import devpki
from gateway.cli.demo import SAMPLE, samples
from gateway.operations.instance import DEMO_EMAIL, DEMO_PARTNER, Instance
from gateway.storage.records import REPLIES
from tests.helpers import FOREIGN, Running, run_cli, serving
from tests.helpers.mail import (
    GATEWAY_ADDRESS,
    RELAY_USER,
    Relay,
    Seen,
    attachments,
    configure,
    eventually,
    open_with_openssl,
    openssl,
    pem_of,
    quiet,
)

INVALID = dict(samples())["schema-invalid invoice"]


# --- a partner's mail to the listener, and the reply opened -----------------------------------------


def smime_message(body: bytes, signer: devpki.Issued, from_address: str, gateway_cert: Path, folder: Path,
                  message_id: str) -> bytes:
    """What a partner's mail program sends: the invoice attached, signed, then encrypted to the gateway."""
    folder.mkdir(parents=True, exist_ok=True)
    inner = (b"Content-Type: application/xml\r\nContent-Disposition: attachment; filename=invoice.xml\r\n"
             b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(body).replace(b"\n", b"\r\n"))
    (folder / "inner.txt").write_bytes(inner)
    openssl("-sign", "-md", "sha256", "-binary", "-in", str(folder / "inner.txt"), "-signer", str(signer.cert),
            "-inkey", str(signer.key), "-out", str(folder / "signed.eml"))
    openssl("-encrypt", "-binary", "-aes-256-gcm", "-in", str(folder / "signed.eml"), "-out", str(folder / "enc.eml"),
            "-from", from_address, "-to", GATEWAY_ADDRESS, "-subject", "Invoice", str(gateway_cert))
    raw = (folder / "enc.eml").read_bytes()
    if b"\r\n" not in raw:
        raw = raw.replace(b"\n", b"\r\n")
    return f"Message-ID: {message_id}\r\n".encode() + raw


class _Answering(smtplib.SMTP):
    """smtplib's SMTP keeping the reply to DATA (sendmail discards its text)."""

    data_reply: tuple[int, bytes] = (0, b"")

    def data(self, msg: Any) -> tuple[int, bytes]:
        self.data_reply = super().data(msg)
        return self.data_reply


async def send_to_listener(running: Running, sender: str, raw: bytes) -> tuple[int, str]:
    """Send over the gateway's SMTP listener (STARTTLS); (code, text) of the answer to DATA."""
    def send() -> tuple[int, str]:
        ctx = ssl.create_default_context(cafile=str(running.inst.ca.cert))
        assert running.gw.smtp_port
        with _Answering("127.0.0.1", running.gw.smtp_port, timeout=30) as s:
            s.starttls(context=ctx)
            try:
                s.sendmail(sender, [GATEWAY_ADDRESS], raw)
            except smtplib.SMTPDataError as exc:
                error = exc.smtp_error
                return exc.smtp_code, error.decode(errors="replace") if isinstance(error, bytes) else error
            return s.data_reply[0], s.data_reply[1].decode(errors="replace")

    return await asyncio.get_running_loop().run_in_executor(None, send)


async def replies_settled(running: Running) -> None:
    """The listener's reply e-mails are all sent (or none was queued), then a little more time."""
    assert running.gw.smtp is not None

    async def none_waiting() -> bool:
        return REPLIES not in await running.gw.store.outbox.pending_by_destination()

    await eventually(none_waiting, "the reply e-mails")
    await asyncio.sleep(0.3)


def read_reply(seen: Seen, inst: Instance, folder: Path) -> dict[str, Any]:
    """The outcome.json of a reply, after decrypting it as the demo partner and verifying the gateway's signature."""
    content, signer = open_with_openssl(seen.data, inst.demo_smime, inst.ca.cert, folder)
    assert signer.strip() == pem_of(inst.smime.cert)
    found = attachments(content)
    assert list(found) == ["outcome.json"]
    media_type, data = found["outcome.json"]
    assert media_type == "application/json"
    report: dict[str, Any] = json.loads(data)
    return report


REPLY_TO = "<invoice-0001@demo-supplier.example>"


# --- the replies --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reply_cipher,smime_type", [("aes-256-gcm", "authenveloped-data"),
                                                     ("aes-256-cbc", "enveloped-data")])
async def test_accepted_mail_gets_a_signed_encrypted_reply(inst: Instance, relay: Relay, tmp_path: Path,
                                                           reply_cipher: str, smime_type: str) -> None:
    configure(inst, relay.port, extra=lambda c: c["smtp"].update(reply_cipher=reply_cipher))
    raw = smime_message(SAMPLE, inst.demo_smime, DEMO_EMAIL, inst.smime.cert, tmp_path / "out", REPLY_TO)
    async with serving(inst, "info", quiet()) as running:
        # the envelope sender is not what the reply goes to: the signed partner's From address is
        code, text = await send_to_listener(running, "bounces@elsewhere.example", raw)
        assert code == 250 and text.startswith("2.0.0 Accepted as "), text
        message_id = text.removeprefix("2.0.0 Accepted as ").split()[0]
        await eventually(lambda: relay.seen, "the reply e-mail")
        await replies_settled(running)
        assert await running.gw.store.reports.message(message_id) is not None
    [seen] = relay.seen
    assert (seen.mail_from, seen.rcpt_tos) == (GATEWAY_ADDRESS, [DEMO_EMAIL])
    assert seen.tls and seen.login == RELAY_USER
    msg = seen.message
    assert (msg["From"], msg["To"], msg["Subject"], msg["In-Reply-To"]) == (GATEWAY_ADDRESS, DEMO_EMAIL, "Invoice accepted",
                                                                              REPLY_TO)
    assert msg.get_content_type() == "application/pkcs7-mime"  # encrypted to the partner's certificate
    assert str(msg.get_param("smime-type")).lower() == smime_type
    report = read_reply(seen, inst, tmp_path / "reply")
    assert report["outcome"] == "accepted" and report["message_id"] == message_id, report
    assert report["in_reply_to"] == REPLY_TO and report["duplicate"] is False and report["status"] == "accepted"


async def test_reply_to_a_partner_without_an_rsa_key_is_signed_only(inst: Instance, relay: Relay, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """An EC S/MIME certificate cannot be encrypted to: the reply is signed (multipart/signed), not encrypted."""
    ec_cert = devpki.issue(inst.ca, inst.root / "pki" / "clients", "demo-ec-smime", role="smime", emails=(DEMO_EMAIL,))
    assert await run_cli("partners", "edit", DEMO_PARTNER, "--smime-cert", str(ec_cert.cert), "-c", str(inst.config)) == 0
    capsys.readouterr()
    configure(inst, relay.port)
    raw = smime_message(SAMPLE, ec_cert, DEMO_EMAIL, inst.smime.cert, tmp_path / "out", REPLY_TO)
    async with serving(inst, "info", quiet()) as running:
        code, text = await send_to_listener(running, DEMO_EMAIL, raw)
        assert code == 250, text
        await eventually(lambda: relay.seen, "the reply e-mail")
        await replies_settled(running)
    [seen] = relay.seen
    assert seen.message.get_content_type() == "multipart/signed" and seen.rcpt_tos == [DEMO_EMAIL]
    (tmp_path / "reply.eml").write_bytes(seen.data)
    content = openssl("-verify", "-CAfile", str(inst.ca.cert), "-purpose", "smimesign", "-in", str(tmp_path / "reply.eml"))
    assert json.loads(attachments(content)["outcome.json"][1])["outcome"] == "accepted"


@pytest.mark.parametrize("body,error", [(INVALID, "SCHEMA_INVALID"), (FOREIGN, "SUPPLIER_NOT_AUTHORIZED")],
                         ids=["schema-invalid", "supplier not authorized"])
async def test_rejected_mail_gets_a_reply_with_the_errors(inst: Instance, relay: Relay, tmp_path: Path, body: bytes,
                                                          error: str) -> None:
    configure(inst, relay.port)
    raw = smime_message(body, inst.demo_smime, DEMO_EMAIL, inst.smime.cert, tmp_path / "out", REPLY_TO)
    async with serving(inst, "info", quiet()) as running:
        code, text = await send_to_listener(running, DEMO_EMAIL, raw)
        assert code == 554 and f"{error}: " in text, text
        await eventually(lambda: relay.seen, "the reply e-mail")
        await replies_settled(running)
        assert await running.gw.store.reports.messages() == []
    [seen] = relay.seen
    assert seen.rcpt_tos == [DEMO_EMAIL] and seen.message["Subject"] == "Invoice rejected"
    assert seen.message.get_content_type() == "application/pkcs7-mime"
    report = read_reply(seen, inst, tmp_path / "reply")
    assert (report["outcome"], report["error"], report["in_reply_to"]) == ("rejected", error, REPLY_TO), report
    assert report["message"] and report["message"] in " ".join(text.split()), (report, text)
    assert report["details"] and all(d["message"] for d in report["details"]), report


@pytest.mark.slow
async def test_a_reply_waits_in_the_outbox_across_a_restart(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    """Replies are durable: queued before the SMTP answer, one the relay refused is sent after the gateway restarted."""
    configure(inst, relay.port)
    relay.data_replies = ["451 4.3.0 queue full, try again later"] * 50
    raw = smime_message(SAMPLE, inst.demo_smime, DEMO_EMAIL, inst.smime.cert, tmp_path / "out", REPLY_TO)
    async with serving(inst, "info", quiet()) as running:
        code, text = await send_to_listener(running, DEMO_EMAIL, raw)
        assert code == 250, text
        await eventually(lambda: relay.seen, "an attempt to send the reply")
    assert relay.delivered == []
    relay.data_replies.clear()
    async with serving(inst, "info", quiet()) as running:
        await eventually(lambda: relay.delivered, "the reply e-mail, after the restart")
        await replies_settled(running)
    [sent] = relay.delivered
    assert {s.message["Message-ID"] for s in relay.seen} == {sent.message["Message-ID"]}  # the same reply each time
    assert read_reply(sent, inst, tmp_path / "reply")["outcome"] == "accepted"


async def test_mail_signed_by_a_stranger_gets_no_reply(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    """No backscatter: a refused message whose signer is no partner is answered by SMTP only."""
    stranger = devpki.issue(inst.ca, inst.root / "pki", "stranger", role="smime", emails=("billing@stranger.example",),
                            key_kind="rsa2048")
    configure(inst, relay.port)
    raw = smime_message(SAMPLE, stranger, "billing@stranger.example", inst.smime.cert, tmp_path / "out", REPLY_TO)
    async with serving(inst, "info", quiet()) as running:
        code, text = await send_to_listener(running, "billing@stranger.example", raw)
        assert code == 554 and "PARTNER_UNKNOWN" in text, text
        await replies_settled(running)
    assert (relay.connections, relay.seen) == (0, [])


async def test_no_reply_when_replies_are_off(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    configure(inst, relay.port, extra=lambda c: c["smtp"].update(replies=False))
    raw = smime_message(SAMPLE, inst.demo_smime, DEMO_EMAIL, inst.smime.cert, tmp_path / "out", REPLY_TO)
    async with serving(inst, "info", quiet()) as running:
        code, text = await send_to_listener(running, DEMO_EMAIL, raw)
        assert code == 250, text
        await replies_settled(running)
    assert (relay.connections, relay.seen) == (0, [])
