"""The partner-facing S/MIME e-mail listener (aiosmtpd).

    EHLO → STARTTLS (required before MAIL: plaintext commands get 530) → MAIL → RCPT (only the
    configured gateway addresses: no relaying) → DATA (SIZE advertised and enforced) →
      open the S/MIME message (gateway/smime/unwrap.py) → authenticate the signer → the same pipeline as
      HTTPS → 250 only after the invoice is durable; 5xx with an enhanced status code and the
      HTTPS API's error code for a permanent refusal; 4xx for a transient one.

Client certificates are not asked for: the S/MIME signature is the identity.  A refused message
is never bounced to the envelope sender (backscatter): the SMTP reply is the answer, and a signed
reply e-mail goes to a partner only once its signature proved who it is.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import ssl
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from datetime import UTC, datetime
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax
from cryptography import x509

from .. import logs
from ..config.model import SmtpConfig
from ..delivery.smarthost import Mailer
from ..errors import Forbidden, GatewayError, LimitExceeded, Malformed, Rejected, UnsupportedMediaType
from ..model import InboundMessage, Partner, PeerIdentity
from ..partners.directory import PartnerBook
from ..pipeline import Outcome, Pipeline
from ..smime import cms
from ..smime import unwrap as smime
from ..smime.compose import compose
from ..smime.identity import Identity
from ..stages.revocation import Revocation
from ..storage.base import Store
from ..tls import encryptable, spki_sha256
from .https import ByteBudget

log = logs.get("inbound.smtp")

AUTH_MECHANISMS = "LOGIN PLAIN".split()  # aiosmtpd's built-in ones, all switched off (no SMTP AUTH here)
MAX_RECIPIENTS = 10
MAX_LINE_BYTES = 1000  # a line of DATA with its CRLF (RFC 5321 4.5.3.1.6)
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# <local@domain> with a dot-atom local part and a plain domain, then the parameters (RFC 5321 4.1.2)
PLAIN_PATH = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>\s*+(?!\()")
MAX_DETAIL_LINES = 10
# Refusals by code where the class alone does not say enough (RFC 3463 enhanced status codes).
ENHANCED = {
    "SMIME_DECRYPTION_FAILED": "5.7.5", "SMIME_WRONG_RECIPIENT": "5.7.5",
    "SMIME_ALGORITHM_REFUSED": "5.7.6",
    "SMIME_SIGNATURE_INVALID": "5.7.7", "SIGNATURE_INVALID": "5.7.7", "SMIME_SIGNER_COUNT": "5.7.7",
}


def _line(text: str) -> str:
    return re.sub(r"[^\x20-\x7e]", "?", text)[:400]


def smtp_reply(exc: GatewayError) -> str:
    """The one place errors become SMTP replies: ``554 5.7.1 CODE: message`` plus detail lines."""
    if not isinstance(exc, Rejected):
        return f"451 4.3.0 {exc.code}: {_line(exc.message)}"
    if isinstance(exc, LimitExceeded):
        status, enhanced = "552", "5.3.4"
    elif exc.code in ENHANCED:
        status, enhanced = "554", ENHANCED[exc.code]
    elif isinstance(exc, Forbidden) or (isinstance(exc, cms.CmsRejected) and not isinstance(exc, Malformed)):
        status, enhanced = "554", "5.7.1"  # not authorized (a signer certificate refused, a partner unknown, ...)
    elif isinstance(exc, UnsupportedMediaType):
        status, enhanced = "554", "5.6.1"
    else:
        status, enhanced = "554", "5.6.0"
    lines = [f"{exc.code}: {exc.message}"] + [d.message + (f" (line {d.line})" if d.line else "") + (
        f" at {d.path}" if d.path else "") for d in exc.details[:MAX_DETAIL_LINES]]
    if len(exc.details) > MAX_DETAIL_LINES:
        lines.append(f"... and {len(exc.details) - MAX_DETAIL_LINES} more (see the reply e-mail)")
    return "\r\n".join(f"{status}{'-' if i < len(lines) - 1 else ' '}{enhanced} {_line(t)}" for i, t in enumerate(lines))


class DataRefused(Exception):
    """The message of a DATA command broke a limit; its reply is sent after the whole transfer (RFC 5321 4.2.5)."""

    def __init__(self, reply: str):
        super().__init__(reply)
        self.reply = reply


async def read_data(reader: asyncio.StreamReader, max_bytes: int, max_line: int = MAX_LINE_BYTES) -> bytes:
    """The message after a DATA command up to the lone dot, with the dots of dot-stuffed lines removed
    (RFC 5321 4.5.2).

    Read in blocks, not line by line: a 40 KB S/MIME message is some 550 lines, and reading them one
    at a time cost about a millisecond of CPU per message.  The buffer is searched for ".\r\n"; one
    that starts a line ends the data.  Past max_bytes nothing more is kept, but the transfer is read to
    its end before :class:`DataRefused` (552, and 500 for a line over max_line bytes with its CRLF).
    Raises ``asyncio.IncompleteReadError`` if the connection ends first."""
    pieces: list[bytes] = []
    size = 0
    tail = b"\r\n"  # the last two bytes read (the DATA command's line end, at first)
    while True:
        try:
            piece = await reader.readuntil(b".\r\n")
        except asyncio.LimitOverrunError as exc:  # no ".\r\n" within the reader's limit: take what precedes it
            piece = await reader.read(exc.consumed)
        else:
            if (tail + piece[:-3])[-2:] == b"\r\n":  # the dot starts a line: the end of the data
                size += len(piece) - 3
                pieces.append(piece[:-3])
                break
        size += len(piece)
        tail = (tail + piece)[-2:]
        if size > max_bytes:
            pieces.clear()  # keep reading to the end, keep nothing
        else:
            pieces.append(piece)
    if size > max_bytes:
        raise DataRefused("552 5.3.4 Error: too much mail data")
    content = b"".join(pieces)
    if content.startswith(b"."):
        content = content[1:]
    content = content.replace(b"\r\n.", b"\r\n")
    if _longest_line(content) > max_line - 2:  # (the limit does not count a dot added for transparency)
        raise DataRefused(f"500 5.5.2 Line too long (at most {max_line} bytes with CRLF, RFC 5321 4.5.3.1.6)")
    return content


def _longest_line(content: bytes, window: int = 64 * 1024) -> int:
    """The length of the longest line (CRLF not counted), or at least window - 1 if a line is that long.
    At most ``window`` bytes are split at a time, so that a message of a million empty lines does not
    become a million objects at once."""
    longest, start = 0, 0
    while start < len(content):
        end = content.rfind(b"\r\n", start, start + window)
        if end < 0:  # no line end in the window: the rest is one line
            return max(longest, min(len(content) - start, window))
        longest = max(longest, max(map(len, content[start:end].split(b"\r\n"))))
        start = end + 2
    return longest


class _Session(SMTP):
    """aiosmtpd's SMTP with a cap on concurrent sessions and a faster DATA transfer."""

    def __init__(self, owner: SmtpInbound, **kwargs: Any):
        super().__init__(owner, **kwargs)
        self.owner = owner

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if getattr(self, "_counted", False):  # called again for the TLS transport after STARTTLS: the same session
            super().connection_made(transport)
            return
        if self.owner.sessions >= self.owner.cfg.max_sessions:
            transport.write(b"421 4.3.2 Too many connections; try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        self.owner.sessions += 1
        self._counted = True
        super().connection_made(transport)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd's DATA with the transfer read by :func:`read_data` (the checks and replies are its own)."""
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        # The transfer gets data_timeout_s from the DATA command on (aiosmtpd resets its timer per command only).
        self._reset_timeout(self.owner.cfg.data_timeout_s)
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            content = await read_data(self._reader, self.data_size_limit or self.owner.cfg.max_message_bytes)
        except DataRefused as refused:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(refused.reply)
            return
        except asyncio.IncompleteReadError:  # the client went away mid-transfer
            self._writer.close()
            return
        except asyncio.CancelledError:  # the connection was reset during DATA
            self._writer.close()
            raise
        self.envelope.content = self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The address of MAIL FROM / RCPT TO and the rest (the parameters).  The common <local@domain>
        by a regular expression; anything else (quoted local parts, source routes, ...) by aiosmtpd's
        own parser, which builds a class per call and cost 0.1 ms of CPU per command."""
        match = PLAIN_PATH.match(arg)
        if match is None:
            return super()._getaddr(arg)
        address = match.group(1)
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, arg[match.end():]

    def connection_lost(self, error: Exception | None) -> None:
        if getattr(self, "_counted", False):
            self._counted = False
            self.owner.sessions -= 1
            super().connection_lost(error)


class SmtpInbound:
    def __init__(self, cfg: SmtpConfig, pipeline: Pipeline, partners: PartnerBook, store: Store,
                 identity: Identity, roots: Sequence[x509.Certificate], revocation: Revocation | None,
                 tls: ssl.SSLContext, executor: Executor, max_invoice_bytes: int, max_in_flight_bytes: int,
                 on_accepted: Callable[[], None], mailer: Mailer | None = None,
                 count: Callable[[str, str, str], None] = lambda transport, outcome, code: None):
        self.store = store
        self.executor = executor  # decryption and signature checks run on the stage threads
        self.max_invoice_bytes = max_invoice_bytes
        self.budget = ByteBudget(max_in_flight_bytes)
        self.on_accepted = on_accepted
        self.count = count
        self.sessions = 0
        self.inflight = 0  # messages being processed after DATA (stop waits for them)
        self.replies: set[asyncio.Task[None]] = set()
        self.reconfigure(cfg, pipeline, partners, identity, roots, revocation, tls, mailer)

    def reconfigure(self, cfg: SmtpConfig, pipeline: Pipeline, partners: PartnerBook, identity: Identity,
                    roots: Sequence[x509.Certificate], revocation: Revocation | None, tls: ssl.SSLContext,
                    mailer: Mailer | None) -> None:
        """At start and at each reload: the next message uses these (one being processed keeps its own)."""
        self.cfg, self.pipeline, self.partners, self.identity = cfg, pipeline, partners, identity
        self.roots, self.revocation, self.addresses = list(roots), revocation, frozenset(cfg.addresses)
        self.tls = tls  # each new session's STARTTLS takes the current one
        self.mailer = mailer if cfg.replies else None

    def protocol(self) -> SMTP:
        """A protocol instance per connection (the asyncio server's factory)."""
        return _Session(self, data_size_limit=self.cfg.max_message_bytes, hostname=self.cfg.hostname,
                        ident="einvoice-gateway ESMTP", tls_context=self.tls, require_starttls=True,
                        # No per-session command budget (aiosmtpd counts it per connection, so a partner's MTA
                        # sending message after message on one session would be cut off): recipients are
                        # limited per message (MAX_RECIPIENTS), idle sessions by the command timeout.
                        timeout=self.cfg.command_timeout_s,
                        auth_exclude_mechanism=AUTH_MECHANISMS,
                        loop=asyncio.get_running_loop())

    # --- aiosmtpd hooks -------------------------------------------------------------------------

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        """No SMTP AUTH is offered (aiosmtpd advertises it after STARTTLS): the S/MIME signature is the identity."""
        session.host_name = hostname
        return [r for r in responses if not r.startswith("250-AUTH")]

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        if address.lower() not in self.addresses:
            return "550 5.7.1 Relaying denied: this gateway accepts mail only for its own invoice addresses"
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        # Processing gets its own data_timeout_s after the transfer (the timer closes the connection when it fires).
        server._reset_timeout(self.cfg.data_timeout_s)
        raw = envelope.original_content or b""
        received_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        bound = log.bind(transport="smtp", peer=session.peer[0] if isinstance(session.peer, tuple) else None,
                         size=len(raw))
        partner: Partner | None = None
        opened: smime.Opened | None = None
        piped = False
        self.inflight += 1
        try:
            await self.budget.acquire(len(raw))
            try:
                letter, sender = await asyncio.get_running_loop().run_in_executor(self.executor, self._open, raw)
                opened, partner = letter, sender  # (for the reply to a refusal)
                bound = bound.bind(partner=sender.name, sender=letter.from_address)
                signer = letter.verified.signer
                peer = PeerIdentity(spki_sha256(signer), signer.subject.rfc4514_string(), "smtp")
                piped = True
                outcome = await self.pipeline.accept(
                    InboundMessage(letter.invoice, peer, sender, received_at, letter.media_type))
            finally:
                await self.budget.release(len(raw))
        except Rejected as exc:
            bound.info("invoice.rejected", code=exc.code, reason=exc.message, details=len(exc.details))
            self.count("smtp", "rejected", exc.code)
            if not piped:
                await self.store.audit.append("gateway", "invoice.rejected", partner.name if partner else None, None,
                                              {"transport": "smtp", "code": exc.code, "sha256": hashlib.sha256(raw).hexdigest()})
            if partner is not None and opened is not None:
                self._reply(partner, opened, "rejected", exc.as_json())
            return smtp_reply(exc)
        except GatewayError as exc:
            bound.warning("invoice.deferred", code=exc.code, reason=exc.message)
            self.count("smtp", "deferred", exc.code)
            return smtp_reply(exc)
        except Exception:
            bound.exception("smtp.internal_error")
            return "451 4.3.0 INTERNAL_ERROR: the gateway failed to process the message; retry later"
        finally:
            self.inflight -= 1
        return self._accepted(outcome, sender, letter, bound)

    def _open(self, raw: bytes) -> tuple[smime.Opened, Partner]:
        opened = smime.open_message(raw, self.identity, self.max_invoice_bytes)
        return opened, smime.authenticate(opened, self.partners.current, self.roots, self.revocation)

    def _accepted(self, outcome: Outcome, partner: Partner, opened: smime.Opened, bound: Any) -> str:
        receipt = outcome.receipt
        if outcome.accepted is None:
            bound.info("invoice.duplicate", message_id=receipt.message_id, code="DUPLICATE", sha256=receipt.sha256)
            self.count("smtp", "duplicate", "DUPLICATE")
        else:
            bound.info("invoice.accepted", message_id=receipt.message_id, code="HELD" if receipt.status == "held" else
                       "ACCEPTED", sha256=receipt.sha256, invoice_number=outcome.accepted.facts.invoice_number,
                       encrypted=opened.decrypted.cipher if opened.decrypted else None)
            self.on_accepted()
            self.count("smtp", "held" if receipt.status == "held" else "accepted", "OK")
        self._reply(partner, opened, "accepted", receipt.as_json())
        duplicate = " (a duplicate of an earlier message)" if receipt.duplicate else ""
        return f"250 2.0.0 Accepted as {receipt.message_id}{duplicate}"

    # --- reply e-mails ----------------------------------------------------------------------------

    def _reply(self, partner: Partner, opened: smime.Opened, outcome: str, body: dict[str, Any]) -> None:
        """A signed (and, when the partner's certificate allows, encrypted) reply, sent in the background."""
        if self.mailer is None:
            return
        task = asyncio.create_task(self._send_reply(partner, opened, outcome, body), name="smtp-reply")
        self.replies.add(task)
        task.add_done_callback(self.replies.discard)

    async def _send_reply(self, partner: Partner, opened: smime.Opened, outcome: str, body: dict[str, Any]) -> None:
        assert self.mailer is not None
        mailer = self.mailer
        recipient = opened.verified.signer if encryptable(opened.verified.signer) else None
        report = json.dumps({"outcome": outcome, "in_reply_to": opened.message_id, **body}, indent=2).encode()
        text = (f"Your invoice message {opened.message_id or ''} was {outcome} by einvoice-gateway.\r\n"
                "The attached outcome.json lists the details (the same JSON as the HTTPS API answers).\r\n")
        try:
            message = await asyncio.get_running_loop().run_in_executor(
                self.executor, lambda: compose([(report, "application/json", "outcome.json")], text,
                                                     identity=mailer.identity, to=opened.from_address,
                                                     subject=f"Invoice {outcome}", recipient=recipient,
                                                     cipher=self.cfg.reply_cipher, in_reply_to=opened.message_id,
                                                     auto_reply=True))
            for attempt, pause in enumerate((0.0, 30.0, 300.0)):
                await asyncio.sleep(pause)
                try:
                    await mailer.smarthost.send(mailer.identity.address, [opened.from_address], message)
                    log.info("smtp.reply_sent", partner=partner.name, to=opened.from_address, outcome=outcome)
                    return
                except Exception as exc:  # DeliveryFailed, or anything else: logged, never raised into the loop
                    log.warning("smtp.reply_failed", partner=partner.name, attempt=attempt + 1, reason=str(exc)[:300])
                    if getattr(exc, "permanent", False):
                        return
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("smtp.reply_failed", partner=partner.name)

    async def stop(self, grace_s: float) -> None:
        """After the listener closed: let messages being processed get their answer, then drop pending replies."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.replies):
            task.cancel()
        await asyncio.gather(*self.replies, return_exceptions=True)
