"""TLS handshakes that an admin can see fail.

asyncio reports a failed server-side handshake only in debug mode, so a partner that cannot connect
(no client certificate, one from another CA, an expired one, TLS 1.1, no cipher in common, plain HTTP
to the TLS port) left no trace.  A TLS listener therefore accepts plain TCP connections and makes the
handshake itself (``loop.start_tls``): a failure is counted by reason (``/metrics``:
``einvoice_tls_handshake_failures_total{listener, reason}``) and logged as one ``tls.handshake_failed``
event with the reason and what it means (at most ten a minute per address); a success hands the
connection to the listener's own protocol, which never sees the difference.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

from .. import logs
from ..ratelimit import RateLimiter

log = logs.get("inbound.tls")

HANDSHAKE_LOGS = RateLimiter(burst=10, every_s=6.0)  # log events of failed handshakes per address: ten a minute

# What an admin can tell the partner, by OpenSSL's reason (the metrics label) or the gateway's own.
MEANING = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client presented no certificate; it must present its registered client "
                                         "certificate",
    "CERTIFICATE_VERIFY_FAILED": "the client's certificate was refused",
    "UNSUPPORTED_PROTOCOL": "the client offered only TLS versions this gateway refuses (it requires TLS 1.2 or 1.3)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the client refused every TLS version this gateway offers (TLS 1.2 and 1.3)",
    "WRONG_VERSION_NUMBER": "the client did not speak TLS 1.2 or 1.3 (an old TLS version, or not TLS at all)",
    "NO_SHARED_CIPHER": "no cipher suite in common (TLS 1.2 needs ECDHE with AES-GCM or ChaCha20-Poly1305)",
    "HTTP_REQUEST": "the client spoke plain HTTP to the TLS port; it must use https://",
    "TLSV1_ALERT_UNKNOWN_CA": "the client does not trust this gateway's server certificate (its CA is unknown to it)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the client refused this gateway's server certificate",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the client refused this gateway's server certificate",
    "HANDSHAKE_TIMEOUT": "the handshake did not finish in time",
    "CONNECTION_LOST": "the client closed the connection during the handshake",
}


def failure_reason(exc: BaseException) -> tuple[str, str | None]:
    """(a short reason, bounded for a metrics label; a detail such as the certificate check's message)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return "CERTIFICATE_VERIFY_FAILED", exc.verify_message or None
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason)[:64].upper(), None
    if isinstance(exc, (ConnectionAbortedError, TimeoutError)):  # asyncio aborts a handshake that takes too long
        return "HANDSHAKE_TIMEOUT", None
    if isinstance(exc, (ConnectionError, ssl.SSLEOFError, EOFError)):
        return "CONNECTION_LOST", None
    return type(exc).__name__[:64].upper(), None


class TlsAcceptor(asyncio.Protocol):
    """One accepted connection until its handshake is done; then the listener's protocol takes it over."""

    def __init__(self, context: Callable[[], ssl.SSLContext], protocol: Callable[[], asyncio.BaseProtocol],
                 timeout_s: float, listener: str, failed: Callable[[str, str], None]):
        self.context = context  # the current server context (a reload swaps it)
        self.protocol = protocol
        self.timeout_s = timeout_s
        self.listener = listener
        self.failed = failed  # (listener, reason): the metrics counter
        self.early: list[bytes] = []  # application data that arrived with the end of the handshake
        self.eof = False
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello waits in the socket for start_tls
        self.task = asyncio.get_running_loop().create_task(self._handshake(transport))

    async def _handshake(self, transport: asyncio.Transport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) else ""
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, self, self.context(), server_side=True, ssl_handshake_timeout=self.timeout_s)
        except (OSError, EOFError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            transport.close()
            self._report(address, *failure_reason(exc))
            return
        if tls is None:  # closed while the handshake finished
            return
        protocol = self.protocol()
        tls.set_protocol(protocol)
        protocol.connection_made(tls)
        if isinstance(protocol, asyncio.Protocol):
            for data in self.early:
                protocol.data_received(data)
            if self.eof:
                protocol.eof_received()
        self.early.clear()

    def _report(self, address: str, reason: str, detail: str | None) -> None:
        self.failed(self.listener, reason)
        if reason == "CONNECTION_LOST" or not HANDSHAKE_LOGS.allow(address):
            return  # a port check or a client giving up is counted, not logged
        event: dict[str, Any] = {"listener": self.listener, "peer": address, "reason": reason}
        if detail:
            event["detail"] = detail[:200]
        meaning = MEANING.get(reason)
        if meaning:
            event["meaning"] = meaning
        log.info("tls.handshake_failed", **event)

    # Until the listener's protocol takes over: what the TLS layer passes on arrives here.
    def data_received(self, data: bytes) -> None:
        self.early.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
