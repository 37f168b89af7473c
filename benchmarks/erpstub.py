"""A stub ERP for delivery tests: an HTTPS endpoint that books invoices and keeps a ledger.

It speaks the receiving side of the gateway's ``https`` destination (SECURITY-TESTS.md §5.2, D-06,
D-07): every ``POST`` carries the invoice as its body and

    Idempotency-Key: <message_id>           the same on every attempt
    X-Einvoice-Message-Id: <message_id>
    X-Einvoice-Sha256: <hex SHA-256 of the body>
    X-Einvoice-Timestamp: <unix seconds>
    X-Einvoice-Signature: v1=<hex HMAC-SHA256(key, f"{timestamp}.{message_id}.".encode() + body)>
    Authorization: Bearer <token>           when a token is configured

A request whose signature (or token) is wrong gets 401, one whose timestamp is outside
``max_skew_s`` gets 401, a missing header or a body that does not match its SHA-256 header gets 400.
A verified request is *booked* once per Idempotency-Key: a repeat is answered 200 again (as a real
ERP with an idempotency store would) and counted as a raw duplicate attempt, never as a new booking;
a repeat whose body differs from the booked one gets 422.

Modes (``await stub.set_mode(...)``), switched at any time:

    normal            201 for a new booking, 200 for a repeat
    down              the listening socket is closed and open connections are aborted: connection refused
    503               every request is answered 503 before anything is checked or booked
    commit-then-drop  the booking is recorded, then the connection is aborted without a reply (D-07)

In-process use::

    stub = ErpStub(hmac_key, folder, ca=inst.ca)      # or ca=None: the stub makes its own CA
    await stub.start()                                 # stub.url, stub.ca_cert for the destination
    ...
    await stub.stop()

Standalone (for trying a gateway by hand): ``python benchmarks/erpstub.py --help``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import re
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gateway import devpki

MODES = ("normal", "down", "503", "commit-then-drop")
MAX_SKEW_S = 300  # the replay window of the signature timestamp (the usual webhook choice, e.g. Stripe's 5 min)
MAX_BODY_BYTES = 64 * 1024 * 1024  # the gateway's own default https.max_body_bytes
_SIGNATURE = re.compile(r"v1=([0-9a-f]{64})")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class Post:
    """One POST as the ERP saw it (``status`` 0: the connection was dropped without a reply)."""

    message_id: str
    idempotency_key: str
    sha256: str  # of the body actually received
    ts: float
    status: int
    booked: bool  # this request made a new booking
    error: str = ""  # why it was refused, if it was


@dataclass
class Ledger:
    """What the ERP recorded.  ``bookings`` is keyed by Idempotency-Key (the ERP's own dedup)."""

    posts: list[Post] = field(default_factory=list)
    bookings: dict[str, Post] = field(default_factory=dict)
    dup_attempts: int = 0  # verified requests whose key was booked already
    refused: Counter[str] = field(default_factory=Counter)  # reason → count (401, 400, 503, …)

    def booked_message_ids(self) -> dict[str, str]:
        """message id → SHA-256 of the booked body."""
        return {p.message_id: p.sha256 for p in self.bookings.values()}


def signature(key: bytes, timestamp: str, message_id: str, body: bytes) -> str:
    return hmac.new(key, f"{timestamp}.{message_id}.".encode() + body, hashlib.sha256).hexdigest()


def signed_headers(key: bytes, message_id: str, body: bytes, *, timestamp: int | None = None,
                   partner: str = "demo-supplier") -> dict[str, str]:
    """The headers the gateway sends (for tests that play the gateway's part)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {"Content-Type": "application/xml", "Idempotency-Key": message_id, "X-Einvoice-Message-Id": message_id,
            "X-Einvoice-Partner": partner, "X-Einvoice-Sha256": hashlib.sha256(body).hexdigest(),
            "X-Einvoice-Timestamp": ts, "X-Einvoice-Signature": f"v1={signature(key, ts, message_id, body)}"}


class ErpStub:
    def __init__(self, hmac_key: bytes, folder: Path, *, ca: devpki.Issued | None = None, bearer_token: str | None = None,
                 host: str = "127.0.0.1", port: int = 0, path: str = "/invoices", max_skew_s: float = MAX_SKEW_S):
        if len(hmac_key) < 32:
            raise ValueError("the HMAC key must have at least 32 bytes")
        self.hmac_key = hmac_key
        self.bearer_token = bearer_token
        self.host = host
        self.port = port
        self.path = path
        self.max_skew_s = max_skew_s
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = ca or devpki.make_ca(folder, "erp-ca", cn="ERP stub CA")
        self.cert = devpki.issue(self.ca, folder, "erp-server", role="server", cn="localhost", sans=(host, "localhost"))
        self.ledger = Ledger()
        self.mode = "normal"
        self.reply_delay_s = 0.0  # hold each reply this long after booking (lets a test kill the gateway mid-POST)
        self.in_flight = 0
        self.request_seen = asyncio.Event()  # set whenever a verified request arrives
        self._runner: web.AppRunner | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ssl.load_cert_chain(str(self.cert.cert), str(self.cert.key))

    @property
    def ca_cert(self) -> Path:
        """The trust anchor for the stub's server certificate (the destination's ``ca``)."""
        return self.ca.cert

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}{self.path}"

    @property
    def up(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(self.path, self._post)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        await self._listen()

    async def stop(self) -> None:
        await self._close_listener()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
        self.mode = mode
        if mode == "down":
            await self._close_listener()
        elif not self.up:
            await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None and self._runner.server is not None
        loop = asyncio.get_running_loop()
        # The same port every time it comes back up (reuse_address: the old one may be in TIME_WAIT).
        self._server = await loop.create_server(self._runner.server, self.host, self.port, ssl=self._ssl,
                                                reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        assert self._runner is not None and self._runner.server is not None
        for handler in self._runner.server.connections:  # a host that goes away takes its connections along
            if handler.transport is not None:
                handler.transport.abort()
        await server.wait_closed()

    def _refuse(self, status: int, reason: str, request: web.Request, body: bytes = b"") -> web.Response:
        self.ledger.refused[reason] += 1
        self.ledger.posts.append(Post(request.headers.get("X-Einvoice-Message-Id", ""), request.headers.get("Idempotency-Key", ""),
                                      hashlib.sha256(body).hexdigest(), time.time(), status, False, reason))
        return web.json_response({"error": reason}, status=status)

    def _verify(self, request: web.Request, body: bytes) -> tuple[int, str] | None:
        h = request.headers
        if self.bearer_token is not None:
            expected = f"Bearer {self.bearer_token}"
            if not hmac.compare_digest(h.get("Authorization", "").encode(), expected.encode()):
                return 401, "bad-bearer-token"
        message_id, key, ts = h.get("X-Einvoice-Message-Id", ""), h.get("Idempotency-Key", ""), h.get("X-Einvoice-Timestamp", "")
        if not message_id or not key:
            return 400, "missing-id-or-key"
        sig = _SIGNATURE.fullmatch(h.get("X-Einvoice-Signature", ""))
        if sig is None or not ts.isdigit():
            return 401, "bad-signature"
        if not hmac.compare_digest(sig.group(1), signature(self.hmac_key, ts, message_id, body)):
            return 401, "bad-signature"
        if abs(time.time() - int(ts)) > self.max_skew_s:
            return 401, "stale-timestamp"
        sha = h.get("X-Einvoice-Sha256", "")
        if not _SHA256.fullmatch(sha) or sha != hashlib.sha256(body).hexdigest():
            return 400, "sha256-mismatch"
        if key != message_id:
            return 400, "key-not-message-id"
        return None

    async def _post(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.mode == "503":
            return self._refuse(503, "503", request, body)
        refusal = self._verify(request, body)
        if refusal is not None:
            return self._refuse(*refusal, request, body)
        key = request.headers["Idempotency-Key"]
        repeat = key in self.ledger.bookings
        if repeat and self.ledger.bookings[key].sha256 != hashlib.sha256(body).hexdigest():
            return self._refuse(422, "key-reused-with-other-body", request, body)
        drop = self.mode == "commit-then-drop"
        post = Post(request.headers["X-Einvoice-Message-Id"], key, hashlib.sha256(body).hexdigest(), time.time(),
                    0 if drop else 200 if repeat else 201, not repeat)
        self.ledger.posts.append(post)
        if repeat:
            self.ledger.dup_attempts += 1
        else:
            self.ledger.bookings[key] = post
        self.request_seen.set()
        self.in_flight += 1
        try:
            if self.reply_delay_s > 0:
                await asyncio.sleep(self.reply_delay_s)
        finally:
            self.in_flight -= 1
        if drop and request.transport is not None:
            request.transport.abort()  # committed, but the gateway never hears so (aiohttp skips the write)
        return web.json_response({"booked": key, "repeat": repeat}, status=post.status)


async def _serve(args: argparse.Namespace) -> None:
    key = Path(args.hmac_key_file).read_bytes()
    token = Path(args.bearer_token_file).read_text().strip() if args.bearer_token_file else None
    ca = devpki.Issued(Path(args.ca_cert), Path(args.ca_key)) if args.ca_cert else None
    stub = ErpStub(key, Path(args.dir), ca=ca, bearer_token=token, port=args.port)
    await stub.start()
    await stub.set_mode(args.mode)
    print(f"ERP stub at {stub.url} (trust {stub.ca_cert}); Ctrl-C to stop", flush=True)
    try:
        while True:
            await asyncio.sleep(5)
            led = stub.ledger
            print(f"posts {len(led.posts)}, bookings {len(led.bookings)}, dup_attempts {led.dup_attempts}, "
                  f"refused {dict(led.refused)}", flush=True)
    finally:
        await stub.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hmac-key-file", required=True, help="the shared secret (raw file bytes, >= 32)")
    ap.add_argument("--bearer-token-file", help="require Authorization: Bearer <this file's content, stripped>")
    ap.add_argument("--dir", required=True, help="folder for the stub's certificate (and its CA, unless --ca-cert)")
    ap.add_argument("--ca-cert", help="issue the server certificate from this CA (PEM; with --ca-key)")
    ap.add_argument("--ca-key")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--mode", choices=MODES, default="normal")
    args = ap.parse_args()
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
