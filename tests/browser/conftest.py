"""Real-browser fixtures for the admin console (helpers in ``tests/helpers/browser.py``).

* ``browser``: one headless chromium per module (never a downloaded browser).  Without
  /usr/bin/chromium the folder is skipped, except under CI=true, where that is a failure.
* ``start_console``: a fresh instance (``tests.conftest.inst``) served in-process with its console;
  ``console`` is the same without any preparation of the instance.
* ``start_erp``: an HTTPS ERP stub (``tests.helpers.erp.Erp``, answers scripted) with the instance's
  server certificate, for ``https`` destinations.
"""

from __future__ import annotations

import contextlib
import io
import os
import ssl
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import pytest
import pytest_asyncio
from aiohttp import web

from gateway import logs
from gateway.operations import instance
from tests.helpers import serving
from tests.helpers.browser import CHROMIUM, LAUNCH_ARGS, Console, StartConsole, StartErp, async_playwright, prepare_instance
from tests.helpers.erp import Erp

if TYPE_CHECKING:
    from playwright.async_api import Browser


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium); the browser tests are required under CI=true")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium): the real-browser console tests cannot run")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS, headless=True)
        try:
            yield b
        finally:
            await b.close()


@pytest_asyncio.fixture(loop_scope="module")
async def start_console(inst: instance.Instance, browser: Browser) -> AsyncIterator[StartConsole]:
    """Starts the instance's gateway (after ``prepare(inst)``, to change its configuration) once."""
    stack = contextlib.AsyncExitStack()
    consoles: list[Console] = []

    async def start(prepare: Callable[[instance.Instance], None] | None = None) -> Console:
        assert not consoles, "one gateway per test"
        prepare_instance(inst)
        if prepare is not None:
            prepare(inst)
        log = io.StringIO()
        running = await stack.enter_async_context(serving(inst, "info", log))
        assert running.gw.admin_port, "the admin listener did not start"
        console = Console(running, browser, log)
        consoles.append(console)
        return console

    try:
        yield start
    finally:
        for console in consoles:
            for context in console.contexts:
                with contextlib.suppress(Exception):
                    await context.close()
        await stack.aclose()
        logs.configure("warning")


@pytest_asyncio.fixture(loop_scope="module")
async def console(start_console: StartConsole) -> Console:
    return await start_console()


@pytest_asyncio.fixture(loop_scope="module")
async def start_erp() -> AsyncIterator[StartErp]:
    """ERP stubs on 127.0.0.1 (TLS with the instance's server certificate, trusted through pki/ca.crt)."""
    started: list[tuple[Erp, web.AppRunner]] = []

    async def start(inst: instance.Instance) -> Erp:
        erp = Erp()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", erp.handle)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(inst.server.cert), str(inst.server.key))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        started.append((erp, runner))
        erp.url = f"https://127.0.0.1:{runner.addresses[0][1]}/invoices"
        return erp

    try:
        yield start
    finally:
        for erp, runner in started:
            erp.hang.set()
            await runner.cleanup()
