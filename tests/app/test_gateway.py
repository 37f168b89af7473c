"""Reloading the configuration (SIGHUP / Gateway.reload) while the gateway serves.

In-process: an invalid edit is refused and the running configuration stays; new destinations and
routes, a new server certificate and a new partner CA take effect for new invoices and connections
while open keep-alive connections keep working; a restart-only change is named.  As a real daemon
with two workers: SIGHUP three times under load loses nothing.  The partners file is re-read while
serving: a partner added with ``partners add`` is let in without a restart, and an invalid file keeps
the partners in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sqlite3
import ssl
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import devpki
from gateway.cli.demo import SAMPLE
from gateway.files import atomic_write
from gateway.operations import instance
from gateway.partners.edit import register_partner
from gateway.tls import client_context
from tests.helpers import (
    FOREIGN,
    FOREIGN_IDS,
    FakeClock,
    Running,
    audit_of,
    eventually,
    log_events,
    numbered,
    post,
    run_cli,
    serving_logged,
)
from tests.helpers.daemon import Daemon, NotifySocket, make_instance

# --- (1) an invalid edit is refused; the running configuration stays -------------------------------------


def _unknown_key(text: str, _inst: instance.Instance) -> tuple[str, str]:
    return text.replace("[https]\n", "[https]\nlisten_prot = 8443\n", 1), "https.listen_prot"


def _missing_certificate(text: str, _inst: instance.Instance) -> tuple[str, str]:
    return text.replace('certificate = "pki/server.crt"', 'certificate = "pki/gone.crt"', 1), "https.certificate"


def _garbage_certificate(text: str, inst: instance.Instance) -> tuple[str, str]:
    (inst.root / "pki" / "garbage.crt").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    return text.replace('certificate = "pki/server.crt"', 'certificate = "pki/garbage.crt"', 1), "https.certificate"


def _route_to_nowhere(text: str, _inst: instance.Instance) -> tuple[str, str]:
    return text + '\n[[routes]]\npartner = "demo-supplier"\ndestinations = ["nowhere"]\n', "routes[0].destinations[0]"


def _not_toml(text: str, _inst: instance.Instance) -> tuple[str, str]:
    return text + "\n[https\n", "not valid TOML"


EDITS = [_unknown_key, _missing_certificate, _garbage_certificate, _route_to_nowhere, _not_toml]


async def test_invalid_edit_is_refused_and_the_old_config_stays(inst):
    good = inst.config.read_text()
    async with serving_logged(inst) as (r, stream), r.session() as s:
        before = r.gw.config
        for n, edit in enumerate(EDITS, 1):
            text, named = edit(good, inst)
            inst.config.write_text(text)
            assert await r.gw.reload() is False, edit.__name__
            failed = log_events(stream, "config.reload_failed")
            assert len(failed) == n
            assert named in failed[-1]["reason"], (edit.__name__, failed[-1])
            assert failed[-1]["level"] == "error"
            assert r.gw.config is before
            status, reply = await post(s, numbered(f"KEEP-{n}"))  # still accepting, with the running configuration
            assert status == 202, (edit.__name__, reply)
        assert log_events(stream, "config.reloaded") == []
        assert r.gw.metrics.reloads.labels("failed")._value.get() == len(EDITS)
        inst.config.write_text(good)
        assert await r.gw.reload() is True
        assert r.gw.metrics.reloads.labels("ok")._value.get() == 1


# --- (2) a new destination and route --------------------------------------------------------------


async def test_new_destination_and_route_take_effect(inst, tmp_path):
    second = tmp_path / "erp-two"
    second.mkdir()
    async with serving_logged(inst) as (r, stream):
        async with r.session() as s:
            status, first = await post(s, numbered("RELOAD-BEFORE"))
            assert status == 202, first
            await eventually(lambda: (inst.delivery_folder / f"{first['message_id']}.xml").exists(), "first delivery")

            inst.config.write_text(inst.config.read_text() + (
                f'\n[[destinations]]\nname = "erp-two"\ntype = "directory"\npath = "{second}"\n'
                '\n[[routes]]\npartner = "demo-supplier"\ndestinations = ["erp-two"]\n'))
            assert await r.gw.reload() is True
            [done] = log_events(stream, "config.reloaded")
            assert done["destinations"] == 2

            status, after = await post(s, numbered("RELOAD-AFTER"))
            assert status == 202, after
        await eventually(lambda: (second / f"{after['message_id']}.xml").exists(), "delivery to the new destination")
        assert not (inst.delivery_folder / f"{after['message_id']}.xml").exists()
        assert not (second / f"{first['message_id']}.xml").exists()
        message = await r.gw.store.reports.message(after["message_id"])
        assert message is not None and [d.destination for d in message.deliveries] == ["erp-two"]
        audit = await audit_of(r.gw.store, "config.reloaded")
        assert audit and audit[-1]["detail"]["destinations"] == ["erp-inbox", "erp-two"]


# --- (3) a new server certificate; a new partner CA -----------------------------------------------------


class RawConnection:
    """One keep-alive HTTP/1.1 connection over mutual TLS, written by hand so that it stays one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, r: Running) -> RawConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", r.gw.port, ssl=r.ssl())
        return cls(reader, writer)

    def peer_der(self) -> bytes:
        return self.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await asyncio.wait_for(self.reader.readline(), 30)
        assert status_line, "the server closed the keep-alive connection"
        status = int(status_line.split()[1])
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
            if name.strip().lower() == "connection":
                assert value.strip().lower() != "close"
        return status, json.loads(await self.reader.readexactly(length)) if length else {}

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            await self.writer.wait_closed()


def der_of(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)


async def new_connection_der(r: Running) -> bytes:
    conn = await RawConnection.open(r)
    try:
        assert (await conn.request("GET", f"/v1/invoices/{uuid.uuid4()}"))[0] == 404
        return conn.peer_der()
    finally:
        await conn.close()


async def test_new_server_certificate_for_new_connections_old_ones_keep_working(inst):
    old_der = der_of(inst.server.cert)
    async with serving_logged(inst) as (r, stream):
        kept = await RawConnection.open(r)
        try:
            assert kept.peer_der() == old_der
            assert (await kept.request("GET", f"/v1/invoices/{uuid.uuid4()}"))[0] == 404

            # The operator renews the certificate in place (same files), then reloads.
            renewed = devpki.issue(inst.ca, inst.root / "pki", "server", role="server", cn="localhost renewed",
                                   sans=("localhost", "127.0.0.1", "::1"))
            assert renewed == inst.server
            new_der = der_of(inst.server.cert)
            assert new_der != old_der
            assert await new_connection_der(r) == old_der  # nothing changes before the reload
            assert await r.gw.reload() is True

            assert await new_connection_der(r) == new_der
            ctx = r.ssl()
            loop = asyncio.get_running_loop()

            def handshake(name: str) -> tuple[bytes, dict]:  # a blocking client too, with and without SNI
                with socket.create_connection(("127.0.0.1", r.gw.port), timeout=10) as raw, \
                        ctx.wrap_socket(raw, server_hostname=name) as tls:
                    return tls.getpeercert(binary_form=True), tls.getpeercert()

            for name in ("127.0.0.1", "localhost"):
                der, info = await loop.run_in_executor(None, handshake, name)
                assert der == new_der, name
                assert ("commonName", "localhost renewed") in [rdn[0] for rdn in info["subject"]]
            # The connection opened before the reload still works, still with the certificate it began with.
            status, receipt = await kept.request("POST", "/v1/invoices", numbered("KEPT-ALIVE"))
            assert status == 202, receipt
            assert kept.peer_der() == old_der
        finally:
            await kept.close()
        assert log_events(stream, "config.reloaded")


async def test_new_partner_ca_takes_effect_on_reload(inst, tmp_path):
    """https.client_ca is part of the reloaded TLS context: a partner whose CA is added can connect."""
    ca2 = devpki.make_ca(tmp_path / "ca2", "ca2", cn="second partner CA")
    newco = devpki.issue(ca2, tmp_path / "ca2", "newco", role="client")
    register_partner(inst.partners, "newco", [newco.cert], FOREIGN_IDS, [], verified_by="test")
    clock = FakeClock()
    async with serving_logged(inst, clock) as (r, _stream):
        await clock.advance(r.gw.config.partners_reload_s)  # a tick of the partners file watch, without waiting for it
        assert r.gw.parts.partners.current.get("newco") is not None, "the partners file reload"
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            async with r.session(newco.cert, newco.key) as s:
                await post(s, FOREIGN)

        text = inst.config.read_text()
        assert 'client_ca = ["pki/ca.crt"]' in text
        inst.config.write_text(text.replace('client_ca = ["pki/ca.crt"]', f'client_ca = ["pki/ca.crt", "{ca2.cert}"]', 1))
        assert await r.gw.reload() is True
        async with r.session(newco.cert, newco.key) as s:
            status, reply = await post(s, FOREIGN)
        assert status == 202, reply
        async with r.session() as s:  # the first CA's partners still get in
            status, reply = await post(s, SAMPLE)
        assert status == 202, reply


# --- (5) a restart-only change -----------------------------------------------------------------------


async def test_restart_only_change_is_named(inst):
    async with serving_logged(inst) as (r, stream):
        port = r.gw.port
        text = inst.config.read_text()
        https, sep, rest = text.partition("[xml]")
        assert "listen_port = 0" in https
        inst.config.write_text(https.replace("listen_port = 0", "listen_port = 18443", 1) + sep + rest)
        assert await r.gw.reload() is True
        [warning] = log_events(stream, "config.restart_needed")
        assert warning["settings"] == ["https.listen_host/listen_port"]
        assert warning["level"] == "warning"
        assert r.gw.port == port  # still listening where it was
        async with r.session() as s:
            status, reply = await post(s, SAMPLE)
        assert status == 202, reply
        audit = await audit_of(r.gw.store, "config.reloaded")
        assert audit[-1]["detail"]["restart_needed"] == ["https.listen_host/listen_port"]



async def test_restart_needed_is_judged_against_the_running_values(inst):
    async with serving_logged(inst) as (r, stream):
        text = inst.config.read_text()
        https, sep, rest = text.partition("[xml]")
        inst.config.write_text(https.replace("listen_port = 0", "listen_port = 18443", 1) + sep + rest)
        assert await r.gw.reload() is True
        assert len(log_events(stream, "config.restart_needed")) == 1
        # Reloaded again, unchanged: the process still listens on the old port, so a restart is still needed.
        assert await r.gw.reload() is True
        assert len(log_events(stream, "config.restart_needed")) == 2
        # The file back as the process runs: nothing needs a restart any more.
        inst.config.write_text(text)
        assert await r.gw.reload() is True
        assert len(log_events(stream, "config.restart_needed")) == 2


# --- (4) SIGHUP under load, with two worker processes -----------------------------------------------------


LOAD = 100  # at least this many invoices; more while the reloads go on (at most MAX_LOAD)
MAX_LOAD = 1000  # a bound, in case the reloads never finish
HUPS = 3
STREAMS = 25


async def load_with_reloads(inst: instance.Instance, daemon: Daemon, ns: NotifySocket
                            ) -> tuple[dict[int, tuple[int, dict]], list[int], list[int]]:
    """Distinct invoices over STREAMS concurrent connections, from before the first SIGHUP until after the
    last reload finished (and at least LOAD of them); SIGHUP is sent HUPS times, each once the previous
    reload finished (READY=1 after its RELOADING=1).  Returns the replies by invoice, the invoices retried
    after a 503, and how many replies had arrived at each SIGHUP and at the last READY=1."""
    ctx = client_context(inst.ca.cert, inst.demo_client.cert, inst.demo_client.key)
    replies: dict[int, tuple[int, dict]] = {}
    retried: list[int] = []
    marks: list[int] = []
    counter = iter(range(MAX_LOAD))

    async with aiohttp.ClientSession(inst.https_url, connector=aiohttp.TCPConnector(ssl=ctx, limit=STREAMS),
                                     timeout=aiohttp.ClientTimeout(total=60)) as s:

        async def one(i: int) -> None:
            for _attempt in range(5):
                status, reply = await post(s, numbered(f"HUP-{i:04d}"))
                if status != 503:
                    break
                retried.append(i)
                await asyncio.sleep(0.2)
            replies[i] = (status, reply)

        async def hups() -> None:
            while len(replies) < 5:
                await asyncio.sleep(0.01)
            for _ in range(HUPS):
                mark = len(ns.since(0))
                marks.append(len(replies))
                daemon.proc.send_signal(signal.SIGHUP)
                reloading = await asyncio.to_thread(ns.wait_for, "RELOADING=1", mark, 30)
                await asyncio.to_thread(ns.wait_for, "READY=1", reloading + 1, 30)
            marks.append(len(replies))

        sender = asyncio.create_task(hups())

        async def stream() -> None:
            for i in counter:
                await one(i)
                if sender.done() and i >= LOAD:
                    return

        await asyncio.gather(*(stream() for _ in range(STREAMS)))
        await asyncio.wait_for(sender, 60)
    await asyncio.sleep(0.1)
    return replies, retried, marks


def check_replies(inst: instance.Instance, daemon: Daemon, replies: dict[int, tuple[int, dict]], marks: list[int]
                  ) -> set[str]:
    n = len(replies)
    assert n >= LOAD
    assert [s for s, _ in replies.values()] == [202] * n, [r for s, r in replies.values() if s != 202][:3]
    assert 0 < marks[0] and marks[-1] < n, f"the reloads did not happen during the load: {marks} of {n} answers"
    ids = {r["message_id"] for _, r in replies.values()}
    assert len(ids) == n and not any(r["duplicate"] for _, r in replies.values())
    assert len(daemon.wait_event("config.reloaded", 2 * HUPS, timeout=10)) == 2 * HUPS
    assert daemon.named("config.reload_failed") == []
    deadline = time.monotonic() + 30  # worker 0 delivers what both accepted
    while len(list(inst.delivery_folder.glob("*.xml"))) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    assert {p.stem for p in inst.delivery_folder.glob("*.xml")} == ids
    return ids


@pytest.mark.slow
def test_sighup_under_load_loses_nothing(tmp_path):
    inst = make_instance(tmp_path, 2)
    with NotifySocket.open() as ns:
        daemon = Daemon(inst, {"NOTIFY_SOCKET": ns.address})
        try:
            ns.wait_for("READY=1", proc=daemon.proc)
            replies, retried, marks = asyncio.run(load_with_reloads(inst, daemon, ns))
            ids = check_replies(inst, daemon, replies, marks)
            assert daemon.terminate() == 0, "".join(daemon.stderr)[-2000:]
        finally:
            daemon.kill()
    with contextlib.closing(sqlite3.connect(inst.state_dir / "gateway.db")) as db:
        stored = {row[0] for row in db.execute("SELECT message_id FROM invoices")}
        states = dict(db.execute("SELECT state, count(*) FROM deliveries GROUP BY state").fetchall())
    assert stored == ids
    assert states == {"delivered": len(ids)}
    print(f"{len(ids)} invoices, reloads at answers {marks}, {len(retried)} retried after 503")


@pytest.mark.slow
def test_a_sighup_during_a_reload_is_not_lost(tmp_path):
    inst = make_instance(tmp_path, 2)
    with NotifySocket.open() as ns:
        daemon = Daemon(inst, {"NOTIFY_SOCKET": ns.address})
        try:
            ns.wait_for("READY=1", proc=daemon.proc)
            # A change of the rules settings makes each worker build a new rule engine: a reload of a second or so.
            inst.config.write_text(inst.config.read_text().replace("[rules]\n", "[rules]\ntimeout_s = 61.0\n", 1))
            mark = len(ns.since(0))
            daemon.proc.send_signal(signal.SIGHUP)
            first = ns.wait_for("RELOADING=1", after=mark, timeout=15)
            daemon.proc.send_signal(signal.SIGHUP)  # the operator's next `systemctl reload`, a moment later
            ready = ns.wait_for("READY=1", after=first + 1, timeout=30)
            deadline = time.monotonic() + 3  # a second reload would begin within a poll interval (0.2 s)
            while not any("RELOADING=1" in m for m in ns.since(ready)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert any("RELOADING=1" in m for m in ns.since(ready)), "the second SIGHUP was dropped"
            assert len(daemon.wait_event("config.reloaded", 4, timeout=15)) == 4
        finally:
            daemon.kill()


# --- (6) the partners file, re-read while serving -----------------------------------------------------


async def test_added_partner_takes_effect_without_restart(gateway, client):
    newco = gateway.issue_client("newco")
    status, reply = await post(client(newco.cert, newco.key), FOREIGN)
    assert (status, reply["error"]) == (403, "PARTNER_UNKNOWN")

    argv = ["partners", "add", "newco", "--client-cert", str(newco.cert), "-c", str(gateway.inst.config)]
    for pid in FOREIGN_IDS:
        argv += ["--party-id", pid]
    assert await run_cli(*argv) == 0

    book = gateway.gw.parts.partners
    await eventually(lambda: book.current.get("newco") is not None, "the running gateway to pick up the new partner", 3.0)

    status, reply = await post(client(newco.cert, newco.key), FOREIGN)
    assert status == 202, reply
    status, _ = await post(client(), SAMPLE)  # the demo partner is still there
    assert status == 202


async def test_invalid_partners_file_keeps_old_directory(gateway, client, log_stream):
    book = gateway.gw.parts.partners
    before = book.current
    broken = b"[[partners]]\nname = 'broken'\n"  # lacks every required key
    await asyncio.to_thread(atomic_write, gateway.inst.partners, broken)

    await eventually(lambda: "partners.reload_failed" in log_stream.getvalue(), "partners.reload_failed in the log", 3.0)
    assert book.current is before
    status, reply = await post(client(), SAMPLE)
    assert status == 202, reply

