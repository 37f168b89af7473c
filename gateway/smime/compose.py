"""Composing the S/MIME messages the gateway sends: signed with its key, then encrypted to the recipient."""

from __future__ import annotations

import base64
import email.policy
import email.utils
import re
import uuid
from collections.abc import Sequence
from email.message import EmailMessage, Message

from cryptography import x509

from . import cms
from .identity import Identity


def _entity(message: Message) -> bytes:
    return message.as_bytes(policy=email.policy.SMTP)


def compose(parts: Sequence[tuple[bytes, str, str]], text: str, *, identity: Identity, to: str, subject: str,
            recipient: x509.Certificate | None, cipher: str = "aes-256-gcm", in_reply_to: str = "",
            message_id: str = "", auto_reply: bool = False) -> bytes:
    """A new message: ``text`` and the attachments ``parts`` ((content, media type, file name)),
    signed with the gateway's key (multipart/signed, SHA-256), then encrypted to ``recipient``.

    Built afresh from the gateway's own bytes: nothing of a received MIME tree is forwarded (EFAIL)."""
    inner = EmailMessage(policy=email.policy.SMTP)
    inner.set_content(text)
    for content, media_type, filename in parts:
        maintype, _, subtype = media_type.partition("/")
        inner.add_attachment(content, maintype=maintype, subtype=subtype, filename=filename, cte="base64")
    signed_content = _entity(inner)
    signature = cms.sign(signed_content, identity.certificate, identity.key, detached=True)
    boundary = f"signed-{uuid.uuid4().hex}"
    signed = (f'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256;\r\n'
              f' boundary="{boundary}"\r\n\r\n'
              f"This is a signed message.\r\n--{boundary}\r\n").encode() + signed_content + (
        f"\r\n--{boundary}\r\nContent-Type: application/pkcs7-signature; name=smime.p7s\r\n"
        "Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=smime.p7s\r\n\r\n").encode() + \
        _wrap(signature) + f"\r\n--{boundary}--\r\n".encode()
    if recipient is None:
        body, top = signed, b""
    else:
        der = cms.encrypt(signed, recipient, cipher=cipher)
        kind = "authEnveloped-data" if cipher.endswith("gcm") else "enveloped-data"
        top = (f"Content-Type: application/pkcs7-mime; smime-type={kind}; name=smime.p7m\r\n"
               "Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=smime.p7m\r\n").encode()
        body = b"\r\n" + _wrap(der) + b"\r\n"
    domain = identity.address.split("@")[1]
    msgid = f"<{message_id}@{domain}>" if message_id else email.utils.make_msgid(domain=domain)
    head = (f"From: {identity.address}\r\nTo: {to}\r\nSubject: {_header_text(subject)}\r\n"
            f"Date: {email.utils.formatdate(usegmt=True)}\r\nMessage-ID: {msgid}\r\n"
            + (f"In-Reply-To: {_header_text(in_reply_to)}\r\n" if in_reply_to else "")
            + ("Auto-Submitted: auto-replied\r\n" if auto_reply else "")  # RFC 3834: no auto-answer to it
            + "MIME-Version: 1.0\r\n").encode()
    return head + (top + body if recipient is not None else signed)


def _header_text(text: str) -> str:
    return re.sub(r"[\r\n\x00-\x1f\x7f-\U0010ffff]", " ", text)[:200]


def _wrap(der: bytes) -> bytes:
    encoded = base64.b64encode(der)
    return b"\r\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))

