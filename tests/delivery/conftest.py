"""Fixtures of the delivery tests; what they make is described in tests/helpers/outbox.py and tests/helpers/mail.py.

* ``pki``: the fake ERPs' CA, server and client certificates, made once for the folder (the outbox,
  webhook and partner tests share them);
* ``start_erp``: starts fake ERPs (``tests.helpers.erp.Erp``) on ephemeral ports, stopped after the test;
* ``env``: a real store and vault with fake clocks, building outboxes over HTTPS (``tests.helpers.outbox.Env``);
* ``relay``: the smarthost stub (``tests.helpers.mail.Relay``) with a certificate from the instance's CA.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from aiohttp import web

from gateway import devpki
from gateway.operations.instance import Instance
from gateway.storage.sqlite.store import SqliteStore
from gateway.vault import MasterKey, Vault
from tests.helpers import SetTime
from tests.helpers.erp import Erp
from tests.helpers.mail import Relay
from tests.helpers.outbox import Env, Pki, StartErp


@pytest.fixture(scope="package")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = devpki.make_ca(folder, "erp-ca")
    server = devpki.issue(ca, folder, "erp", role="server", cn="localhost", sans=("127.0.0.1", "localhost"))
    client = devpki.issue(ca, folder, "gateway-client", role="client")
    return Pki(ca, server, client)


@pytest.fixture
async def start_erp(pki: Pki) -> AsyncIterator[StartErp]:
    """Starts fake ERPs on ephemeral ports (``mtls=True``: a client certificate from the CA is required)."""
    started: list[tuple[Erp, web.AppRunner]] = []

    async def start(*, mtls: bool = False, path: str = "/erp") -> Erp:
        erp = Erp()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", erp.handle)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
        if mtls:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cafile=str(pki.ca.cert))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        started.append((erp, runner))
        erp.url = f"https://127.0.0.1:{runner.addresses[0][1]}{path}"
        return erp

    yield start
    for erp, runner in started:
        erp.hang.set()
        if erp.gate is not None:
            erp.gate.set()
        await runner.cleanup()


@pytest.fixture
async def env(tmp_path: Path, pki: Pki) -> AsyncIterator[Env]:
    store = SqliteStore(tmp_path / "state")
    vault = Vault([MasterKey("k1", "", os.urandom(32))])
    key = tmp_path / "erp.hmac"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    executor = ThreadPoolExecutor(4)
    e = Env(store, vault, SetTime(0.0), SetTime(1000.0), executor, pki, tmp_path, key)
    yield e
    for box in e.outboxes:
        for sender in box.senders.values():
            await sender.close()
    executor.shutdown(wait=True)
    await store.close()


@pytest.fixture
async def relay(inst: Instance) -> AsyncIterator[Relay]:
    stub = await Relay.start(inst)
    try:
        yield stub
    finally:
        await stub.close()
