"""``type = "https"``: each invoice POSTed to an ERP endpoint, HMAC-signed, with an idempotency key."""

from __future__ import annotations

import hashlib
import hmac
import ssl
import time
from collections.abc import Callable

import aiohttp

from ..config.model import Destination
from ..storage.records import DeliveryJob
from ..tls import client_context
from .sender import MAX_ERROR_CHARS, DeliveryFailed

MAX_REPLY_BYTES = 16_384  # read of a destination's reply body, for the reason of a refusal


def signature_header(key: bytes, timestamp: int, message_id: str, body: bytes) -> str:
    """``v1=<hex>``: HMAC-SHA256 over "<timestamp>.<message id>.<body>", so that an ERP can check the
    origin, refuse stale replays (the timestamp) and trust the idempotency key (the message id)."""
    mac = hmac.new(key, f"{timestamp}.{message_id}.".encode(), hashlib.sha256)
    mac.update(body)
    return f"v1={mac.hexdigest()}"


def classify(status: int, retry_after: str | None, reply: str) -> DeliveryFailed | None:
    """None for success (2xx); otherwise whether the refusal is worth retrying."""
    if 200 <= status < 300:
        return None
    reason = f"HTTP {status}" + (f": {reply.strip()}" if reply.strip() else "")
    if status in (408, 429) or status >= 500:
        after = None
        if retry_after and retry_after.strip().isdigit():
            after = float(retry_after.strip())
        return DeliveryFailed(reason, retry_after=after)
    if 300 <= status < 400:
        return DeliveryFailed(f"{reason} (redirects are not followed; correct the destination's url)", permanent=True)
    return DeliveryFailed(reason, permanent=True)


class HttpPoster:
    """What the ERP and partner senders share: one TLS session pool, bounded replies, error mapping."""

    def __init__(self, dest: Destination):
        self.name = dest.name
        self.concurrency = dest.concurrency
        self.dest = dest
        self.ssl = client_context(dest.ca, dest.client_certificate, dest.client_key)
        self.timeout = aiohttp.ClientTimeout(total=dest.timeout_s)
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.ssl, limit=self.concurrency), timeout=self.timeout)
        return self._session

    async def post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        try:
            async with self.session().post(url, data=body, headers=headers, allow_redirects=False) as resp:
                reply = await resp.content.read(MAX_REPLY_BYTES)
                failure = classify(resp.status, resp.headers.get("Retry-After"), self.reason(reply))
                if failure is not None:
                    raise failure
                return resp.status, reply.decode("utf-8", "replace")
        except DeliveryFailed:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as exc:
            text = str(exc) or exc.__class__.__name__
            raise DeliveryFailed(f"{exc.__class__.__name__}: {text}") from exc

    @staticmethod
    def reason(reply: bytes) -> str:
        return reply.decode("utf-8", "replace").replace("\n", " ")[:MAX_ERROR_CHARS]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class HttpsSender(HttpPoster):
    """POSTs the invoice to an ERP endpoint: the document as the body, the facts in headers, an
    HMAC signature header, optionally a bearer token and a client certificate."""

    def __init__(self, dest: Destination, clock: Callable[[], float] = time.time):
        super().__init__(dest)
        assert dest.hmac_key_file is not None
        self.key = dest.hmac_key_file.read_bytes()
        self.token = dest.bearer_token_file.read_text(encoding="utf-8").strip() if dest.bearer_token_file else None
        self.clock = clock

    def headers(self, job: DeliveryJob, document: bytes) -> dict[str, str]:
        ts = int(self.clock())
        facts = job.facts
        headers = {
            "Content-Type": facts.media_type or "application/xml",
            "Idempotency-Key": job.message_id,
            "X-Einvoice-Message-Id": job.message_id,
            "X-Einvoice-Partner": job.partner,
            "X-Einvoice-Direction": facts.direction,
            "X-Einvoice-Sha256": job.sha256,
            "X-Einvoice-Document-Type": facts.document_type,
            "X-Einvoice-Timestamp": str(ts),
            "X-Einvoice-Signature": signature_header(self.key, ts, job.message_id, document),
        }
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    async def send(self, job: DeliveryJob, document: bytes) -> str:
        status, _ = await self.post(self.dest.url, document, self.headers(job, document))
        return f"HTTP {status}"
