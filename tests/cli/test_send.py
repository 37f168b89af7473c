"""gateway/cli/send.py: ``einvoice-gateway send FILE``, an ERP's submission from the command line.

A real gateway (``init``, configured to send with tests/helpers/outbound.py: partner ``buyer-b``, whose
endpoint is a closed port, so that what is sent stays pending) serves its ``[outbound]`` listener on
127.0.0.1 — over TCP with mutual TLS (an ERP certificate from the instance's development CA, its key in
``outbound.client_spki``, the port fixed in the configuration) or on a Unix socket — in this process;
the command runs on a thread beside it, as another process would.  Accepted: exit 0 with the receipt,
and the message is listed by ``messages list --direction out``; refused by the gateway: exit 2 with
the code on stderr and the details on stdout; no gateway, no answer in time, an untrusted server: exit 1
saying what to check.
"""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway import devpki
from gateway.cli.demo import SAMPLE, samples
from gateway.operations import instance
from gateway.operations.instance import Instance
from gateway.tls import inspect_certificate
from tests.helpers import FOREIGN, Running, free_port, run_command, run_command_aside, serving
from tests.helpers.messages import SELLER
from tests.helpers.outbound import a_client_cert, closed_port, make_sender

INVALID = dict(samples())["schema-invalid invoice"]


@dataclass
class Sending:
    inst: Instance
    running: Running
    erp: devpki.Issued  # the ERP's client certificate (TCP)
    invoice: Path  # the sample, as a file
    port: int  # the TCP listener's (0 on the socket)

    @property
    def config(self) -> str:
        return str(self.inst.config)

    def file(self, name: str, body: bytes) -> str:
        path = self.inst.root / name
        path.write_bytes(body)
        return str(path)


async def sending(tmp_path: Path, transport: str) -> AsyncIterator[Sending]:
    inst = instance.init(tmp_path / "gw", port=0)
    erp = devpki.issue(inst.ca, inst.root / "pki", "erp", role="client", cn="ERP")
    port = free_port() if transport == "tcp" else 0
    spki = inspect_certificate(erp.cert, "erp").spki_sha256

    def tcp(c: dict[str, Any]) -> None:
        if transport == "tcp":
            c["outbound"].update(listen_port=port, client_spki=[spki])

    make_sender(inst, a_client_cert(inst), endpoint=f"https://127.0.0.1:{closed_port()}/v1/invoices", ca=inst.ca.cert,
                transport=transport, tweak=tcp)
    invoice = inst.root / "invoice.xml"
    invoice.write_bytes(SAMPLE)
    async with serving(inst, "warning", io.StringIO()) as running:  # its log kept off the command's stdout
        yield Sending(inst, running, erp, invoice, port)


@pytest.fixture
async def tcp(tmp_path: Path) -> AsyncIterator[Sending]:
    async for s in sending(tmp_path, "tcp"):
        yield s


@pytest.fixture
async def unix(tmp_path: Path) -> AsyncIterator[Sending]:
    async for s in sending(tmp_path, "unix"):
        yield s


def record_of(out: str) -> dict[str, str]:
    """The ``label: value`` lines a command printed (up to the first blank line)."""
    lines = out.split("\n\n")[0].splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


async def listed_out(capsys: pytest.CaptureFixture[str], s: Sending) -> list[dict[str, Any]]:
    code, out, err = await run_command_aside(capsys, "messages", "list", "--direction", "out", "--json", "-c", s.config)
    assert code == 0, err
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


# --- accepted ------------------------------------------------------------------------------------------


async def test_sent_over_mutual_tls_is_accepted_and_listed_as_outbound(tcp: Sending, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run_command_aside(capsys, "send", str(tcp.invoice), "--cert", str(tcp.erp.cert),
                                             "--key", str(tcp.erp.key), "-c", tcp.config)  # the dev CA by default
    assert (code, err) == (0, ""), err
    receipt = record_of(out)
    assert (receipt["status"], receipt["duplicate"], receipt["recipient"]) == ("accepted", "no", "buyer-b"), out
    assert receipt["endpoint"].startswith("https://127.0.0.1:") and receipt["endpoint"].endswith("/v1/invoices")
    assert f"messages show {receipt['message id']}" in out
    [row] = await listed_out(capsys, tcp)
    assert (row["message_id"], row["direction"], row["partner"]) == (receipt["message id"], "out", "buyer-b")


async def test_sent_on_the_socket_with_json_and_again_is_the_same_message(unix: Sending,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run_command_aside(capsys, "send", str(unix.invoice), "--json", "-c", unix.config)
    assert code == 0, err
    first = json.loads(out)
    assert (first["status"], first["partner"], first["duplicate"]) == ("accepted", "buyer-b", False), first
    code, out, err = await run_command_aside(capsys, "send", str(unix.invoice), "-c", unix.config)
    assert code == 0, err
    again = record_of(out)
    assert (again["message id"], again["duplicate"]) == (first["message_id"], "yes"), out
    assert [r["message_id"] for r in await listed_out(capsys, unix)] == [first["message_id"]]


async def test_the_socket_is_named_with_url(unix: Sending, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run_command_aside(capsys, "send", str(unix.invoice), "--url",
                                             f"unix:{unix.inst.root / 'outbound.sock'}", "--json", "-c", unix.config)
    assert code == 0 and json.loads(out)["partner"] == "buyer-b", err


# --- refused by the gateway ---------------------------------------------------------------------------------


async def test_refusal_is_exit_2_with_its_code_and_details(unix: Sending, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run_command_aside(capsys, "send", unix.file("foreign.xml", FOREIGN), "-c", unix.config)
    assert code == 2
    assert err.startswith("einvoice-gateway: refused: SELLER_NOT_THIS_BUSINESS (HTTP 403): "), err
    assert err.count("\n") == 1  # one line; the details are results, on stdout
    assert "0088:4000009000001" in out and SELLER in out, out
    code, out, err = await run_command_aside(capsys, "send", unix.file("invalid.xml", INVALID), "-c", unix.config)
    assert code == 2 and "refused: SCHEMA_INVALID (HTTP 422)" in err, err
    assert any(line.startswith("line ") for line in out.splitlines()), out  # where in the file
    assert await listed_out(capsys, unix) == []


async def test_refusal_with_json_prints_the_gateways_error(unix: Sending, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = await run_command_aside(capsys, "send", unix.file("foreign.xml", FOREIGN), "--json", "-c", unix.config)
    assert code == 2 and "refused: SELLER_NOT_THIS_BUSINESS" in err
    reply = json.loads(out)
    assert reply["error"] == "SELLER_NOT_THIS_BUSINESS" and reply["message"] and reply["details"], reply


async def test_a_certificate_not_listed_is_refused(tcp: Sending, capsys: pytest.CaptureFixture[str]) -> None:
    other = devpki.issue(tcp.inst.ca, tcp.inst.root / "pki", "other", role="client", cn="not the ERP")
    code, _, err = await run_command_aside(capsys, "send", str(tcp.invoice), "--cert", str(other.cert), "--key",
                                           str(other.key), "-c", tcp.config)
    assert code == 2 and "refused: SUBMITTER_UNKNOWN (HTTP 403)" in err and "outbound.client_spki" in err, err


async def test_a_certificate_of_another_ca_is_turned_away_in_the_handshake(tcp: Sending, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    stranger_ca = devpki.make_ca(tmp_path / "other", "ca")
    stranger = devpki.issue(stranger_ca, tmp_path / "other", "erp", role="client")
    code, _, err = await run_command_aside(capsys, "send", str(tcp.invoice), "--cert", str(stranger.cert), "--key",
                                           str(stranger.key), "-c", tcp.config)
    assert code == 1 and "failed: " in err and "outbound.client_ca" in err and "check --cert" in err, err
    assert await listed_out(capsys, tcp) == []


async def test_an_untrusted_gateway_certificate_is_failed(tcp: Sending, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    stranger = devpki.make_ca(tmp_path / "other", "ca")
    code, _, err = await run_command_aside(capsys, "send", str(tcp.invoice), "--cert", str(tcp.erp.cert), "--key",
                                           str(tcp.erp.key), "--cacert", str(stranger.cert), "-c", tcp.config)
    assert code == 1 and "failed:" in err and "not trusted" in err and "--cacert" in err, err
    assert await listed_out(capsys, tcp) == []


# --- no gateway, no answer -----------------------------------------------------------------------------------


@pytest.fixture
def stopped(tmp_path: Path) -> Instance:
    """An instance configured to send on a fixed TCP port and on no socket, not running."""
    inst = instance.init(tmp_path / "gw", port=0)
    erp = devpki.issue(inst.ca, inst.root / "pki", "erp", role="client")
    make_sender(inst, a_client_cert(inst), endpoint="https://b.example/v1/invoices", ca=inst.ca.cert, transport="tcp",
                tweak=lambda c: c["outbound"].update(listen_port=free_port(),
                                                     client_spki=[inspect_certificate(erp.cert, "erp").spki_sha256]))
    (inst.root / "invoice.xml").write_bytes(SAMPLE)
    return inst


def test_no_gateway_on_tcp_says_what_to_check(stopped: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_command(capsys, "send", str(stopped.root / "invoice.xml"), "--cert",
                                 str(stopped.root / "pki" / "erp.crt"), "--key", str(stopped.root / "pki" / "erp.key"),
                                 "-c", str(stopped.config))
    assert (code, out) == (1, "")
    assert err.startswith("einvoice-gateway: failed: nothing listens at https://127.0.0.1:"), err
    assert "is the gateway running" in err and "outbound.listen_host" in err


def test_no_gateway_on_the_socket_says_what_to_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inst = instance.init(tmp_path / "gw", port=0)
    make_sender(inst, a_client_cert(inst), endpoint="https://b.example/v1/invoices", ca=inst.ca.cert)
    (inst.root / "invoice.xml").write_bytes(SAMPLE)
    code, _, err = run_command(capsys, "send", str(inst.root / "invoice.xml"), "-c", str(inst.config))
    assert code == 1
    assert f"failed: no socket at {inst.root / 'outbound.sock'}: is the gateway running" in err, err


def test_no_answer_in_time_is_failed_within_the_timeout(stopped: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    """A socket that takes connections (its backlog) and never answers."""
    path = stopped.root / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen(8)
        start = time.monotonic()
        code, _, err = run_command(capsys, "send", str(stopped.root / "invoice.xml"), "--url", f"unix:{path}",
                                   "--timeout", "0.5", "-c", str(stopped.config))
        took = time.monotonic() - start
    assert code == 1 and f"no answer from unix:{path} within 0.5 s" in err and "sending the same file again is safe" in err
    assert took < 5, took


async def test_something_else_listening_is_not_taken_for_the_gateway(stopped: Instance,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    async def page(request: web.Request) -> web.Response:
        return web.Response(status=404, text="<html>not here</html>", content_type="text/html")

    app = web.Application()
    app.router.add_post("/v1/outbound", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    path = stopped.root / "other.sock"
    await web.UnixSite(runner, str(path)).start()
    try:
        code, _, err = await run_command_aside(capsys, "send", str(stopped.root / "invoice.xml"), "--url", f"unix:{path}",
                                               "-c", str(stopped.config))
    finally:
        await runner.cleanup()
    assert code == 1 and "answered HTTP 404 (text/html), not the gateway's JSON" in err, err


# --- asked wrongly --------------------------------------------------------------------------------------------


def test_tcp_needs_the_erp_certificate(stopped: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_command(capsys, "send", str(stopped.root / "invoice.xml"), "-c", str(stopped.config))
    assert code == 2 and "usage error: --cert, --key: the outbound listener at https://127.0.0.1:" in err, err
    code, _, err = run_command(capsys, "send", str(stopped.root / "invoice.xml"), "--cert", "x.pem", "-c",
                               str(stopped.config))
    assert code == 2 and "usage error: --cert and --key go together" in err, err


@pytest.mark.parametrize("url", ["http://127.0.0.1:8444", "https://127.0.0.1", "127.0.0.1:8444", "unix:"])
def test_a_url_that_is_not_a_listener_is_a_usage_error(stopped: Instance, url: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_command(capsys, "send", str(stopped.root / "invoice.xml"), "--url", url, "-c", str(stopped.config))
    assert code == 2 and "usage error: --url: " in err, err


def test_certificates_on_the_socket_are_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inst = instance.init(tmp_path / "gw", port=0)
    make_sender(inst, a_client_cert(inst), endpoint="https://b.example/v1/invoices", ca=inst.ca.cert)
    code, _, err = run_command(capsys, "send", str(inst.config), "--cacert", str(inst.ca.cert), "-c", str(inst.config))
    assert code == 2 and "usage error: --cacert: the outbound listener is the Unix socket" in err, err


def test_an_instance_that_does_not_send_is_a_configuration_error(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_command(capsys, "send", str(inst.config), "-c", str(inst.config))
    assert code == 2 and "configuration error: outbound: " in err and "no [outbound] table" in err, err


@pytest.mark.parametrize("content,said", [(None, "No such file"), (b"", "the file is empty")], ids=["missing", "empty"])
def test_a_file_that_cannot_be_sent_is_a_usage_error(stopped: Instance, content: bytes | None, said: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = stopped.root / "nothing.xml"
    if content is not None:
        path.write_bytes(content)
    code, _, err = run_command(capsys, "send", str(path), "-c", str(stopped.config))
    assert code == 2 and f"usage error: {path}: {said}" in err, err


@pytest.mark.parametrize("value", ["0", "-1", "soon", "3601"])
def test_the_timeout_is_bounded(stopped: Instance, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run_command(capsys, "send", "x.xml", "--timeout", value, "-c", str(stopped.config))
    assert exc.value.code == 2
    assert "above 0 and at most 3600" in capsys.readouterr().err
