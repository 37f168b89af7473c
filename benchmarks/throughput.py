"""Throughput and latency of the real daemon over mutual TLS.

Starts `einvoice-gateway serve` on a fresh instance (as its own process), then drives N
distinct ~20 KB UBL invoices at a fixed concurrency over keep-alive mTLS connections from this
process, and prints invoices/s, p50/p99 latency, server CPU ms per invoice and peak RSS.

    python benchmarks/throughput.py --count 5000 --concurrency 16
    python benchmarks/throughput.py --count 5000 --concurrency 16 --signed rsa3072

With --signed, every invoice carries an enveloped XAdES-BES signature (made before the timed run)
by a certificate registered for the partner, whose signature policy is then `required`.

Only 127.0.0.1 is used; the run is bounded by --count and a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lxml import etree  # noqa: E402

from gateway import devpki
from gateway.cli.demo import SAMPLE
from gateway.model import SignaturePolicy
from gateway.operations import instance
from gateway.partners.edit import edit_partners
from gateway.stages import signature
from gateway.tls import client_context

TIME_LIMIT_S = 600
CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_invoice(n: int, target_bytes: int) -> bytes:
    """The sample invoice with a unique number, padded with copies of its first line to about
    target_bytes, its totals adjusted so that it stays EN 16931-valid (the rules are on)."""
    doc = SAMPLE.replace(b"DEMO-2026-0001</cbc:ID>", f"BENCH-{n:08d}</cbc:ID>".encode(), 1)
    line = re.search(rb"  <cac:InvoiceLine>.*?</cac:InvoiceLine>\n", doc, re.S)
    assert line is not None
    extra, i = [], 3
    while len(doc) + sum(map(len, extra)) < target_bytes:
        extra.append(line.group(0).replace(b"<cbc:ID>1</cbc:ID>", f"<cbc:ID>{i}</cbc:ID>".encode(), 1))
        i += 1
    total = f">{1250 + 1000 * len(extra)}.00<".encode()  # the sample: lines of 1000.00 and 250.00, no VAT
    return doc.replace(b">1250.00<", total).replace(b"</Invoice>", b"".join(extra) + b"</Invoice>")


def sign(doc: bytes, signer: signature.SigningKey) -> bytes:
    root = etree.fromstring(doc)
    signature.sign(root, signer)
    return bytes(etree.tostring(root.getroottree(), xml_declaration=True, encoding="UTF-8"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree_pids(pid: int) -> list[int]:
    out = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out.extend(tree_pids(int(child)))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return total


def peak_rss_mib(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        out.append(int(m.group(1)) / 1024 if m else 0.0)
    return out


async def wait_port(port: int, proc: subprocess.Popen[bytes], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited with {proc.returncode}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise SystemExit("gateway did not start listening")


async def drive(url: str, ctx, docs: list[bytes], concurrency: int) -> list[float]:
    latencies: list[float] = []
    queue = iter(docs)
    failures = 0
    conn = aiohttp.TCPConnector(ssl=ctx, limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def worker() -> None:
            nonlocal failures
            for body in queue:
                t0 = time.perf_counter()
                async with session.post(f"{url}/v1/invoices", data=body, headers={"Content-Type": "application/xml"}) as r:
                    await r.read()
                    if r.status != 202:
                        failures += 1
                latencies.append(time.perf_counter() - t0)

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), TIME_LIMIT_S)
    if failures:
        raise SystemExit(f"{failures} requests were not accepted")
    return latencies


def no_rules(partners, store):  # type: ignore[no-untyped-def]
    partners[0] = dataclasses.replace(partners[0], rules=())


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=5000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--size", type=int, default=20_000, help="approximate invoice size in bytes")
    ap.add_argument("--signed", choices=("ec", "rsa3072"), help="sign every invoice with a key of this kind")
    ap.add_argument("--no-rules", action="store_true", help="register the partner with no business rules")
    ap.add_argument("--workers", type=int, default=0, help="https.workers (0: one per core)")
    ap.add_argument("--rules-processes", type=int, default=2, help="rules.processes (per worker)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="egw-bench-") as tmp:
        port = free_port()
        inst = instance.init(Path(tmp) / "gw", port=port)
        signer = None
        if args.signed:
            issued = devpki.issue(inst.ca, Path(tmp), "partner-signing", role="signing", key_kind=args.signed)
            signer = signature.SigningKey.load(issued.cert.read_bytes(), issued.key.read_bytes())

            def require(partners, store):  # type: ignore[no-untyped-def]
                p = partners[0]
                partners[0] = dataclasses.replace(p, signing_certs=(store(issued.cert, "--signing-cert"),),
                                                  signature_policy=SignaturePolicy.REQUIRED)

            edit_partners(inst.partners, instance.DEMO_PARTNER, require)
        text = inst.config.read_text().replace("workers = 0", f"workers = {args.workers}", 1)
        inst.config.write_text(text.replace("[rules]\n", f"[rules]\nprocesses = {args.rules_processes}\n", 1))
        if args.no_rules:
            edit_partners(inst.partners, instance.DEMO_PARTNER, no_rules)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(inst.config)], env=env,
                                stdout=subprocess.DEVNULL)
        try:
            await wait_port(port, proc)
            ctx = client_context(inst.ca.cert, inst.demo_client.cert, inst.demo_client.key)
            url = f"https://127.0.0.1:{port}"
            docs = [make_invoice(i, args.size) for i in range(args.warmup + args.count)]
            if signer is not None:
                docs = [sign(d, signer) for d in docs]
            await drive(url, ctx, docs[: args.warmup], args.concurrency)
            pids = tree_pids(proc.pid)
            cpu0, t0 = cpu_seconds(pids), time.perf_counter()
            lat = await drive(url, ctx, docs[args.warmup:], args.concurrency)
            wall, cpu = time.perf_counter() - t0, cpu_seconds(pids) - cpu0
            rss = peak_rss_mib(pids)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    lat.sort()
    q = statistics.quantiles(lat, n=100)
    print(f"invoices: {args.count} x {len(docs[-1])} bytes{', signed ' + args.signed if args.signed else ''}, "
          f"rules {'off' if args.no_rules else 'on (en16931)'}, workers {args.workers or os.cpu_count()} "
          f"x {args.rules_processes} rules process(es), "
          f"concurrency {args.concurrency}, "
          f"cores {os.cpu_count()}")
    print(f"throughput: {args.count / wall:.0f} invoices/s")
    print(f"latency: p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms")
    print(f"server CPU: {cpu * 1000 / args.count:.2f} ms per invoice")
    print(f"peak RSS: {' + '.join(f'{r:.0f}' for r in rss)} MiB")


if __name__ == "__main__":
    asyncio.run(main())
