"""An instance that sends: the ``[outbound]`` listener (a Unix socket, or TCP with mutual TLS), a partner
to send to and the ``type = "partner"`` destination that carries outbound invoices to it.

``make_sender`` configures an ``init`` instance (A, "this business", whose seller is the sample's
supplier) to take the ERP's submissions and send them to partner ``buyer-b`` (the sample's buyer).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from gateway import devpki
from gateway.operations.instance import Instance
from tests.helpers import add_partner, rewrite_config
from tests.helpers.messages import BUYER, SELLER


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def a_client_cert(a: Instance) -> devpki.Issued:
    """What A presents to its partners."""
    return devpki.issue(a.ca, a.root / "pki", "a-client", role="client", cn="gateway A")


Tweak = Callable[[dict[str, Any]], None]


def make_sender(a: Instance, a_client: devpki.Issued, *, endpoint: str, ca: Path, transport: str = "unix",
                tweak: Tweak | None = None) -> None:
    """Configure ``a`` to send: partner buyer-b (signed invoices), a partner destination, the [outbound]
    listener; ``tweak`` changes the resulting configuration further."""
    add_partner(a, "buyer-b", [BUYER], endpoint=endpoint, sign_outbound=True)  # its client certificate is never used here
    listener: dict[str, Any] = ({"socket": "outbound.sock"} if transport == "unix" else
                                {"listen_host": "127.0.0.1", "listen_port": 0, "client_ca": [str(a.ca.cert)]})

    def change(c: dict[str, Any]) -> None:
        c.setdefault("rules", {})["processes"] = 1
        c["destinations"].append({"name": "partners", "type": "partner", "ca": str(ca),
                                  "client_certificate": str(a_client.cert), "client_key": str(a_client.key),
                                  "timeout_s": 5.0})
        c["outbound"] = {**listener, "identities": [SELLER]}
        c.setdefault("delivery", {}).update(retry_base_s=0.1, retry_cap_s=0.5, breaker_cooldown_s=0.1)
        if tweak is not None:
            tweak(c)

    rewrite_config(a.config, change)


def unix_session(a: Instance) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(a.root / "outbound.sock")))
