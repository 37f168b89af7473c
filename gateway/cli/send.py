"""``einvoice-gateway send FILE``: submit an invoice for sending through the running gateway's outbound API.

It does what an ERP does: ``POST /v1/outbound`` (gateway/inbound/submit.py) on the ``[outbound]``
listener — the Unix socket if one is configured (who may send is decided by the socket's file mode),
else ``https://listen_host:listen_port`` with an ERP client certificate over mutual TLS (``--cert``,
``--key``; its key's SHA-256 must be in ``outbound.client_spki``).  The gateway checks the invoice as
it checks a partner's, finds the recipient partner by the buyer's identifiers and delivers it to that
partner's endpoint; the command prints the receipt.  The API takes no idempotency key: the gateway
recognises the same bytes sent again and answers with the same message (``duplicate: yes``), so
sending a file again after a timeout is safe.

Outcomes: 202 → exit 0 with the receipt; a refusal (4xx with the gateway's error JSON: code, message,
details) → ``refused: CODE …``, its details on stdout, exit 2; the gateway cannot take it now (408, 429,
5xx), no answer in time, or no connection → ``failed: …`` saying what to check, exit 1.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from .. import devpki
from ..config.load import load
from ..config.model import Config
from ..errors import ConfigError
from ..partners.book import load_directory
from ..tls import client_context
from .common import with_config, with_json
from .errors import Failed, Refused, UsageError, said_as
from .output import print_json, printable, record

PATH = "/v1/outbound"
PDF_MAGIC = b"%PDF-"
REPLY_MAX_BYTES = 4 * 1024 * 1024  # the gateway's replies are a few KiB, a schema refusal's details a few hundred
DEFAULT_TIMEOUT_S = 60.0
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104 (a listen address, connected to locally)
RETRY_LATER = {408, 429}  # a slow upload, too many requests: nothing was stored, send it again later


def seconds(text: str) -> float:
    """An argparse type: a time limit in seconds, above 0 and at most an hour."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0 and at most 3600")
    return value


def add_parsers(sub: Any) -> None:
    s = with_config(sub.add_parser(
        "send", help="submit an invoice to a trading partner through the running gateway's outbound API "
                     "(POST /v1/outbound, as the ERP does)"))
    s.add_argument("file", help="the invoice: UBL or CII XML, or a Factur-X / ZUGFeRD PDF (sent as application/pdf)")
    s.add_argument("--url", metavar="URL",
                   help="the outbound listener: https://HOST:PORT or unix:PATH (default: the configuration's [outbound] "
                        "socket, else https://listen_host:listen_port)")
    s.add_argument("--cert", metavar="PEM", help="the ERP's client certificate, for mutual TLS over TCP (its key's SHA-256 "
                                                 "must be listed in outbound.client_spki)")
    s.add_argument("--key", metavar="PEM", help="the private key of --cert")
    s.add_argument("--cacert", metavar="PEM",
                   help="trust anchors for the gateway's server certificate over TCP (default: the instance's development "
                        "CA when init made one and it issued https.certificate, else the system's trust store)")
    s.add_argument("--timeout", type=seconds, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help=f"give up after this long: connecting, sending and the reply (default {DEFAULT_TIMEOUT_S:.0f})")
    with_json(s, "the gateway's reply (a receipt, or its refusal)")


@dataclass(frozen=True, slots=True)
class Target:
    """Where the outbound API listens: a Unix socket, or an https URL."""

    url: str  # what is requested (over the socket, the host part is a placeholder)
    socket: Path | None = None

    @property
    def shown(self) -> str:
        return f"unix:{self.socket}" if self.socket is not None else self.url


def run(args: argparse.Namespace) -> int:
    cfg = load(args.config)
    target = _target(cfg, args.url)
    try:
        body = Path(args.file).read_bytes()
    except OSError as exc:
        raise UsageError(f"{args.file}: {exc.strerror or exc}") from None
    if not body:
        raise UsageError(f"{args.file}: the file is empty")
    media_type = "application/pdf" if body.startswith(PDF_MAGIC) else "application/xml"
    ctx = _tls(cfg, target, args)
    status, content_type, raw = asyncio.run(_post(target, body, media_type, ctx, args.timeout))
    reply = _json(raw) if content_type == "application/json" else None
    if status == 202 and isinstance(reply, dict) and "message_id" in reply:
        return _accepted(cfg, reply, args.json)
    if not (isinstance(reply, dict) and isinstance(reply.get("error"), str)):
        raise Failed(f"{target.shown} answered HTTP {status} ({content_type or 'no content type'}), not the gateway's "
                     "JSON: is this the gateway's outbound listener (see [outbound] in the configuration, or --url)?")
    if args.json:
        print_json(reply)
    code, message = reply["error"], str(reply.get("message", ""))
    if status in RETRY_LATER or status >= 500:
        raise Failed(f"{code} (HTTP {status}): {message}; nothing was stored: send it again later")
    if not args.json:
        for d in reply.get("details") or []:
            if isinstance(d, dict):
                where = "".join(f"{k} {d[k]}: " for k in ("line", "path") if d.get(k) is not None)
                print(printable(f"{where}{d.get('message', '')}"))
    raise Refused(f"{code} (HTTP {status}): {message}")


def _accepted(cfg: Config, reply: dict[str, Any], as_json: bool) -> int:
    """The receipt: the message, its status, and where it goes."""
    if as_json:
        print_json(reply)
        return 0
    partner = reply.get("partner")
    shown: dict[str, Any] = {"message_id": reply["message_id"], "status": reply.get("status"),
                             "duplicate": bool(reply.get("duplicate")),
                             "recipient": partner, "endpoint": _endpoint(cfg, partner),
                             "received_at": reply.get("received_at"), "sha256": reply.get("sha256")}
    notes = [reply["message"]] if reply.get("message") else []
    if reply.get("duplicate"):
        notes.append("these bytes were sent before: this is that message, delivered once")
    if notes:
        shown["note"] = "; ".join(str(n) for n in notes)
    if reply.get("rules"):
        shown["rules"] = reply["rules"]
    record(shown, False)
    print(f"\nIts delivery: einvoice-gateway messages show {reply['message_id']} -c {cfg.source}")
    return 0


def _endpoint(cfg: Config, partner: object) -> str | None:
    """The recipient's registered endpoint, as the partners file says it now (None if it cannot be read)."""
    if not isinstance(partner, str):
        return None
    try:
        found = load_directory(cfg.partners_file).get(partner)
    except (ConfigError, OSError):
        return None
    return found.endpoint or None if found is not None else None


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


# --- where, and how ------------------------------------------------------------------------------------


def _target(cfg: Config, url: str | None) -> Target:
    if url is not None:
        if url.startswith("unix:"):
            if not url[5:]:
                raise UsageError("--url: unix: needs the socket's path (unix:/run/einvoice-gateway/outbound.sock)")
            return Target(f"http://gateway{PATH}", Path(url[5:]))
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "https" or not parts.hostname or port is None:
            raise UsageError(f"--url: {url!r} is not https://HOST:PORT or unix:PATH (over TCP the outbound API is "
                             "mutual-TLS HTTPS only)")
        path = parts.path if parts.path not in ("", "/") else PATH
        return Target(f"https://{parts.netloc}{path}")
    out = cfg.outbound
    if out is None:
        raise ConfigError(f"outbound: {cfg.source} has no [outbound] table, so the gateway takes no invoices to send; "
                          "add one (see the commented example in the configuration), or name the listener with --url")
    if out.socket is not None:
        return Target(f"http://gateway{PATH}", out.socket)
    if not out.port:
        raise UsageError("outbound.listen_port is 0 (a port chosen at start, logged as outbound.listening): give the "
                         "listener's address with --url https://HOST:PORT")
    host = WILDCARDS.get(out.host, out.host)
    try:
        shown_host = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        shown_host = host
    return Target(f"https://{shown_host}:{out.port}{PATH}")


def default_ca(cfg: Config) -> Path | None:
    """The instance's development CA, if it issued the gateway's server certificate (an instance made by
    init); else None: the system's trust store."""
    anchors = list(cfg.https.client_ca) + list(cfg.outbound.client_ca if cfg.outbound is not None else ())
    try:
        server = x509.load_pem_x509_certificate(cfg.https.certificate.read_bytes())
    except (OSError, ValueError):
        return None
    for path, ca in devpki.development_cas(list(dict.fromkeys(anchors))):
        try:
            server.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):  # not its issuer
            continue
        return path
    return None


def _tls(cfg: Config, target: Target, args: argparse.Namespace) -> ssl.SSLContext | None:
    given = [o for o, v in (("--cert", args.cert), ("--key", args.key), ("--cacert", args.cacert)) if v]
    if target.socket is not None:
        if given:
            raise UsageError(f"{given[0]}: the outbound listener is the Unix socket {target.socket}, which takes no "
                             "certificates (its file mode decides who may send); leave out --cert, --key and --cacert")
        return None
    if bool(args.cert) != bool(args.key):
        raise UsageError("--cert and --key go together: the ERP's client certificate and its private key")
    if not args.cert:
        raise UsageError(f"--cert, --key: the outbound listener at {target.url} takes ERP client certificates only "
                         "(mutual TLS); give the ERP's certificate and key (its key's SHA-256 must be listed in "
                         "outbound.client_spki)")
    ca = Path(args.cacert) if args.cacert else default_ca(cfg)
    with said_as(UsageError):
        return client_context(ca, Path(args.cert), Path(args.key))


async def _post(target: Target, body: bytes, media_type: str, ctx: ssl.SSLContext | None,
                timeout: float) -> tuple[int, str, bytes]:
    """POST the invoice; (status, content type, reply body), or ``failed:`` saying what to check."""
    import aiohttp  # the HTTP client: imported by the command that uses it only

    connector = (aiohttp.UnixConnector(path=str(target.socket)) if target.socket is not None
                 else aiohttp.TCPConnector(ssl=ctx if ctx is not None else True))
    try:
        async with asyncio.timeout(timeout), aiohttp.ClientSession(connector=connector) as session, \
                session.post(target.url, data=body, headers={"Content-Type": media_type}) as r:
            raw = bytearray()
            async for chunk in r.content.iter_chunked(64 * 1024):
                raw += chunk
                if len(raw) > REPLY_MAX_BYTES:
                    raise Failed(f"{target.shown} answered with more than {REPLY_MAX_BYTES} bytes: not the gateway's "
                                 "reply; is --url right?")
            return r.status, r.content_type, bytes(raw)
    except TimeoutError:
        raise Failed(f"no answer from {target.shown} within {timeout:g} s (--timeout); the gateway may be overloaded or "
                     "stuck. If it took the invoice meanwhile, sending the same file again is safe: it answers with "
                     "the same message") from None
    except aiohttp.ClientConnectorCertificateError as exc:
        raise Failed(f"{target.shown}: the gateway's server certificate is not trusted ({exc.certificate_error}); give "
                     "--cacert the CA that issued it (https.certificate), and connect by a name it carries") from None
    except aiohttp.ClientSSLError as exc:
        raise Failed(f"{target.shown}: the TLS handshake failed ({exc}); is this the outbound listener, and is --cert "
                     "issued by a CA in outbound.client_ca?") from None
    except aiohttp.ClientConnectorError as exc:
        raise Failed(_unreachable(target, exc.os_error)) from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        raise Failed(f"{target.shown} closed the connection without an answer ({exc.__class__.__name__}); over TCP this "
                     "is how the gateway turns away a client certificate it does not accept (not issued by a CA in "
                     "outbound.client_ca, expired, or not yet valid): check --cert") from None
    except aiohttp.ClientError as exc:
        raise Failed(f"{target.shown}: {exc}") from None


def _unreachable(target: Target, error: OSError) -> str:
    """What to check when no connection could be made."""
    running = "is the gateway running (systemctl status einvoice-gateway), with this [outbound] listener"
    if target.socket is not None:
        if isinstance(error, FileNotFoundError):
            return f"no socket at {target.socket}: {running}? (outbound.socket, or --url unix:PATH)"
        if isinstance(error, PermissionError):
            return (f"{target.socket}: permission denied; its mode (outbound.socket_mode) lets the gateway's user and "
                    "group send: run this as a member of that group")
        if isinstance(error, ConnectionRefusedError):
            return f"nothing listens on {target.socket} (a socket left behind?): {running}?"
        return f"cannot connect to {target.socket}: {error.strerror or error}"
    if isinstance(error, ConnectionRefusedError):
        return f"nothing listens at {target.url}: {running} (outbound.listen_host, listen_port, or --url)?"
    return f"cannot connect to {target.url}: {error.strerror or error} (outbound.listen_host, listen_port, or --url)"
