"""Sustainable throughput of the real daemon over mutual TLS: from the first request until every
accepted invoice is delivered.

Starts `einvoice-gateway serve` on a fresh instance (as its own process; its one destination is a
folder), drives N distinct ~20 KB UBL invoices at a fixed concurrency over keep-alive mTLS
connections from this process, and waits until every one of them is in the folder.  Prints:

    throughput   N / (last invoice delivered − first request)        (--no-delivery: − last 202)
    latency      p50 / p99 / max of the 202s at the concurrency
    CPU          ms per invoice, by kind of thread (event loops, stage threads, storage writer and
                 readers, delivery's I/O threads, rules processes) and by process, and the load
                 generator's own (this process, which also watches the folder)
    peak RSS     of every server process
    machine      cores and load average, before and after

    python benchmarks/throughput.py --count 5000 --concurrency 16
    python benchmarks/throughput.py --count 5000 --no-rules --peer     # and django-pyas2, the same run
    python benchmarks/throughput.py --count 5000 --signed rsa3072
    python benchmarks/throughput.py --count 5000 --no-delivery         # intake only (says so)
    python benchmarks/throughput.py --count 500 --warmup 100 --json    # one JSON object, for scripts

The warm-up invoices are sent and delivered before the measured window starts.  With --signed,
every invoice carries an enveloped XAdES-BES signature (made before the timed run) by a
certificate registered for the partner, whose signature policy is then `required`.  --peer runs
the yardstick ../shared/peer-as2/run.sh (django-pyas2 under gunicorn, S/MIME signed and encrypted
AS2 with a signed MDN; it builds its own venv from the package index) after the gateway has
stopped, and prints the ratio of the two rates at concurrency 16.

CPU comes from /proc/<pid>/task/<tid>/stat (utime + stime) of every process under the serve
process, before and after the window; threads are told apart by the names the gateway gives them
(/proc/.../comm: stage_N, io_N, store-writer, store-read_N); a process's main thread is its event
loop.  Delivery's own work is split between its I/O threads (opening and writing), the event loop of
the worker that delivers, and the storage threads (claims and outcomes).

Only 127.0.0.1 is used; the run is bounded by --count and time limits.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

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

TIME_LIMIT_S = 600  # for the requests of one phase
DELIVERY_WAIT_S = 600  # after the last 202, for the folder to hold every invoice
DELIVERY_POLL_S = 0.01
CLK_TCK = os.sysconf("SC_CLK_TCK")
PEER = ROOT.parent / "shared" / "peer-as2" / "run.sh"
PEER_TIME_LIMIT_S = 1800  # it builds a venv and runs two servers at two concurrencies
PEER_LABEL = "gunicorn"  # of the peer's two servers, the production-style one is the yardstick
PEER_CONCURRENCY = 16

# Thread kinds by the names the gateway gives its threads (gateway/threads.py: name_os_thread).
THREAD_KINDS = (
    (re.compile(r"stage_\d+"), "stage threads"),
    (re.compile(r"io_\d+"), "delivery I/O threads"),
    (re.compile(r"store-writer"), "storage writer"),
    (re.compile(r"store-read_\d+"), "storage readers"),
    (re.compile(r"console-hash"), "console"),
)
KIND_ORDER = ("event loops", "stage threads", "storage writer", "storage readers", "delivery I/O threads",
              "rules processes", "supervisor", "threads that ended", "other threads", "console")


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


# --- what the server's processes and threads spent --------------------------------------------------

def tree_pids(pid: int) -> list[int]:
    """``pid`` and every process under it (children of any of its threads), parents first."""
    out = [pid]
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            out.extend(tree_pids(int(child)))
    return out


def _stat_fields(path: Path) -> list[str]:
    return path.read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = _stat_fields(Path(f"/proc/{pid}/stat"))
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return total


def roles(root: int) -> dict[int, str]:
    """What each server process is, from its command line: supervisor (or server, alone), worker N, rules."""
    out = {}
    for pid in tree_pids(root):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"gateway.stages.rules" in argv:
            out[pid] = "rules"
        elif b"--worker" in argv:
            out[pid] = f"worker {argv[argv.index(b'--worker') + 1].decode()}"
        else:
            out[pid] = "server"
    if any(r.startswith("worker") for r in out.values()):
        out[root] = "supervisor"
    return out


@dataclasses.dataclass
class Snapshot:
    """CPU ticks of every server process (own, and of the children it has reaped) and of each live thread."""

    roles: dict[int, str]
    process: dict[int, int]
    reaped: dict[int, int]
    threads: dict[tuple[int, int], tuple[str, int]]  # (pid, tid) -> (comm, ticks)

    @classmethod
    def take(cls, root: int) -> Snapshot:
        named, process, reaped, threads = roles(root), {}, {}, {}
        for pid in named:
            try:
                fields = _stat_fields(Path(f"/proc/{pid}/stat"))
                process[pid] = int(fields[11]) + int(fields[12])
                reaped[pid] = int(fields[13]) + int(fields[14])  # cutime + cstime: children that ended
                for task in Path(f"/proc/{pid}/task").iterdir():
                    try:
                        tf = _stat_fields(task / "stat")
                        comm = (task / "comm").read_text().strip()
                    except OSError:
                        continue
                    threads[(pid, int(task.name))] = (comm, int(tf[11]) + int(tf[12]))
            except OSError:
                continue
        return cls({p: r for p, r in named.items() if p in process}, process, reaped, threads)


def thread_kind(process_role: str, pid: int, tid: int, comm: str) -> str:
    if process_role == "rules":
        return "rules processes"
    if process_role == "supervisor":
        return "supervisor"
    if tid == pid:
        return "event loops"
    for pattern, kind in THREAD_KINDS:
        if pattern.fullmatch(comm):
            return kind
    return "other threads"


def cpu_split(before: Snapshot, after: Snapshot) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds of CPU in the window by thread kind and by process role.

    A thread that ended in the window (a renewed stage thread) is no longer listed; its time is what
    its process's total gained beyond its live threads ("threads that ended").  A rules process that
    was replaced and reaped counts through its parent's reaped-children time."""
    kinds: dict[str, float] = defaultdict(float)
    procs: dict[str, float] = defaultdict(float)
    for pid, ticks in after.process.items():
        process_role = after.roles[pid]
        gained = ticks - before.process.get(pid, 0)
        live = 0
        for (p, tid), (comm, t) in after.threads.items():
            if p != pid:
                continue
            delta = t - before.threads.get((p, tid), ("", 0))[1]
            live += delta
            kinds[thread_kind(process_role, pid, tid, comm)] += delta / CLK_TCK
        if gained > live:
            kinds["rules processes" if process_role == "rules" else "threads that ended"] += (gained - live) / CLK_TCK
        procs[process_role] += gained / CLK_TCK
        reaped = after.reaped[pid] - before.reaped.get(pid, 0)
        if reaped > 0:  # a rules process that ended in the window (the parent reaps it)
            kinds["rules processes"] += reaped / CLK_TCK
            procs["rules"] += reaped / CLK_TCK
    return dict(kinds), dict(procs)


def peak_rss_mib(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
        out.append(int(m.group(1)) / 1024 if m else 0.0)
    return out


# --- driving the server -----------------------------------------------------------------------------

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


async def drive(url: str, ctx, docs: list[bytes], concurrency: int) -> list[float]:  # type: ignore[no-untyped-def]
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


def delivered(folder: Path) -> int:
    """Invoices in the destination folder (a document appears there after its sidecar, renamed into place)."""
    with os.scandir(folder) as entries:
        return sum(1 for e in entries if e.name.endswith(".xml") and not e.name.startswith("."))


async def until_delivered(folder: Path, wanted: int, proc: subprocess.Popen[bytes]) -> float:
    """perf_counter() when the folder first holds ``wanted`` invoices; exits if it does not in time."""
    deadline = time.monotonic() + DELIVERY_WAIT_S
    while True:
        n = delivered(folder)
        if n >= wanted:
            return time.perf_counter()
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited with {proc.returncode} while delivering ({n} of {wanted} delivered)")
        if time.monotonic() > deadline:
            raise SystemExit(f"delivery did not finish within {DELIVERY_WAIT_S} s: {n} of {wanted} invoices in {folder}")
        await asyncio.sleep(DELIVERY_POLL_S)


def no_rules(partners, store):  # type: ignore[no-untyped-def]
    partners[0] = dataclasses.replace(partners[0], rules=())


# --- the peer yardstick -----------------------------------------------------------------------------

def run_peer(count: int, workers: int, tmp: Path) -> dict[str, Any]:
    """django-pyas2 measured by ../shared/peer-as2/run.sh; {"error": why} when it cannot run."""
    if not PEER.is_file():
        return {"error": f"the peer yardstick is not at {PEER} (the shared folder beside the repository)"}
    env = dict(os.environ, PORT=str(free_port()), PEER_WORK=str(tmp / "peer-as2-work"))
    try:
        done = subprocess.run(["bash", str(PEER), str(count), str(workers)], env=env, capture_output=True, text=True,
                              timeout=PEER_TIME_LIMIT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"run.sh did not finish within {PEER_TIME_LIMIT_S} s"}
    results = [line for line in done.stdout.splitlines()
               if line.startswith(f"{PEER_LABEL}") and f"RESULT conc={PEER_CONCURRENCY} " in line]
    if done.returncode != 0 or not results:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-4:])
        return {"error": f"run.sh exited with {done.returncode} and no {PEER_LABEL} result at c={PEER_CONCURRENCY}: {tail}"}
    line = results[-1]

    def field(name: str) -> float | None:
        m = re.search(rf"\b{name}=([0-9.]+)", line)
        return float(m.group(1)) if m else None

    cpu = re.search(r"\(([0-9.]+) ms CPU/msg\)", line)
    return {"server": line.split(":", 1)[0], "messages_per_s": field("rate"), "p50_ms": field("p50"),
            "p99_ms": field("p99"), "server_cpu_ms_per_message": float(cpu.group(1)) if cpu else None,
            "count": count, "concurrency": PEER_CONCURRENCY, "workers": workers}


# --- one run ------------------------------------------------------------------------------------------

def configure(args: argparse.Namespace, tmp: Path, port: int) -> instance.Instance:
    inst = instance.init(tmp / "gw", port=port)
    if args.signed:
        issued = devpki.issue(inst.ca, tmp, "partner-signing", role="signing", key_kind=args.signed)

        def require(partners, store):  # type: ignore[no-untyped-def]
            p = partners[0]
            partners[0] = dataclasses.replace(p, signing_certs=(store(issued.cert, "--signing-cert"),),
                                              signature_policy=SignaturePolicy.REQUIRED)

        edit_partners(inst.partners, instance.DEMO_PARTNER, require)
        args.signer = signature.SigningKey.load(issued.cert.read_bytes(), issued.key.read_bytes())
    text = inst.config.read_text().replace("workers = 0", f"workers = {args.workers}", 1)
    inst.config.write_text(text.replace("[rules]\n", f"[rules]\nprocesses = {args.rules_processes}\n", 1))
    if args.no_rules:
        edit_partners(inst.partners, instance.DEMO_PARTNER, no_rules)
    return inst


async def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    port = free_port()
    args.signer = None
    inst = configure(args, tmp, port)
    docs = [make_invoice(i, args.size) for i in range(args.warmup + args.count)]
    if args.signer is not None:
        docs = [sign(d, args.signer) for d in docs]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    load_before = os.getloadavg()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(inst.config)], env=env,
                            stdout=subprocess.DEVNULL)
    try:
        await wait_port(port, proc)
        ctx = client_context(inst.ca.cert, inst.demo_client.cert, inst.demo_client.key)
        url = f"https://127.0.0.1:{port}"
        await drive(url, ctx, docs[: args.warmup], args.concurrency)
        await until_delivered(inst.delivery_folder, args.warmup, proc)  # the window starts with an empty outbox
        before, own0 = Snapshot.take(proc.pid), time.process_time()
        t0 = time.perf_counter()
        lat = await drive(url, ctx, docs[args.warmup:], args.concurrency)
        t_intake = time.perf_counter()
        at_last_202 = delivered(inst.delivery_folder) - args.warmup
        t_end = t_intake if args.no_delivery else await until_delivered(inst.delivery_folder, args.warmup + args.count, proc)
        after, own1 = Snapshot.take(proc.pid), time.process_time()
        load_after = os.getloadavg()
        pids = list(after.roles)
        rss = {f"{after.roles[p]} (pid {p})": r for p, r in zip(pids, peak_rss_mib(pids), strict=True)}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    kinds, procs = cpu_split(before, after)
    n = args.count
    kinds["load generator"] = own1 - own0
    lat.sort()
    q = statistics.quantiles(lat, n=100)
    wall = t_end - t0
    server_cpu = sum(procs.values())
    return {
        "mode": "intake only" if args.no_delivery else "sustainable (until every invoice is delivered)",
        "invoices": n, "bytes": len(docs[-1]), "signed": args.signed, "rules": "off" if args.no_rules else "en16931",
        "workers": args.workers or os.cpu_count(), "rules_processes": args.rules_processes,
        "concurrency": args.concurrency, "cores": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before], "load_average_after": [round(x, 2) for x in load_after],
        "invoices_per_s": round(n / wall, 1), "window_s": round(wall, 3),
        "intake_per_s": round(n / (t_intake - t0), 1),
        "delivered_at_last_202": at_last_202,
        "delivery_tail_s": None if args.no_delivery else round(t_end - t_intake, 3),
        "latency_ms": {"p50": round(q[49] * 1000, 1), "p99": round(q[98] * 1000, 1), "max": round(lat[-1] * 1000, 1)},
        "server_cpu_ms_per_invoice": round(server_cpu * 1000 / n, 3),
        "cpu_ms_per_invoice_by_kind": {k: round(v * 1000 / n, 3) for k, v in
                                       sorted(kinds.items(), key=lambda kv: KIND_ORDER.index(kv[0])
                                              if kv[0] in KIND_ORDER else len(KIND_ORDER))},
        "cpu_ms_per_invoice_by_process": {k: round(v * 1000 / n, 3) for k, v in sorted(procs.items())},
        "peak_rss_mib": {k: round(v, 1) for k, v in rss.items()},
    }


def report(r: dict[str, Any]) -> None:
    intake_only = r["mode"] == "intake only"
    print(f"invoices: {r['invoices']} x {r['bytes']} bytes{', signed ' + r['signed'] if r['signed'] else ''}, "
          f"rules {'off' if r['rules'] == 'off' else 'on (en16931)'}, workers {r['workers']} x {r['rules_processes']} "
          f"rules process(es), concurrency {r['concurrency']}, cores {r['cores']}")
    print(f"machine load: {' '.join(map(str, r['load_average_before']))} before, "
          f"{' '.join(map(str, r['load_average_after']))} after (1, 5, 15 min)")
    if intake_only:
        print(f"throughput: {r['invoices_per_s']:.0f} invoices/s INTAKE ONLY (first request to last 202; "
              f"{r['delivered_at_last_202']} of {r['invoices']} delivered by then, the rest not waited for)")
    else:
        print(f"throughput: {r['invoices_per_s']:.0f} invoices/s sustainable (first request until all "
              f"{r['invoices']} delivered; intake alone {r['intake_per_s']:.0f}/s, {r['delivered_at_last_202']} delivered "
              f"at the last 202, the rest in {r['delivery_tail_s']:.2f} s more)")
    lat = r["latency_ms"]
    print(f"latency at c={r['concurrency']}: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, max {lat['max']:.1f} ms")
    print(f"server CPU: {r['server_cpu_ms_per_invoice']:.2f} ms per invoice"
          f"{' (intake window only)' if intake_only else ' (intake and delivery)'}")
    for kind, ms in r["cpu_ms_per_invoice_by_kind"].items():
        print(f"  {kind:<22} {ms:7.3f} ms")
    print("  by process: " + ", ".join(f"{k} {v:.3f}" for k, v in r["cpu_ms_per_invoice_by_process"].items()))
    print("peak RSS: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in r["peak_rss_mib"].items())
          + f"; total {sum(r['peak_rss_mib'].values()):.0f} MiB")
    peer = r.get("peer")
    if peer is None:
        return
    if "error" in peer:
        print(f"peer (django-pyas2): not measured: {peer['error']}")
        return
    print(f"peer (django-pyas2, {peer['server']}, c={peer['concurrency']}, {peer['count']} AS2 messages): "
          f"{peer['messages_per_s']:.1f} msg/s, p99 {peer['p99_ms']:.1f} ms, {peer['server_cpu_ms_per_message']} ms CPU/msg")
    print(f"ratio: {r['ratio_to_peer']:.1f}x the peer ({'intake only' if intake_only else 'sustainable'} "
          "invoices/s over its msg/s, same invocation)")


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=5000, help="invoices in the measured window")
    ap.add_argument("--warmup", type=int, default=300, help="invoices sent and delivered before the window")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight (keep-alive connections)")
    ap.add_argument("--size", type=int, default=20_000, help="approximate invoice size in bytes")
    ap.add_argument("--signed", choices=("ec", "rsa3072"), help="sign every invoice with a key of this kind")
    ap.add_argument("--no-rules", action="store_true", help="register the partner with no business rules")
    ap.add_argument("--no-delivery", action="store_true",
                    help="intake only: stop the clock at the last 202 instead of the last delivery")
    ap.add_argument("--workers", type=int, default=0, help="https.workers (0: one per core)")
    ap.add_argument("--rules-processes", type=int, default=2, help="rules.processes (per worker)")
    ap.add_argument("--peer", action="store_true", help=f"also run the peer yardstick {PEER} and print the ratio")
    ap.add_argument("--peer-count", type=int, default=500, help="AS2 messages the peer gets per run")
    ap.add_argument("--peer-workers", type=int, default=2, help="gunicorn workers of the peer")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    args = ap.parse_args()
    if args.count < 2 or args.warmup < 0:
        ap.error("--count must be at least 2 and --warmup not negative")

    with tempfile.TemporaryDirectory(prefix="egw-bench-") as tmp:
        result = await measure(args, Path(tmp))
        if args.peer:  # after the gateway has stopped: the two never share the machine
            peer = await asyncio.to_thread(run_peer, args.peer_count, args.peer_workers, Path(tmp))
            result["peer"] = peer
            if peer.get("messages_per_s"):
                result["ratio_to_peer"] = round(result["invoices_per_s"] / peer["messages_per_s"], 2)
            result["load_average_after_peer"] = [round(x, 2) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)


if __name__ == "__main__":
    asyncio.run(main())
