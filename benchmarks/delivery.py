"""Does delivery keep up with intake?  End-to-end throughput and accepted-to-delivered latency.

Starts `einvoice-gateway serve` on a fresh instance whose only destination is an `https` ERP
endpoint on this machine (benchmarks/erpstub.py, run in this process: it verifies every HMAC
signature and books each idempotency key once), drives N distinct ~20 KB invoices over mutual TLS
at a fixed concurrency, and waits until the ERP has booked every one.  Reports:

    intake       N / (last 202 − first request)
    end-to-end   N / (last booking at the ERP − first request)        goal: >= 80 % of intake
    latency      booking at the ERP − 202 at the client, per invoice   goal: p99 < 1 s

    python benchmarks/delivery.py --count 3000 --concurrency 16
    python benchmarks/delivery.py --count 3000 --concurrency 16 --no-rules   # intake 5x faster: a harder test

Only 127.0.0.1 is used; the run is bounded by --count and a time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from erpstub import ErpStub  # noqa: E402
from throughput import free_port, make_invoice, no_rules, wait_port  # noqa: E402

from gateway.operations import instance
from gateway.partners.edit import edit_partners
from gateway.tls import client_context

TIME_LIMIT_S = 600


def configure(inst: instance.Instance, stub: ErpStub, key_file: Path, workers: int, concurrency: int) -> None:
    text = inst.config.read_text().replace("workers = 0", f"workers = {workers}", 1)
    start = text.index("[[destinations]]")
    end = text.index("# \"https\": POST each invoice")
    text = text[:start] + (
        f'[[destinations]]\nname = "erp"\ntype = "https"\nurl = "{stub.url}"\nca = "{stub.ca_cert}"\n'
        f'hmac_key_file = "{key_file}"\nconcurrency = {concurrency}\n\n') + text[end:]
    inst.config.write_text(text)


async def drive(url: str, ctx: object, docs: list[bytes], concurrency: int) -> dict[str, float]:
    """Send every document; returns message id → when its 202 arrived (time.time())."""
    acked: dict[str, float] = {}
    queue = iter(docs)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=concurrency)) as session:  # type: ignore[arg-type]
        async def worker() -> None:
            for body in queue:
                async with session.post(f"{url}/v1/invoices", data=body, headers={"Content-Type": "application/xml"}) as r:
                    reply = await r.json()
                    if r.status != 202:
                        raise SystemExit(f"not accepted: {r.status} {reply}")
                    acked[reply["message_id"]] = time.time()

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(concurrency))), TIME_LIMIT_S)
    return acked


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--size", type=int, default=20_000, help="approximate invoice size in bytes")
    ap.add_argument("--no-rules", action="store_true", help="register the partner with no business rules")
    ap.add_argument("--workers", type=int, default=0, help="https.workers (0: one per core)")
    ap.add_argument("--destination-concurrency", type=int, default=16, help="deliveries in flight to the ERP")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="egw-bench-") as tmp:
        port = free_port()
        inst = instance.init(Path(tmp) / "gw", port=port)
        key_file = Path(tmp) / "erp.hmac"
        key_file.write_bytes(os.urandom(32).hex().encode())
        key_file.chmod(0o600)
        stub = ErpStub(key_file.read_bytes(), Path(tmp) / "erp")
        await stub.start()
        configure(inst, stub, key_file, args.workers, args.destination_concurrency)
        if args.no_rules:
            edit_partners(inst.partners, instance.DEMO_PARTNER, no_rules)
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(inst.config)],
                                env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL)
        try:
            await wait_port(port, proc)
            ctx = client_context(inst.ca.cert, inst.demo_client.cert, inst.demo_client.key)
            url = f"https://127.0.0.1:{port}"
            docs = [make_invoice(i, args.size) for i in range(args.warmup + args.count)]
            warm = await drive(url, ctx, docs[: args.warmup], args.concurrency)
            await wait_booked(stub, set(warm))
            t0 = time.time()
            acked = await drive(url, ctx, docs[args.warmup:], args.concurrency)
            intake_end = max(acked.values())
            await wait_booked(stub, set(acked))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            await stub.stop()
    booked = {mid: post.ts for mid, post in ((p.message_id, p) for p in stub.ledger.bookings.values()) if mid in acked}
    delivered_end = max(booked.values())
    lat = sorted(max(0.0, booked[m] - acked[m]) for m in acked)
    q = statistics.quantiles(lat, n=100)
    intake = args.count / (intake_end - t0)
    e2e = args.count / (delivered_end - t0)
    print(f"invoices: {args.count} x {len(docs[-1])} bytes, rules {'off' if args.no_rules else 'on (en16931)'}, "
          f"workers {args.workers or os.cpu_count()}, client concurrency {args.concurrency}, "
          f"ERP concurrency {args.destination_concurrency}, cores {os.cpu_count()}")
    print(f"intake: {intake:.0f} invoices/s; end-to-end (accepted to booked at the ERP): {e2e:.0f} invoices/s "
          f"= {100 * e2e / intake:.0f}% of intake")
    print(f"accepted-to-delivered latency: p50 {q[49] * 1000:.0f} ms, p99 {q[98] * 1000:.0f} ms, "
          f"max {lat[-1] * 1000:.0f} ms")
    print(f"ERP: {len(stub.ledger.posts)} requests, {stub.ledger.dup_attempts} repeated keys, "
          f"refused {dict(stub.ledger.refused) or 0}")


async def wait_booked(stub: ErpStub, ids: set[str]) -> None:
    deadline = time.monotonic() + TIME_LIMIT_S
    while not ids <= set(stub.ledger.booked_message_ids()):
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(ids - set(stub.ledger.booked_message_ids()))} invoices never reached the ERP")
        await asyncio.sleep(0.05)


if __name__ == "__main__":
    asyncio.run(main())
