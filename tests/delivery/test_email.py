"""``type = "email"`` destinations (gateway/delivery/email.py): each invoice signed and encrypted to one
mailbox, through a real smarthost stub on 127.0.0.1; and the mail configuration a gateway refuses.

The stub (``Relay``) and the instance set-up (``configure``) are in tests/helpers/mail.py.  Each
gateway runs in-process (``serving``) with short retry delays, so what the tests see is what a relay
would see.  What arrives is opened with ``openssl cms`` (decrypt, then verify against the development
CA), not with the gateway's own code.  The smarthost's own behaviour (STARTTLS, AUTH, the relay's
answers) is tests/delivery/test_smarthost.py; partners whose endpoint is ``mailto:`` are
tests/delivery/test_partner.py; the SMTP listener's reply e-mails are tests/delivery/test_replies.py.
"""

from __future__ import annotations

import email.parser
import email.policy
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import devpki
from gateway.cli import main as cli
from gateway.cli.demo import SAMPLE
from gateway.config import load as config_mod
from gateway.errors import ConfigError
from gateway.operations import instance
from gateway.operations.instance import DEMO_EMAIL, DEMO_PARTNER, Instance
from gateway.partners.edit import register_partner
from gateway.tls import inspect_certificate
from tests.helpers import numbered, rewrite_config, serving
from tests.helpers.mail import (
    AP,
    GATEWAY_ADDRESS,
    RELAY_PASSWORD,
    RELAY_USER,
    Relay,
    ap_certificate,
    attachments,
    configure,
    delivery_when,
    eventually,
    open_with_openssl,
    openssl,
    pem_of,
    post_invoice,
    quiet,
    secret_file,
)

# The content-encryption algorithm OIDs (RFC 3565, RFC 5084) as `openssl cms -cmsout -print` shows them.
CIPHER_OIDS = {"aes-128-cbc": "2.16.840.1.101.3.4.1.2", "aes-128-gcm": "2.16.840.1.101.3.4.1.6",
               "aes-256-cbc": "2.16.840.1.101.3.4.1.42", "aes-256-gcm": "2.16.840.1.101.3.4.1.46"}


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


# --- type = "email" destinations -------------------------------------------------------------------


@pytest.mark.parametrize("cipher,smime_type", [("aes-256-gcm", "authenveloped-data"), ("aes-256-cbc", "enveloped-data"),
                                               ("aes-128-gcm", "authenveloped-data"), ("aes-128-cbc", "enveloped-data")])
async def test_email_destination_receives_the_invoice_signed_and_encrypted(inst: Instance, relay: Relay, tmp_path: Path,
                                                                           cipher: str, smime_type: str) -> None:
    ap = ap_certificate(inst)
    configure(inst, relay.port, cipher=cipher, ap=ap)
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
    [seen] = relay.seen
    assert (seen.mail_from, seen.rcpt_tos, seen.reply) == (GATEWAY_ADDRESS, [AP], "250 2.0.0 queued")
    assert seen.tls and seen.login == RELAY_USER and relay.logins == [(RELAY_USER, RELAY_PASSWORD)]
    msg = seen.message
    assert (msg["From"], msg["To"], msg["Subject"]) == (GATEWAY_ADDRESS, AP, "Invoice DEMO-2026-0001")
    assert msg["Message-ID"] == f"<{message_id}@{instance.MAIL_HOST}>"
    assert msg.get_content_type() == "application/pkcs7-mime"
    assert str(msg.get_param("smime-type")).lower() == smime_type

    content, signer = open_with_openssl(seen.data, ap, inst.ca.cert, tmp_path / "opened")
    assert signer.strip() == pem_of(inst.smime.cert)  # signed by the gateway's S/MIME certificate
    structure = openssl("-cmsout", "-print", "-in", str(tmp_path / "opened" / "mail.eml")).decode()
    assert f"algorithm: {cipher} ({CIPHER_OIDS[cipher]})" in structure, structure[:2000]
    found = attachments(content)
    assert found["DEMO-2026-0001.xml"] == ("application/xml", SAMPLE)
    assert list(found) == ["DEMO-2026-0001.xml"]
    text = email.parser.BytesParser(policy=email.policy.default).parsebytes(content)
    body = text.get_body(("plain",))
    assert body is not None and message_id in body.get_content()


async def test_email_destination_cannot_be_read_with_another_key(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    configure(inst, relay.port, cipher="aes-256-gcm")
    async with serving(inst, "info", quiet()) as running:
        message_id = await post_invoice(running)
        await eventually(lambda: delivery_when(running, message_id, lambda d: d["state"] == "delivered"), "the delivery")
    [seen] = relay.seen
    assert SAMPLE[:200] not in seen.data and b"DEMO-2026-0001</cbc:ID>" not in seen.data
    (tmp_path / "mail.eml").write_bytes(seen.data)
    other = ap_certificate(inst, "rsa3072")  # same address, another key
    done = subprocess.run(["openssl", "cms", "-decrypt", "-recip", str(other.cert), "-inkey", str(other.key),
                           "-in", str(tmp_path / "mail.eml")], capture_output=True, timeout=30)
    assert done.returncode != 0


async def test_reload_takes_a_new_smarthost_and_password(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    configure(inst, relay.port, cipher="aes-256-gcm")
    second = await Relay.start(inst)
    try:
        second.password = "rotated-secret-4567"
        async with serving(inst, "info", quiet()) as running:
            first_id = await post_invoice(running)
            await eventually(lambda: delivery_when(running, first_id, lambda d: d["state"] == "delivered"), "the first delivery")
            secret_file(inst, "smarthost.password", second.password)
            rewrite_config(inst.config, lambda c: c["smarthost"].update(port=second.port))
            assert await running.gw.reload()
            second_id = await post_invoice(running, numbered("MAIL-0002"))
            await eventually(lambda: delivery_when(running, second_id, lambda d: d["state"] == "delivered"), "the second delivery")
        assert [s.message["Message-ID"] for s in relay.seen] == [f"<{first_id}@{instance.MAIL_HOST}>"]
        assert [s.message["Message-ID"] for s in second.seen] == [f"<{second_id}@{instance.MAIL_HOST}>"]
        assert second.logins == [(RELAY_USER, "rotated-secret-4567")]
    finally:
        await second.close()


async def test_reload_takes_a_renewed_recipient_certificate(inst: Instance, relay: Relay, tmp_path: Path) -> None:
    old, new = ap_certificate(inst), ap_certificate(inst, "rsa3072")
    configured = inst.root / "pki" / "ap-mailbox.crt"  # where the operator keeps the mailbox's certificate
    configured.write_bytes(old.cert.read_bytes())
    configure(inst, relay.port, cipher="aes-256-gcm", ap=devpki.Issued(configured, old.key))
    async with serving(inst, "info", quiet()) as running:
        first_id = await post_invoice(running)
        await eventually(lambda: delivery_when(running, first_id, lambda d: d["state"] == "delivered"), "the first delivery")
        configured.write_bytes(new.cert.read_bytes())  # the mailbox's key is renewed; then SIGHUP
        assert await running.gw.reload()
        second_id = await post_invoice(running, numbered("MAIL-0002"))
        await eventually(lambda: delivery_when(running, second_id, lambda d: d["state"] == "delivered"), "the second delivery")
    first, second = relay.seen
    assert attachments(open_with_openssl(first.data, old, inst.ca.cert, tmp_path / "first")[0])
    found = attachments(open_with_openssl(second.data, new, inst.ca.cert, tmp_path / "second")[0])  # the renewed key
    assert list(found.values()) == [("application/xml", numbered("MAIL-0002"))]


# --- configuration errors -----------------------------------------------------------------------------


def test_email_destination_without_smarthost_is_refused(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    configure(inst, None, cipher="aes-256-gcm")
    code, err = cli_error(capsys, "check-config", "-c", str(inst.config))
    assert code == 2 and "configuration error: smarthost:" in err and "'ap-mailbox'" in err, err


def test_email_destination_with_an_ec_certificate_is_refused(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    configure(inst, 2525, cipher="aes-256-gcm", ap=ap_certificate(inst, "ec"))
    code, err = cli_error(capsys, "check-config", "-c", str(inst.config))
    assert code == 2 and "'ap-mailbox'" in err and "recipient_certificate" in err, err


def test_smarthost_username_needs_a_password_file(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    configure(inst, 2525, auth=False, extra=lambda c: c["smarthost"].update(username=RELAY_USER))
    code, err = cli_error(capsys, "check-config", "-c", str(inst.config))
    assert code == 2 and "configuration error: smarthost.password_file:" in err, err


def test_smarthost_password_file_readable_by_others_is_refused(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    configure(inst, 2525)
    os.chmod(inst.root / "keys" / "smarthost.password", 0o644)
    code, err = cli_error(capsys, "check-config", "-c", str(inst.config))
    assert code == 2 and "configuration error: smarthost.password_file:" in err and "chmod 600" in err, err


def _dest(**changes: Any) -> Callable[[dict[str, Any]], None]:
    def change(c: dict[str, Any]) -> None:
        [d] = [d for d in c["destinations"] if d["name"] == "ap-mailbox"]
        d.update(changes)
        for k in [k for k, v in d.items() if v is None]:
            del d[k]
    return change


BAD_MAIL_CONFIG: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("cipher not offered", _dest(cipher="des-ede3-cbc"), "destinations[1].cipher: 'des-ede3-cbc' is not one of"),
    ("to with a display name", _dest(to="AP <ap@erp.example>"), "destinations[1].to: "),
    ("no to", _dest(to=None), "destinations[1].to: missing (required)"),
    ("no recipient_certificate", _dest(recipient_certificate=None), "destinations[1].recipient_certificate: missing"),
    ("recipient_certificate not found", _dest(recipient_certificate="pki/nowhere.crt"),
     "destinations[1].recipient_certificate: file not found"),
    ("no [smtp] identity", lambda c: c.pop("smtp"), "smtp: destination 'ap-mailbox'"),
    ("[smtp] switched off", lambda c: c["smtp"].update(enabled=False), "smtp: destination 'ap-mailbox'"),
    ("smarthost without host", lambda c: c["smarthost"].pop("host"), "smarthost.host: missing (required)"),
    ("smarthost port out of range", lambda c: c["smarthost"].update(port=70000), "smarthost.port: 70000 is out of range"),
    ("smarthost unknown key", lambda c: c["smarthost"].update(starttls=False), "smarthost.starttls: unknown key"),
    ("smarthost ca not found", lambda c: c["smarthost"].update(ca="pki/relay-ca.crt"), "smarthost.ca: file not found"),
    ("password_file without username", lambda c: c["smarthost"].pop("username"), "smarthost.password_file: give username"),
]


@pytest.mark.parametrize("case,change,message", BAD_MAIL_CONFIG, ids=[b[0] for b in BAD_MAIL_CONFIG])
def test_mail_configuration_errors_name_the_key(inst: Instance, case: str, change: Callable[[dict[str, Any]], None],
                                                message: str) -> None:
    configure(inst, 2525, cipher="aes-256-gcm", extra=change)
    with pytest.raises(ConfigError) as exc:
        config_mod.load(inst.config)
    assert exc.value.message.startswith(message), exc.value.message


def test_smarthost_and_email_destination_pass_check_config(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    configure(inst, 2525, cipher="aes-256-cbc")
    code = cli.main(["check-config", "-c", str(inst.config)])
    out, err = capsys.readouterr()
    assert code == 0 and "OK" in out, err


@pytest.mark.parametrize("key_kind", ["ec", None], ids=["EC S/MIME certificate", "no S/MIME certificate"])
def test_mailto_endpoint_needs_an_rsa_smime_certificate(inst: Instance, capsys: pytest.CaptureFixture[str],
                                                        key_kind: str | None) -> None:
    client = devpki.issue(inst.ca, inst.root / "pki" / "clients", "mailer", role="client")
    smime = [] if key_kind is None else [devpki.issue(inst.ca, inst.root / "pki" / "clients", "mailer-smime", role="smime",
                                                      emails=("ap@mailer.example",), key_kind=key_kind).cert]
    register_partner(inst.partners, "mailer", [client.cert], ["0088:4000005000008"], ["ap@mailer.example"], "pytest",
                     smime_certs=smime)
    before = inst.partners.read_bytes()
    code, err = cli_error(capsys, "partners", "edit", "mailer", "--endpoint", "mailto:ap@mailer.example",
                          "-c", str(inst.config))
    assert code == 2 and "endpoint" in err and "--smime-cert" in err, err
    assert inst.partners.read_bytes() == before


def test_a_mailto_partner_keeps_its_rsa_smime_certificate(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["partners", "edit", DEMO_PARTNER, "--endpoint", f"mailto:{DEMO_EMAIL}", "-c", str(inst.config)]) == 0
    capsys.readouterr()
    before = inst.partners.read_bytes()
    spki = inspect_certificate(inst.demo_smime.cert, "smime").spki_sha256
    code, err = cli_error(capsys, "partners", "edit", DEMO_PARTNER, "--remove-cert", spki[:16], "-c", str(inst.config))
    assert code == 2 and "--smime-cert" in err, err
    assert inst.partners.read_bytes() == before
