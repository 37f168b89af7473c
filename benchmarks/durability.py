"""How to make an acknowledged invoice durable: one file per blob, or the blob in the SQLite row?

Both strategies write N sealed ~20 KB objects from 16 concurrent threads (as 16 concurrent
requests would) and must be durable before each call returns:

  file-per-blob   write temp file, fsync, rename, fsync folder; then its index row in SQLite
                  (WAL, synchronous=FULL) in a transaction of its own
  sqlite-group    the gateway's SQLite intake put: blob and index row in one transaction; a writer
                  thread commits everything that queued while the previous fsync ran

    python benchmarks/durability.py --count 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.model import AcceptedInvoice, DocumentType, InvoiceFacts
from gateway.storage.sqlite.store import SqliteStore

CONCURRENCY = 16


def file_per_blob(folder: Path, count: int, blob: bytes) -> list[float]:
    blobs = folder / "blobs"
    blobs.mkdir()
    local = threading.local()

    def conn() -> sqlite3.Connection:
        c = getattr(local, "c", None)
        if c is None:
            c = sqlite3.connect(folder / "index.db", isolation_level=None, timeout=30)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            c.execute("CREATE TABLE IF NOT EXISTS idx (id TEXT PRIMARY KEY, size INTEGER)")
            local.c = c
        return c

    conn()

    def one(_: int) -> float:
        t0 = time.perf_counter()
        mid = str(uuid.uuid4())
        tmp = blobs / f".{mid}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, blob)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, blobs / mid)
        dfd = os.open(blobs, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        c = conn()
        c.execute("BEGIN IMMEDIATE")
        c.execute("INSERT INTO idx VALUES (?, ?)", (mid, len(blob)))
        c.execute("COMMIT")
        return time.perf_counter() - t0

    with ThreadPoolExecutor(CONCURRENCY) as ex:
        return list(ex.map(one, range(count)))


def sqlite_group(folder: Path, count: int, blob: bytes) -> list[float]:
    async def run() -> list[float]:
        store = SqliteStore(folder / "state")
        slots = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> float:
            async with slots:
                t0 = time.perf_counter()
                facts = InvoiceFacts(DocumentType.UBL_INVOICE, f"N-{i}", "2.1", ("x",), (), "", "", "2026-01-01")
                await store.intake.put(AcceptedInvoice(str(uuid.uuid4()), "p", f"{i:064x}", "2026-01-01T00:00:00Z",
                                                       len(blob), facts, blob, "k", destinations=("erp",)))
                return time.perf_counter() - t0

        try:
            return list(await asyncio.gather(*(one(i) for i in range(count))))
        finally:
            await store.close()

    return asyncio.run(run())


def report(name: str, lat: list[float], wall: float) -> None:
    q = statistics.quantiles(lat, n=100)
    print(f"{name:14s} {len(lat) / wall:7.0f} writes/s   p50 {q[49] * 1000:6.2f} ms   p99 {q[98] * 1000:6.2f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--size", type=int, default=20_000)
    ap.add_argument("--dir", help="folder on the file system to measure (default: a temporary folder)")
    args = ap.parse_args()
    blob = os.urandom(args.size)
    for name, fn in (("file-per-blob", file_per_blob), ("sqlite-group", sqlite_group)):
        with tempfile.TemporaryDirectory(prefix="egw-durability-", dir=args.dir) as tmp:
            t0 = time.perf_counter()
            lat = fn(Path(tmp), args.count, blob)
            report(name, lat, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
