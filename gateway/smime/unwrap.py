"""Opening S/MIME messages partners send: MIME → CMS → one invoice, and who signed it.

Opening a received message, each step refusing with a typed error before the next one runs:

1. headers: exactly one From header with exactly one address; a Sender header, if any, must be
   that address (SECURITY-TESTS.md I-03);
2. the top-level type must be exactly ``application/pkcs7-mime`` (enveloped, authEnveloped or
   signed data) or ``multipart/signed``.  Anything else (a multipart/mixed with a signed part
   inside, text around an encrypted part) is refused: parts are never searched for a signed one,
   and never concatenated (M-05, EFAIL);
3. enveloped → decrypted with the gateway's key; the entity inside must be signed (step 2 again,
   without a second envelope).  Unsigned content is refused, also when it decrypted fine (M-02,
   M-04: CBC decrypts flipped bytes into garbage that only the signature catches);
4. signed → the CMS SignedData verifies (gateway/smime/cms.py); from here on only the signed bytes count;
5. the signed entity holds exactly one invoice: one XML part (``application/xml``, ``text/xml``,
   or a part named ``*.xml``), or, with no XML part, one PDF (Factur-X).  Other parts (a covering
   note, a PDF rendering next to the XML) are ignored.  No invoice → ``SMIME_NO_INVOICE``; several
   → ``SMIME_SEVERAL_INVOICES`` (one invoice per message, so each gets its own answer).

:func:`authenticate` then decides who sent it: the signer's key must be an S/MIME certificate
registered for an active partner, chain to a configured CA with KU digitalSignature and EKU
emailProtection, and the From address must be one of the partner's registered addresses and one
of the certificate's.

Every failure is a :class:`~gateway.errors.Rejected` with a stable code; nothing else escapes.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message

from cryptography import x509

from ..errors import Detail, Forbidden, GatewayError, LimitExceeded, Malformed, Rejected
from ..model import Partner
from ..partners.directory import PartnerDirectory, admit
from ..stages.revocation import Revocation, find_issuer
from ..tls import email_addresses, spki_sha256
from . import cms
from .identity import Identity

PKCS7_MIME = ("application/pkcs7-mime", "application/x-pkcs7-mime")
PKCS7_SIGNATURE = ("application/pkcs7-signature", "application/x-pkcs7-signature")
XML_TYPES = ("application/xml", "text/xml")
PDF = "application/pdf"
MAX_PARTS = 100  # leaves in the signed entity
MAX_DEPTH = 5  # multipart nesting in the signed entity
MAX_HEADER_BYTES = 256 * 1024


class SmimeMalformed(Malformed):
    code = "SMIME_MALFORMED"


class SmimeRefused(Forbidden):
    """A message whose form or security this gateway does not accept."""


@dataclass(frozen=True, slots=True)
class Opened:
    """A message that decrypted and verified; nothing is known yet about who the signer is."""

    invoice: bytes
    media_type: str  # application/xml, or application/pdf (Factur-X)
    filename: str
    from_address: str  # lowercase
    message_id: str  # the Message-ID header, for logs and the reply's In-Reply-To
    verified: cms.Verified
    decrypted: cms.Decrypted | None  # None: signed only, not encrypted


def _split(raw: bytes) -> tuple[bytes, bytes]:
    """Header block and body of a MIME entity (CRLF line ends)."""
    end = raw.find(b"\r\n\r\n")
    if raw.startswith(b"\r\n"):
        return b"", raw[2:]
    if end < 0:
        return raw, b""
    if end > MAX_HEADER_BYTES:
        raise LimitExceeded(f"the message headers exceed {MAX_HEADER_BYTES} bytes", code="TOO_LARGE")
    return raw[:end + 2], raw[end + 4:]


def _headers(block: bytes) -> Message:
    return email.parser.BytesParser(policy=email.policy.compat32).parsebytes(block + b"\r\n", headersonly=True)


def _crlf(raw: bytes) -> bytes:
    """MIME's canonical line end is CRLF (RFC 8551 3.1.1): SMTP delivers it; a decrypted entity or a
    file may have bare LFs, which become CRLF (what a conforming signer signed)."""
    if raw.count(b"\n") == raw.count(b"\r\n"):  # canonical already, as SMTP delivers it (counting copies nothing)
        return raw
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")  # (two replaces: a quarter of a regex's time)


def _b64(body: bytes, what: str) -> bytes:
    try:
        return base64.b64decode(body.translate(None, b" \t\r\n"), validate=True)
    except (binascii.Error, ValueError):
        raise SmimeMalformed(f"the {what} is not valid base64") from None


ADDR_SPEC = r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@[A-Za-z0-9.-]{1,253}"
# addr-spec alone, or a display name (a quoted string, or words without '@', comments or specials) and <addr-spec>
FROM_VALUE = re.compile(rf'\s*(?:({ADDR_SPEC})|(?:"[^"\\@]*"|[^"<>@(),;:\\\[\]]*)<({ADDR_SPEC})>)\s*')


def _unfold(value: object) -> str:
    return re.sub(r"\r?\n[ \t]", " ", str(value))


def _from_address(headers: Message) -> str:
    """Exactly one From header with exactly one plain address (SECURITY-TESTS.md I-03): a display
    name may not hold an address, and comments, groups and lists are refused, so what the gateway
    reads is what a mail program shows."""
    found = [_unfold(v) for v in headers.get_all("From") or []]
    if len(found) != 1:
        raise SmimeRefused(f"the message has {len(found)} From headers; exactly one is required",
                           code="SMIME_FROM_INVALID")
    match = FROM_VALUE.fullmatch(found[0])
    if match is None:
        raise SmimeRefused("the From header must hold exactly one address, alone or as Name <local@domain>, with no "
                           "address in the name and no comments", code="SMIME_FROM_INVALID")
    address = (match.group(1) or match.group(2)).lower()
    for sender in headers.get_all("Sender") or []:
        m = FROM_VALUE.fullmatch(_unfold(sender))
        if m is None or (m.group(1) or m.group(2)).lower() != address:
            raise SmimeRefused("a Sender header that differs from From is not accepted; send from the partner's own "
                               "registered address", code="SMIME_FROM_INVALID")
    return address


def _security_type(headers: Message, where: str) -> tuple[str, str]:
    """('enveloped'|'signed-data'|'multipart-signed', boundary): the only structures accepted."""
    ctype = headers.get_content_type()
    if ctype in PKCS7_MIME:
        smime_type = str(headers.get_param("smime-type", "") or "").lower()
        if smime_type in ("enveloped-data", "authenveloped-data"):
            return "enveloped", ""
        if smime_type == "signed-data":
            return "signed-data", ""
        if not smime_type:
            return "pkcs7", ""  # the CMS content type decides
        raise SmimeRefused(f"{where}: smime-type={smime_type!r} is not accepted (enveloped-data, authEnveloped-data or "
                           "signed-data)", code="SMIME_STRUCTURE")
    if ctype == "multipart/signed":
        protocol = str(headers.get_param("protocol", "") or "").lower()
        boundary = headers.get_boundary()
        if protocol not in PKCS7_SIGNATURE or not boundary:
            raise SmimeRefused(f"{where}: a multipart/signed entity needs protocol=\"application/pkcs7-signature\" and a "
                               "boundary", code="SMIME_STRUCTURE")
        return "multipart-signed", boundary
    raise SmimeRefused(
        f"{where}: the message is {ctype}; this gateway accepts only an S/MIME message whose top level is "
        "application/pkcs7-mime (signed, then encrypted) or multipart/signed, with the invoice inside the signed part",
        code="SMIME_STRUCTURE")


def _multipart(body: bytes, boundary: str, what: str = "multipart/signed") -> list[bytes]:
    """The parts of a multipart body, byte for byte (the first part's bytes are what was signed)."""
    delimiter = b"--" + boundary.encode("ascii", "replace")
    # A delimiter line starts the body or follows a CRLF (bytes.split: a regex built per boundary was
    # compiled anew for every message).
    lines = (b"\r\n" + body).split(b"\r\n" + delimiter)
    if len(lines) < 2:
        raise SmimeMalformed(f"the {what} body has no part delimited by its boundary")
    parts, closed = [], False
    for chunk in lines[1:]:
        if chunk.startswith(b"--"):
            closed = True
            break
        newline = chunk.find(b"\r\n")
        if newline < 0 or chunk[:newline].strip(b" \t"):
            raise SmimeMalformed("a multipart boundary line is followed by other text")
        parts.append(chunk[newline + 2:])
    if not closed:
        raise SmimeMalformed(f"the {what} body has no closing boundary")
    return parts


def _transfer_encoding(headers: Message, default: str = "") -> str:
    return str(headers.get("Content-Transfer-Encoding", "") or default).strip().lower()


def _cms(headers: Message, body: bytes, what: str) -> bytes:
    """The DER of an entity whose headers and body are given."""
    cte = _transfer_encoding(headers)
    if cte == "base64":
        return _b64(body, what)
    if cte in ("binary",):
        return body
    raise SmimeMalformed(f"the {what} must be base64 encoded (Content-Transfer-Encoding: base64)")


def _open_signed(entity: bytes, where: str, *, allow_envelope: bool, identity: Identity,
                 decrypted: cms.Decrypted | None = None, headers: Message | None = None,
                 ) -> tuple[cms.Verified, cms.Decrypted | None]:
    header_block, body = _split(entity)
    if headers is None:
        headers = _headers(header_block)
    kind, boundary = _security_type(headers, where)
    der = b""
    if kind == "pkcs7":
        der = _cms(headers, body, "application/pkcs7-mime body")
        kind = "enveloped" if cms.content_type(der) != "signed-data" else "signed-data"
    if kind == "enveloped":
        if not allow_envelope:
            raise SmimeRefused(f"{where}: the decrypted content is encrypted again; sign the invoice, then encrypt it once",
                               code="SMIME_NOT_SIGNED")
        der = der or _cms(headers, body, "application/pkcs7-mime body")
        if cms.content_type(der) == "signed-data":
            raise SmimeRefused(f"{where}: smime-type says enveloped but the content is signed data", code="SMIME_STRUCTURE")
        try:
            opened = cms.decrypt(der, identity.certificate, identity.key)
        except cms.CmsDecryptionFailed:
            raise _undecryptable() from None
        try:
            return _open_signed(_crlf(opened.content), "the decrypted content", allow_envelope=False, identity=identity,
                                decrypted=opened)
        except Rejected as exc:
            if opened.cipher.endswith("-cbc"):
                # CBC is malleable: an altered ciphertext decrypts to garbage.  Every failure after decryption
                # gets the one answer a padding failure gets, so the answers are no padding oracle (M-04).
                raise _undecryptable() from None
            if exc.code == "SMIME_STRUCTURE":
                raise SmimeRefused("the message is encrypted but not signed; sign the invoice with your registered S/MIME "
                                   "certificate, then encrypt it", [Detail(exc.message)], code="SMIME_NOT_SIGNED") from None
            raise
    if kind == "signed-data":
        return cms.verify(der or _cms(headers, body, "application/pkcs7-mime body")), decrypted
    parts = _multipart(body, boundary)
    if len(parts) != 2:
        raise SmimeMalformed(f"a multipart/signed entity has exactly two parts (content, signature); this one has {len(parts)}")
    signature_block, signature_body = _split(parts[1])
    signature_headers = _headers(signature_block)
    if signature_headers.get_content_type() not in PKCS7_SIGNATURE:
        raise SmimeMalformed("the second part of multipart/signed must be application/pkcs7-signature")
    return cms.verify(_cms(signature_headers, signature_body, "signature part"), detached=parts[0]), decrypted


class Undecryptable(cms.CmsRejected):
    code = "SMIME_DECRYPTION_FAILED"


def _undecryptable() -> Undecryptable:
    return Undecryptable(
        "the encrypted content did not decrypt to a correctly signed S/MIME entity: it was altered in transit, or "
        "encrypted with another key, or what was encrypted is not signed (or signed with a refused algorithm); with "
        "AES-CBC the gateway gives this one answer for all of these, encrypt with AES-GCM (authEnveloped-data) for a "
        "precise one")


def _leaves(entity: bytes, depth: int = 0) -> list[tuple[Message, bytes]]:
    """The non-multipart entities of the signed content, each as (its headers, its body), in order.

    Split by boundaries like the signature's own layer, with only the header blocks going through
    email.parser (its line-by-line feed over the whole content cost more than all the cryptography)."""
    if depth > MAX_DEPTH:
        raise SmimeMalformed(f"the signed content nests multiparts deeper than {MAX_DEPTH} levels")
    block, body = _split(entity)
    headers = _headers(block)
    if headers.get_content_maintype() != "multipart":
        return [(headers, body)]
    boundary = headers.get_boundary()
    if not boundary:
        raise SmimeMalformed(f"a {headers.get_content_type()} entity of the signed content has no boundary")
    parts = _multipart(body, boundary, headers.get_content_type())
    if len(parts) > MAX_PARTS:
        raise SmimeMalformed(f"the signed content has more than {MAX_PARTS} parts")
    out = [leaf for part in parts for leaf in _leaves(part, depth + 1)]
    if len(out) > MAX_PARTS:
        raise SmimeMalformed(f"the signed content has more than {MAX_PARTS} parts")
    return out


def _decoded(headers: Message, body: bytes) -> bytes:
    """The body of the invoice part without its transfer encoding (RFC 2045 §6)."""
    cte = _transfer_encoding(headers, "7bit")  # RFC 2045 §6.1: the default
    if cte == "base64":
        return _b64(body, "invoice part")
    if cte == "quoted-printable":
        return binascii.a2b_qp(body)
    if cte in ("7bit", "8bit", "binary"):
        return body
    raise SmimeMalformed(f"the invoice part has Content-Transfer-Encoding {cte[:40]!r}; use base64, quoted-printable, "
                         "7bit, 8bit or binary")


def _invoice(content: bytes, max_bytes: int) -> tuple[bytes, str, str]:
    xml, pdf = [], []
    for headers, body in _leaves(_crlf(content)):
        ctype, name = headers.get_content_type(), str(headers.get_filename() or "")
        if ctype in XML_TYPES or name.lower().endswith(".xml"):
            xml.append((headers, body, name))
        elif ctype == PDF or name.lower().endswith(".pdf"):
            pdf.append((headers, body, name))
    found, media_type = (xml, "application/xml") if xml else (pdf, PDF)
    if not found:
        raise SmimeRefused("the signed content holds no invoice: attach it as application/xml (or text/xml, or a file "
                           "named *.xml), or a Factur-X PDF", code="SMIME_NO_INVOICE")
    if len(found) > 1:
        raise SmimeRefused(f"the signed content holds {len(found)} invoices; send one invoice per message (each gets "
                           "its own answer)", [Detail(f"part {name or '(unnamed)'}") for _, _, name in found],
                           code="SMIME_SEVERAL_INVOICES")
    headers, body, name = found[0]
    data = _decoded(headers, body)
    if not data:
        raise SmimeMalformed("the invoice part has no content")
    if len(data) > max_bytes:
        raise LimitExceeded(f"the invoice of {len(data)} bytes exceeds the limit of {max_bytes} bytes", code="TOO_LARGE")
    return data, media_type, name


def open_message(raw: bytes, identity: Identity, max_invoice_bytes: int) -> Opened:
    """Decrypt, verify and unpack one received message (no decision yet on who signed it)."""
    try:
        raw = _crlf(raw)
        header_block, _ = _split(raw)
        headers = _headers(header_block)
        address = _from_address(headers)
        verified, decrypted = _open_signed(raw, "the message", allow_envelope=True, identity=identity, headers=headers)
        invoice, media_type, name = _invoice(verified.content, max_invoice_bytes)
        message_id = str(headers.get("Message-ID", "") or "")[:200]
    except GatewayError:
        raise
    except Exception as exc:  # the MIME parser on hostile input: any failure is the sender's malformed message
        raise SmimeMalformed(f"the message cannot be parsed as MIME ({exc.__class__.__name__})") from None
    return Opened(invoice, media_type, name, address, message_id, verified, decrypted)


def authenticate(opened: Opened, directory: PartnerDirectory, roots: Sequence[x509.Certificate],
                 revocation: Revocation | None, now: datetime | None = None) -> Partner:
    """Who sent it: the signer's registered partner, checked against its CA, its status and the From."""
    signer = opened.verified.signer
    spki = spki_sha256(signer)
    partner = directory.by_smime_spki.get(spki)
    if partner is None:
        raise Forbidden("the message is signed with an S/MIME certificate that is not registered for any trading partner "
                        f"of this gateway (certificate key SHA-256 {spki}); ask the operator to register it",
                        code="PARTNER_UNKNOWN")
    at = now or datetime.now(UTC)
    admit(partner, spki, at, "smime")
    pinned = [directory.certificates[s].cert for s in partner.smime_spki if s in directory.certificates
              and directory.certificates[s].cert.issuer == directory.certificates[s].cert.subject]
    cms.check_signer(opened.verified, [*roots, *pinned], at)
    if revocation is not None and revocation.policy.crl_files and signer.issuer != signer.subject:
        revocation.check(signer, find_issuer(signer, [*roots, *opened.verified.certificates]), at)
    if opened.from_address not in partner.emails:
        raise Forbidden(f"the From address {opened.from_address!r} is not registered for partner {partner.name!r}",
                        [Detail(f"registered: {', '.join(partner.emails) or '(none)'}")], code="SMIME_FROM_MISMATCH")
    if opened.from_address not in email_addresses(signer):
        raise Forbidden(f"the From address {opened.from_address!r} is not an address of the signing certificate",
                        [Detail(f"the certificate names: {', '.join(sorted(email_addresses(signer))) or '(no address)'}")],
                        code="SMIME_FROM_MISMATCH")
    if opened.decrypted is None and not partner.smime_signed_only:
        raise Forbidden("the message is signed but not encrypted; encrypt it to the gateway's S/MIME certificate after "
                        "signing", code="SMIME_NOT_ENCRYPTED")
    return partner
