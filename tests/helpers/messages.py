"""An instance with one message in each delivery state, for the CLI and console message views.

``populate`` leaves: ``delivered`` (to the ERP inbox), ``dead`` (an https ERP refused it with 422),
``foreign`` (from a second partner) and ``pending`` (outbound, to a partner endpoint that refuses
connections).
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
import tomli_w
from aiohttp import web

from gateway import devpki
from gateway.cli.demo import SAMPLE
from gateway.operations.instance import Instance
from gateway.partners.edit import register_partner
from gateway.tls import client_context
from tests.helpers import FOREIGN, FOREIGN_IDS, WAIT_S, XML, serving

SELLER = "0088:4000001000006"
BUYER = "0088:4000002000005"
ERP_REFUSAL = "cost centre missing"
# Another invoice of the demo partner, for a buyer that the routes send to the refusing ERP endpoint.
REFUSED_BUYER = "0088:4000003000004"
REFUSED_DOC = SAMPLE.replace(b">DEMO-2026-0001</cbc:ID>", b">DEMO-2026-0009</cbc:ID>").replace(
    b">4000002000005<", b">4000003000004<")
assert REFUSED_DOC.count(b"DEMO-2026-0009") == 1 and REFUSED_DOC.count(b"4000003000004") == 1


def merge_config(path: Path, data: dict[str, Any]) -> None:
    """Add ``data`` to an instance's configuration: its destinations appended, other tables replaced."""
    current = tomllib.loads(path.read_text(encoding="utf-8"))
    current.setdefault("rules", {})["processes"] = 1
    current["destinations"] += data.pop("destinations")
    current.update(data)
    path.write_text(tomli_w.dumps(current), encoding="utf-8")


async def refusing_erp(inst: Instance) -> web.AppRunner:
    """An https ERP endpoint (the instance's own server certificate) that refuses every invoice with 422."""
    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=422, text=ERP_REFUSAL)

    app = web.Application()
    app.router.add_post("/invoices", refuse)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(inst.server.cert, inst.server.key)
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
    return runner


async def populate(inst: Instance) -> dict[str, str]:
    erp = await refusing_erp(inst)
    closed = socket.socket()  # bound, never listening: connections to it are refused
    closed.bind(("127.0.0.1", 0))
    try:
        erp_port = erp.addresses[0][1]
        hmac_key = inst.root / "keys" / "erp-api.hmac"
        fd = os.open(hmac_key, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, os.urandom(32))
        os.close(fd)
        # Relative paths only: each test copies the instance folder elsewhere.
        merge_config(inst.config, {
            "destinations": [
                {"name": "erp-api", "type": "https", "url": f"https://127.0.0.1:{erp_port}/invoices",
                 "hmac_key_file": "keys/erp-api.hmac", "ca": "pki/ca.crt"},
                {"name": "partners", "type": "partner", "ca": "pki/ca.crt",
                 "client_certificate": "pki/clients/demo-supplier.crt", "client_key": "pki/clients/demo-supplier.key"}],
            "routes": [{"receiver": REFUSED_BUYER, "destinations": ["erp-api"]}],
            "routing": {"default": ["erp-inbox"]},
            "outbound": {"socket": "outbound.sock", "identities": [SELLER]},
        })
        acme = devpki.issue(inst.ca, inst.root / "pki" / "clients", "acme", role="client")
        buyer = devpki.issue(inst.ca, inst.root / "pki" / "clients", "buyer", role="client")
        register_partner(inst.partners, "acme", [acme.cert], FOREIGN_IDS, [], "pytest")
        register_partner(inst.partners, "buyer", [buyer.cert], [BUYER], [], "pytest",
                                  endpoint=f"https://127.0.0.1:{closed.getsockname()[1]}/v1/invoices")
        ids: dict[str, str] = {}
        async with serving(inst, "warning") as running:
            for key, body, cert in (("delivered", SAMPLE, inst.demo_client), ("dead", REFUSED_DOC, inst.demo_client),
                                    ("foreign", FOREIGN, acme)):
                ctx = client_context(inst.ca.cert, cert.cert, cert.key)
                async with aiohttp.ClientSession(running.url, connector=aiohttp.TCPConnector(ssl=ctx)) as s, \
                        s.post("/v1/invoices", data=body, headers=XML) as r:
                    assert r.status == 202, await r.text()
                    ids[key] = (await r.json())["message_id"]
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(inst.root / "outbound.sock"))) as s, \
                    s.post("http://gw/v1/outbound", data=SAMPLE, headers=XML) as r:
                assert r.status == 202, await r.text()
                ids["pending"] = (await r.json())["message_id"]
            reports = running.gw.store.reports
            deadline = asyncio.get_running_loop().time() + WAIT_S

            async def settled() -> bool:
                if await reports.counts() != {"invoices": 4, "deliveries_delivered": 2, "deliveries_dead": 1,
                                              "deliveries_pending": 1}:
                    return False
                pending = await reports.message(ids["pending"])
                return pending is not None and pending.deliveries[0].attempts >= 1

            while not await settled():
                assert asyncio.get_running_loop().time() < deadline, await reports.counts()
                await asyncio.sleep(0.05)
        return ids
    finally:
        closed.close()
        await erp.cleanup()
