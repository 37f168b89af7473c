"""The partner-facing S/MIME e-mail listener (aiosmtpd).

    EHLO → STARTTLS (required before MAIL: plaintext commands get 530) → MAIL → RCPT (only the
    configured gateway addresses: no relaying) → DATA (SIZE advertised and enforced) →
      the pipeline: its S/MIME stage opens the message and authenticates the signer, then the same
      stages as HTTPS → 250 only after the invoice is durable; 5xx with an enhanced status code and
      the HTTPS API's error code for a permanent refusal; 4xx for a transient one (``smtp_reply``
      is the one place errors become SMTP replies).

Client certificates are not asked for: the S/MIME signature is the identity.  A refused message
is never bounced to the envelope sender (backscatter): the SMTP reply is the answer, and a signed
reply e-mail goes to a partner, through the durable outbox, only once its signature proved who it is.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import re
import ssl
import uuid
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from .. import logs
from ..config.model import SmtpConfig
from ..errors import Forbidden, GatewayError, InternalError, LimitExceeded, Malformed, Rejected, UnsupportedMediaType
from ..model import stamp
from ..pipeline import Outcome, Pipeline, Submission
from ..smime import cms
from ..storage.base import Store
from ..storage.records import Notice
from ..tls import der_of, encryptable
from ..vault import Vault
from .http import ByteBudget

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


def client_of(peername: Any) -> str:
    """Whom a connection counts against: its IPv4 address, or its IPv6 /64 (one host's usual allocation)."""
    host = peername[0] if isinstance(peername, tuple) and peername else str(peername)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a Unix socket or an unusual transport: itself
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class _Session(SMTP):
    """aiosmtpd's SMTP with caps on concurrent sessions (in all and per client), a deadline for each
    transaction to get going, and a faster DATA transfer."""

    def __init__(self, owner: SmtpInbound, **kwargs: Any):
        super().__init__(owner, **kwargs)
        self.owner = owner
        self._client: str | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._client is not None:  # called again for the TLS transport after STARTTLS: the same session
            super().connection_made(transport)
            return
        client = client_of(transport.get_extra_info("peername"))
        refusal = (b"421 4.3.2 Too many connections; try again later" if self.owner.sessions >= self.owner.cfg.max_sessions
                   else b"421 4.7.0 Too many connections from your address; try again later"
                   if self.owner.per_client.get(client, 0) >= self.owner.cfg.max_sessions_per_client else None)
        if refusal is not None:
            transport.write(refusal + b"\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        self.owner.sessions += 1
        self.owner.per_client[client] = self.owner.per_client.get(client, 0) + 1
        self._client = client
        self._start_deadline()
        super().connection_made(transport)

    def _start_deadline(self) -> None:
        """From now, STARTTLS done and MAIL accepted within transaction_deadline_s, whatever else is sent
        (NOOP, RSET, HELP reset aiosmtpd's idle timer, not this)."""
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(self.owner.cfg.transaction_deadline_s, self._deadline_passed)

    def _deadline_passed(self) -> None:
        log.info("smtp.deadline", peer=self._client, deadline_s=self.owner.cfg.transaction_deadline_s)
        if self.transport is not None:
            self.transport.write(b"421 4.4.2 No message started in time; closing\r\n")  # type: ignore[attr-defined]
            self.transport.close()

    def _set_post_data_state(self) -> None:
        """A transaction ended (DATA, refused or not, or RSET): the next one must get going in time too.  One
        not yet started keeps its deadline (an RSET does not extend it)."""
        super()._set_post_data_state()  # type: ignore[no-untyped-call]
        if self._client is not None and self._deadline is None:
            self._start_deadline()

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        await super().smtp_MAIL(arg)
        if self._deadline is not None and self._tls_protocol is not None and self.envelope is not None \
                and self.envelope.mail_from is not None:
            self._deadline.cancel()
            self._deadline = None

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
            self._set_post_data_state()
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
        self._set_post_data_state()
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
        if self._client is not None:
            if self._deadline is not None:
                self._deadline.cancel()
            left = self.owner.per_client.pop(self._client) - 1
            if left:
                self.owner.per_client[self._client] = left
            self._client = None
            self.owner.sessions -= 1
            super().connection_lost(error)


class SmtpInbound:
    def __init__(self, cfg: SmtpConfig, pipeline: Pipeline, store: Store, vault: Vault, tls: ssl.SSLContext,
                 max_in_flight_bytes: int, on_accepted: Callable[[], None], replies: bool = False,
                 count: Callable[[str, str, str], None] = lambda transport, outcome, code: None):
        self.store = store
        self.budget = ByteBudget(max_in_flight_bytes)
        self.on_accepted = on_accepted  # wakes the outbox: an invoice to deliver, or a reply to send
        self.count = count
        self.sessions = 0
        self.per_client: dict[str, int] = {}  # sessions by client_of() their address
        self.inflight = 0  # messages being processed after DATA (stop waits for them)
        self.reconfigure(cfg, pipeline, vault, tls, replies)

    def reconfigure(self, cfg: SmtpConfig, pipeline: Pipeline, vault: Vault, tls: ssl.SSLContext, replies: bool) -> None:
        """At start and at each reload: the next message uses these (one being processed keeps its own).
        ``replies``: reply e-mails can be sent (there is a smarthost); they go out if smtp.replies asks."""
        self.cfg, self.pipeline, self.vault = cfg, pipeline, vault
        self.addresses = frozenset(cfg.addresses)
        self.tls = tls  # each new session's STARTTLS takes the current one
        self.replies = replies and cfg.replies

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
        bound = log.bind(transport="smtp", peer=session.peer[0] if isinstance(session.peer, tuple) else None,
                         size=len(raw))
        sub: Submission | None = None
        self.inflight += 1
        try:
            async with self.pipeline.attempt("smtp") as sub:
                sub.sha256 = hashlib.sha256(raw).hexdigest()
                async with self.budget.reserved(len(raw)):
                    outcome = await self.pipeline.accept(sub, raw, stamp())
        except Rejected as exc:
            bound = _sender(bound, sub)
            bound.info("invoice.rejected", code=exc.code, reason=exc.message, details=len(exc.details))
            self.count("smtp", "rejected", exc.code)
            await self._reply(sub, "rejected", exc.as_json())
            return smtp_reply(exc)
        except GatewayError as exc:
            _sender(bound, sub).warning("invoice.deferred", code=exc.code, reason=exc.message)
            self.count("smtp", "deferred", exc.code)
            return smtp_reply(exc)
        except Exception:
            bound.exception("smtp.internal_error")
            return smtp_reply(InternalError("the gateway failed to process the message; retry later"))
        finally:
            self.inflight -= 1
        return await self._accepted(outcome, sub, _sender(bound, sub))

    async def _accepted(self, outcome: Outcome, sub: Submission, bound: Any) -> str:
        receipt = outcome.receipt
        if outcome.accepted is None:
            bound.info("invoice.duplicate", message_id=receipt.message_id, code="DUPLICATE", sha256=receipt.sha256)
            self.count("smtp", "duplicate", "DUPLICATE")
        else:
            bound.info("invoice.accepted", message_id=receipt.message_id, code="HELD" if receipt.status == "held" else
                       "ACCEPTED", sha256=receipt.sha256, invoice_number=outcome.accepted.facts.invoice_number,
                       encrypted=sub.letter.decrypted.cipher if sub.letter and sub.letter.decrypted else None)
            self.on_accepted()
            self.count("smtp", "held" if receipt.status == "held" else "accepted", "OK")
        await self._reply(sub, "accepted", receipt.as_json(), receipt.message_id)
        duplicate = " (a duplicate of an earlier message)" if receipt.duplicate else ""
        return f"250 2.0.0 Accepted as {receipt.message_id}{duplicate}"

    # --- reply e-mails ----------------------------------------------------------------------------

    async def _reply(self, sub: Submission | None, outcome: str, body: dict[str, Any], message_id: str | None = None) -> None:
        """A signed (and, when the partner's certificate allows, encrypted) reply e-mail, queued in the durable
        outbox (gateway/delivery/replies.py sends it).  Only to a partner whose signature proved who it is:
        a refused stranger gets the SMTP reply alone (no backscatter)."""
        if not self.replies or sub is None or sub.partner is None or sub.letter is None:
            return
        letter = sub.letter
        report = json.dumps({"outcome": outcome, "in_reply_to": letter.message_id, **body}, indent=2).encode()
        notice_id, sha256 = str(uuid.uuid4()), hashlib.sha256(report).hexdigest()
        sealed, key_id = self.vault.seal(report, notice_id, sha256)
        signer = letter.verified.signer
        notice = Notice(notice_id, sub.partner.name, message_id, letter.from_address, letter.message_id, outcome,
                        der_of(signer) if encryptable(signer) else None, self.cfg.reply_cipher, sealed, sha256, key_id)
        try:
            await self.store.outbox.enqueue(notice)
        except GatewayError as exc:  # the SMTP reply stands; only the reply e-mail is lost
            log.error("smtp.reply_not_queued", partner=sub.partner.name, reason=exc.message)
            return
        self.on_accepted()

    async def stop(self, grace_s: float) -> None:
        """After the listener closed: let messages being processed get their answer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)


def _sender(bound: Any, sub: Submission | None) -> Any:
    """The log context, with who sent it once the S/MIME stage proved it."""
    if sub is None or sub.partner is None or sub.letter is None:
        return bound
    return bound.bind(partner=sub.partner.name, sender=sub.letter.from_address)
