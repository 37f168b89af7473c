"""Shared fixtures: a real instance made at test time, a real listener on 127.0.0.1.

``instance`` runs ``init`` into a temporary folder (development PKI, demo partner, master key);
``gateway`` starts the daemon in-process on an ephemeral port; ``client`` returns an aiohttp
session presenting a given client certificate.  ``corpus`` is ../shared/corpus, which is required
under CI=true and skipped (with a clear message) elsewhere when absent.
"""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from gateway import logs
from gateway.operations import instance
from tests.helpers import CORPUS, Running, serving, with_corpus_cii
from tests.helpers.audit import Populated, populate


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


@pytest.fixture
def cii_inst(inst: instance.Instance, corpus: Path) -> instance.Instance:
    """An instance that also checks CII against EN 16931 (stylesheet and D16B schema from the corpus)."""
    with_corpus_cii(inst.config)
    return inst


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


@pytest.fixture(scope="session")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Populated:
    """An instance with a real audit log (tests/helpers/audit.py), stopped; tests work on a ``copy_of`` it."""
    inst = instance.init(tmp_path_factory.mktemp("audit") / "gw", port=0)
    return Populated(inst.root, asyncio.run(populate(inst)))
