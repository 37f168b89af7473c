"""The operators' listener: ``/healthz``, ``/readyz`` and Prometheus ``/metrics``, described at
``/v1/openapi.json`` (and the web console under ``/console/``, gateway/console/app.py).

Loopback by default and then unauthenticated (like any local metrics port).  Bound to another
address it needs ``admin.token_file`` (configuration refuses otherwise) and is served over HTTPS
with the gateway's certificate; every request must then carry ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from datetime import UTC, datetime

from aiohttp import web

from ..metrics import Gauge, Metrics
from . import openapi

READY_STORE_TIMEOUT_S = 2.0  # /readyz fails when the store does not answer a read in this time


class AdminInbound:
    def __init__(self, metrics: Metrics, gauges: Callable[[], Awaitable[list[Gauge]]], ready: Callable[[], str | None],
                 store_ping: Callable[[], Awaitable[object]], executor: Executor, token: str | None):
        self.metrics = metrics
        self.gauges = gauges
        self.ready = ready  # None when ready, else why not
        self.store_ping = store_ping
        self.executor = executor
        self.token = token
        self.started = time.monotonic()
        self.document = json.dumps(openapi.admin_document(token=token is not None), indent=1).encode()

    def app(self, max_body: int = 1024) -> web.Application:
        """``max_body``: the largest request body read (the machine endpoints read none; the console's
        forms, mounted below, need more, and aiohttp applies the outermost application's limit)."""
        app = web.Application(client_max_size=max_body, middlewares=[self._auth])
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get(openapi.PATH, self.openapi_page)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        # The console (/console/) has its own logins and sessions; the token guards the machine endpoints.
        if self.token is not None and not request.path.startswith("/console"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return web.json_response({"error": "UNAUTHORIZED", "message": "a valid bearer token is required "
                                          "(Authorization: Bearer, the token in admin.token_file)", "details": []},
                                         status=401, headers={"WWW-Authenticate": "Bearer"})
        response = await handler(request)
        response.headers["Cache-Control"] = "no-store"
        return response

    async def healthz(self, _request: web.Request) -> web.Response:
        """The process and its event loop are alive (this answer is the proof)."""
        return web.json_response({"status": "ok", "uptime_s": round(time.monotonic() - self.started, 1)})

    async def readyz(self, _request: web.Request) -> web.Response:
        """Listeners accepting, not stopping, and the store answering."""
        reason = self.ready()
        if reason is None:
            try:
                await asyncio.wait_for(self.store_ping(), READY_STORE_TIMEOUT_S)
            except Exception as exc:  # any failure of the store means: do not send traffic here
                reason = f"the store does not answer ({exc.__class__.__name__})"
        body = {"status": "ready" if reason is None else "not ready", "at": datetime.now(UTC).isoformat()}
        if reason is not None:
            body["reason"] = reason
        return web.json_response(body, status=200 if reason is None else 503)

    async def metrics_page(self, _request: web.Request) -> web.Response:
        gauges = await self.gauges()
        text = await asyncio.get_running_loop().run_in_executor(self.executor, self.metrics.render, gauges)
        return web.Response(body=text, content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def openapi_page(self, _request: web.Request) -> web.Response:
        """The OpenAPI 3.1 description of these endpoints (gateway/operations/openapi.py)."""
        return web.Response(body=self.document, content_type="application/json")
