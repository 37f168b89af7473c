"""XML signatures in tests: the parser the stage uses, the refusal texts, partners that sign."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from lxml import etree

from gateway import devpki
from gateway.config.model import DEFAULT_XML_LIMITS
from gateway.model import SignaturePolicy
from gateway.partners.directory import PartnerDirectory
from gateway.stages.xmlparse import XmlParser
from tests.helpers import Running
from tests.helpers import add_partner as add_client_partner

CAC = "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
DIGEST_MISMATCH = "digest mismatch for reference '': the signed content was changed"
PARSER = XmlParser(DEFAULT_XML_LIMITS)


def parse(data: bytes) -> etree._Element:
    return PARSER.parse(data).root


def bad_method(uri: str) -> str:
    """The refusal of a signature method outside the allowed set."""
    return f"signature method {uri!r} is not allowed (RSA-SHA256/384/512 or ECDSA-SHA256/384/512 only)"


async def reload_partners(running: Running, ready: Callable[[PartnerDirectory], bool]) -> None:
    """Make the running gateway take the edited partners file now (it polls), and wait until it has."""
    book = running.gw.parts.partners
    for _ in range(200):
        await asyncio.to_thread(book.refresh)
        if ready(book.current):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the gateway did not pick up the partners file")


async def add_signing_partner(running: Running, name: str, party_ids: list[str], signing: list[Path],
                              policy: SignaturePolicy = SignaturePolicy.IF_PRESENT) -> devpki.Issued:
    """A partner with these signing certificates, taken by the running gateway; its client certificate returned."""
    client = await asyncio.to_thread(add_client_partner, running.inst, name, party_ids, signing_certs=signing,
                                     policy=policy)
    await reload_partners(running, lambda d: d.get(name) is not None)
    return client
