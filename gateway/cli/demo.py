"""`einvoice-gateway demo`: a throwaway instance that shows the whole path in a few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import sys
import tempfile
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
from cryptography import x509

from .. import logs
from ..app.gateway import Gateway
from ..config import load as config_mod
from ..operations import instance
from ..smime.compose import compose
from ..smime.identity import Identity
from ..tls import client_context, load_private_key

SAMPLE = files("gateway").joinpath("samples/invoice.xml").read_bytes()


def _replace(doc: bytes, old: bytes, new: bytes) -> bytes:
    if old not in doc:
        raise AssertionError(f"sample invoice lacks {old!r}")
    return doc.replace(old, new)


def samples() -> list[tuple[str, bytes]]:
    """The valid sample, a schema-invalid variant, and one whose supplier is someone else."""
    invalid = _replace(_replace(SAMPLE, b"<cbc:IssueDate>2026-11-02<", b"<cbc:IssueDate>2 Nov 2026<"),
                       b"DEMO-2026-0001</cbc:ID>", b"DEMO-2026-0002</cbc:ID>")
    foreign = SAMPLE
    for old, new in ((b"4000001000006", b"4000009000001"), (b"DE123456789", b"FR12345678901"),
                     (b"DEMO-2026-0001</cbc:ID>", b"DEMO-2026-0003</cbc:ID>")):
        foreign = _replace(foreign, old, new)
    return [("valid invoice", SAMPLE), ("schema-invalid invoice", invalid), ("invoice from another supplier", foreign)]


def _free_port(host: str, preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free port")


async def _send(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, dict[str, Any]]:
    async with session.post(f"{url}/v1/invoices", data=body, headers={"Content-Type": "application/xml"}) as resp:
        return resp.status, await resp.json()


async def _wait_delivered(session: aiohttp.ClientSession, url: str, message_id: str) -> dict[str, Any]:
    status: dict[str, Any] = {}
    for _ in range(50):
        async with session.get(f"{url}/v1/invoices/{message_id}") as resp:
            status = await resp.json()
        if status.get("status") == "delivered":
            break
        await asyncio.sleep(0.1)
    return status


async def _mail(inst: instance.Instance, port: int, body: bytes) -> str:
    """Send ``body`` as the demo partner would by e-mail: signed with its S/MIME key, encrypted to the gateway's."""
    sender = Identity(x509.load_pem_x509_certificate(inst.demo_smime.cert.read_bytes()),
                            load_private_key(inst.demo_smime.key.read_bytes()), instance.DEMO_EMAIL)
    gateway_cert = x509.load_pem_x509_certificate(inst.smime.cert.read_bytes())
    to = f"invoices@{instance.MAIL_HOST}"
    message = compose([(body, "application/xml", "invoice.xml")], "Invoice attached.", identity=sender, to=to,
                            subject="Invoice DEMO-2026-0004", recipient=gateway_cert)
    try:
        _, reply = await aiosmtplib.send(message, sender=instance.DEMO_EMAIL, recipients=[to], hostname="127.0.0.1",
                                         port=port, start_tls=True, tls_context=client_context(inst.ca.cert), timeout=30)
    except aiosmtplib.SMTPResponseException as exc:
        return f"REJECTED ({exc.code} {exc.message})"
    return f"ACCEPTED (250 {reply})"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # SIGHUP: the terminal was closed


async def run(folder: Path | None, wait: bool, port: int) -> int:
    """The demo; Ctrl-C, SIGTERM or SIGHUP, at any point, stops it and removes a throwaway instance."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    caught: list[int] = []

    def on_signal(signum: int) -> None:
        if not caught:  # a second signal must not interrupt the cleanup the first one started
            main.cancel()
        caught.append(signum)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    root = folder or Path(tempfile.mkdtemp(prefix="einvoice-gateway-demo-"))
    try:
        if folder is None:
            root.rmdir()
        await _show(root, wait, port)
    except asyncio.CancelledError:
        if not caught:
            raise
        main.uncancel()
    finally:
        try:
            if folder is None:
                instance.remove(root)  # its keys with it: nothing of a throwaway instance outlives the demo
                with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
                    print(f"\nStopped; removed {root}.")
        finally:  # only now: a signal during the cleanup must not cut it short
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)
    return 0


async def _show(root: Path, wait: bool, port: int) -> None:
    inst = instance.init(root, port=_free_port("127.0.0.1", port))
    log_file = inst.root / "gateway.log"
    with log_file.open("a", encoding="utf-8") as log_stream:
        logs.configure("info", log_stream)
        print(f"Demo instance (development PKI, throwaway): {inst.root}")
        gw = Gateway(config_mod.load(inst.config))
        try:
            await gw.start()
            await _tour(inst, gw, log_file)
            if wait:
                print("\nServing until Ctrl-C.", flush=True)
                await asyncio.Event().wait()  # until a signal cancels this task
        finally:
            await gw.stop()


async def _tour(inst: instance.Instance, gw: Gateway, log_file: Path) -> None:
    url = f"https://127.0.0.1:{gw.port}"
    print(f"Gateway listening on {url} (mutual TLS); JSON logs go to {log_file}\n")
    ctx = client_context(inst.ca.cert, inst.demo_client.cert, inst.demo_client.key)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
        for label, body in samples():
            status, reply = await _send(session, url, body)
            if status == 202:
                done = await _wait_delivered(session, url, reply["message_id"])
                where = inst.delivery_folder / f"{reply['message_id']}.xml"
                print(f"- {label}: ACCEPTED ({status}) message_id={reply['message_id']}")
                print(f"    status {done.get('status')}; delivered to {where}")
            else:
                print(f"- {label}: REJECTED ({status} {reply['error']}) {reply['message']}")
                for d in reply.get("details", [])[:3]:
                    at = f"line {d['line']}: " if "line" in d else ""
                    print(f"    {at}{d['message']}")
    if gw.smtp_port:
        by_mail = SAMPLE.replace(b"DEMO-2026-0001</cbc:ID>", b"DEMO-2026-0004</cbc:ID>")
        print(f"- invoice by S/MIME e-mail (signed, then encrypted; SMTP with STARTTLS on port {gw.smtp_port}): "
              f"{await _mail(inst, gw.smtp_port, by_mail)}")
    sample_path = inst.root / "sample-invoice.xml"
    sample_path.write_bytes(SAMPLE.replace(b"DEMO-2026-0001</cbc:ID>", b"DEMO-2026-0100</cbc:ID>"))
    if gw.admin_port and gw.console is not None:
        print(f"\nAdmin console: http://localhost:{gw.admin_port}/console/ — user admin; its initial password is "
              f"written to {gw.console.bootstrap_file} at the first visit")
    print("\nTry it by hand:")
    print(f"  curl --cacert {inst.ca.cert} --cert {inst.demo_client.cert} --key {inst.demo_client.key} \\\n"
          f"       -H 'Content-Type: application/xml' --data-binary @{sample_path} {url}/v1/invoices")


def main(folder: str | None, wait: bool, port: int) -> int:
    try:
        return asyncio.run(run(Path(folder) if folder else None, wait, port))
    except KeyboardInterrupt:  # Ctrl-C before run() took the signals over: nothing made yet
        return 0
    except (OSError, ssl.SSLError, aiohttp.ClientError, aiosmtplib.SMTPException) as exc:
        print(f"einvoice-gateway: failed: demo: {exc}", file=sys.stderr)
        return 1
