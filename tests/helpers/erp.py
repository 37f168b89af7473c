"""A fake ERP: an HTTPS endpoint that records each request and answers from a script."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

HANG = -1  # a reply "status" that never answers (until the test ends)
Reply = tuple[int, str, dict[str, str]]


@dataclass(frozen=True)
class Seen:
    path: str
    headers: dict[str, str]
    body: bytes
    peer_cn: str | None  # the client certificate's common name, when one was presented


@dataclass
class Erp:
    """An HTTPS endpoint that records requests and answers ``script`` in order, then ``default``."""

    url: str = ""
    script: list[Reply] = field(default_factory=list)
    default: Reply = (200, "booked", {})
    seen: list[Seen] = field(default_factory=list)
    gate: asyncio.Event | None = None  # when set up, every request waits here before it is answered
    active: int = 0
    peak: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    hang: asyncio.Event = field(default_factory=asyncio.Event)  # set at teardown: lets HANG replies end

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        cn = next((v for rdn in cert["subject"] for k, v in rdn if k == "commonName"), None) if cert else None
        self.seen.append(Seen(request.path, dict(request.headers), body, cn))
        self.active += 1
        self.peak = max(self.peak, self.active)
        self.changed.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            status, text, headers = self.script.pop(0) if self.script else self.default
            if status == HANG:
                await self.hang.wait()
                status = 200
            return web.Response(status=status, text=text or None, headers=headers)
        finally:
            self.active -= 1
            self.changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self.changed.clear()
                await self.changed.wait()

    @property
    def keys(self) -> list[str]:
        return [s.headers["Idempotency-Key"] for s in self.seen]
