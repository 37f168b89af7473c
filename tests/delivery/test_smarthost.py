"""Sending through the smarthost (gateway/delivery/smarthost.py): STARTTLS required, SMTP AUTH, and what
the relay's answers do to a delivery.

A real smarthost stub on 127.0.0.1 (``Relay``, tests/helpers/mail.py) and a gateway in-process
(``serving``) with short retry delays and a ``type = "email"`` destination: what the tests see is
what a relay would see.  What the messages hold is tests/delivery/test_email.py.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import Any

import pytest

from gateway import devpki
from gateway.delivery import smarthost as mail
from gateway.operations import instance
from gateway.operations.instance import Instance
from tests.helpers import run_cli, serving
from tests.helpers.mail import AP, RELAY_PASSWORD, RELAY_USER, Relay, configure, delivery_when, eventually, post_invoice, quiet


async def cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code = await run_cli(*argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


# --- STARTTLS required, AUTH --------------------------------------------------------------------------


async def test_relay_without_starttls_gets_nothing_in_clear(inst: Instance, relay: Relay,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    relay.offer_tls = False
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        waiting = await eventually(lambda: delivery_when(running, message_id, lambda d: d["attempts"] >= 2), "two attempts")
        assert waiting["state"] == "pending", waiting  # transient: retried, not dead-lettered
        assert relay.connections >= 2
        assert (relay.mail_commands, relay.seen, relay.logins) == (0, [], [])  # not a byte of the mail in clear

        shown = await cli_json(capsys, "messages", "show", message_id, "--json", "-c", str(inst.config))
        [d] = shown["deliveries"]
        assert d["state"] == "pending" and "STARTTLS" in d["last_error"], d

        relay.offer_tls = True
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery with TLS")
    [seen] = relay.seen
    assert seen.tls and seen.rcpt_tos == [AP]


async def test_without_credentials_no_login_is_attempted(inst: Instance, relay: Relay) -> None:
    configure(inst, relay.port, auth=False, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
    [seen] = relay.seen
    assert seen.tls and seen.login is None and relay.logins == []


async def test_wrong_password_is_refused_by_the_relay_and_never_logged(inst: Instance, relay: Relay) -> None:
    """535 is the relay's permanent answer (RFC 4954 6): dead-lettered with it; the password is in no log line
    and no stored reason."""
    relay.password = "what-the-relay-expects"
    configure(inst, relay.port, cipher="aes-256-gcm")
    log = quiet()
    async with serving(inst, "debug", log) as running:
        message_id = await post_invoice(running)
        dead = await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "dead"), "the dead letter")
    assert "535" in dead["last_error"], dead
    assert set(relay.logins) == {(RELAY_USER, RELAY_PASSWORD)} and relay.seen == []  # (PLAIN, then LOGIN)
    assert RELAY_PASSWORD not in log.getvalue() and RELAY_PASSWORD not in json.dumps(dead)
    assert "delivery.dead_letter" in log.getvalue()


async def test_relay_with_a_certificate_from_another_ca_is_refused(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    other = devpki.make_ca(tmp_path / "other-ca", "other")
    issued = devpki.issue(other, tmp_path / "other-ca", "relay", role="server", sans=("localhost", "127.0.0.1"))
    relay.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    relay.tls.load_cert_chain(issued.cert, issued.key)
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        waiting = await eventually(lambda: delivery_when(running, message_id, lambda d: d["attempts"] >= 1), "an attempt")
    assert waiting["state"] == "pending" and waiting["last_error"], waiting
    assert (relay.mail_commands, relay.seen, relay.logins) == (0, [], [])


async def test_port_465_speaks_tls_from_the_first_byte(inst: Instance, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The submissions port (RFC 8314): no STARTTLS, TLS at once.  (The stub cannot bind 465 itself, so the
    gateway is told that the stub's port is the implicit-TLS one.)"""
    relay = await Relay.start(inst, implicit=True)
    try:
        monkeypatch.setattr(mail, "IMPLICIT_TLS_PORT", relay.port)
        configure(inst, relay.port, cipher="aes-256-gcm")
        async with serving(inst, "info", quiet()) as running:
            message_id = await post_invoice(running)
            await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
        [seen] = relay.seen
        assert seen.rcpt_tos == [AP] and seen.login == RELAY_USER
    finally:
        await relay.close()


# --- the relay's answers ------------------------------------------------------------------------------


async def test_relay_451_is_retried_and_delivered_once_with_the_same_message_id(inst: Instance, relay: Relay) -> None:
    relay.data_replies = ["451 4.3.0 queue full, try again later"]
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        done = await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
        await asyncio.sleep(0.5)  # several polls of the delivery loop: nothing more is sent
    assert done["attempts"] == 2
    first, second = relay.seen
    assert first.reply.startswith("451") and second.reply.startswith("250")
    assert len(relay.delivered) == 1
    # the redelivery is recognisably the same message
    assert first.message["Message-ID"] == second.message["Message-ID"] == f"<{message_id}@{instance.MAIL_HOST}>"


async def test_relay_451_to_rcpt_is_retried(inst: Instance, relay: Relay) -> None:
    relay.rcpt_replies = ["451 4.4.3 temporary lookup failure", "451 4.4.3 temporary lookup failure"]
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        done = await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
    assert done["attempts"] == 3 and len(relay.seen) == 1


async def test_relay_550_to_rcpt_is_dead_lettered_at_once(inst: Instance, relay: Relay,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    relay.rcpt_replies = ["550 5.1.1 <ap@erp.example>: mailbox unknown"] * 5
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "dead"), "the dead letter")
        [dead] = await cli_json(capsys, "dead-letters", "-c", str(inst.config), "--json")
    assert (dead["message_id"], dead["destination"], dead["attempts"]) == (message_id, "ap-mailbox", 1)
    assert "550" in dead["error"] and "mailbox unknown" in dead["error"] and AP in dead["error"], dead
    assert relay.seen == [] and relay.rcpt_replies == ["550 5.1.1 <ap@erp.example>: mailbox unknown"] * 4  # one try


async def test_relay_550_to_data_is_dead_lettered_at_once(inst: Instance, relay: Relay,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    relay.data_replies = ["550 5.7.1 message refused by policy"]
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "dead"), "the dead letter")
        [dead] = await cli_json(capsys, "dead-letters", "-c", str(inst.config), "--json")
    assert dead["message_id"] == message_id and dead["attempts"] == 1
    assert "550" in dead["error"] and "refused by policy" in dead["error"], dead
    assert len(relay.seen) == 1
