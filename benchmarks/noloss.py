"""No-loss harness: SIGKILL the daemon and fail the ERP while invoices flow, then compare ledgers.

SECURITY-TESTS.md §5.2 (the Jepsen total-queue checker), D-01 (SIGKILL during receive), D-06 (ERP
down / 503), D-07 (kill mid-delivery; the ERP commits and drops the connection before replying).

    python benchmarks/noloss.py --invoices 1000 --kills 20            # the full run (1.5 to 2 minutes)
    python benchmarks/noloss.py --invoices 200 --kills 5 --json       # the reduced run of tests/test_noloss.py (~25 s)

It makes a fresh instance in a temporary folder whose one destination is an ``https`` ERP, the stub
of benchmarks/erpstub.py (own CA, HMAC key and bearer token files), runs ``einvoice-gateway serve``
as a subprocess in its own session, and sends --invoices distinct valid invoices plus --rejects
invalid ones (alternately another company's invoice, 403, and a schema-invalid one, 422) over mutual
TLS at --concurrency.  An invoice whose attempt ends without an answer (reset, timeout, 5xx) is
resent later with the same bytes, as a real client would; a refused connection is simply retried.
Meanwhile the nemesis SIGKILLs the daemon's whole process group --kills times at random points of
the run (some while a delivery POST is in flight) and restarts it after a short random pause, and
switches the ERP --erp-faults times to down (connection refused), 503 or commit-then-drop for a
moment.  Then the ERP stays up, and the harness waits (at most --drain-s) until every acknowledged
invoice has been booked, stops the daemon with SIGTERM, and prints the checker table:

    acked / nacked / unresolved    final answer per invoice (unresolved: none by the end)
    indeterminate                  invoices with at least one unanswered attempt (then resent)
    recovered                      of those, the ones the ERP booked
    duplicate_receipts             resends answered with the original message id (duplicate: true)
    lost                 gate      acknowledged (status accepted), never booked by the ERP
    unexpected           gate      booked by the ERP, but neither acknowledged nor sent
    mismatch             gate      a message id whose POSTed bytes (or receipt) differ from the bytes sent
    erp_dupes            gate      one invoice booked under more than one idempotency key
    nacked_but_delivered gate      a rejected invoice whose bytes reached the ERP at all
    dup_attempts                   raw repeat POSTs the ERP deduplicated by Idempotency-Key

Exit status 0 only when every gate is 0 and the run completed (every invoice answered, every kill
done, the daemon stopping cleanly); 1 otherwise.  --json prints the report as one JSON object on
the last line.  Bounded: --time-limit (default 600 s) caps the whole run, every wait has its own
limit.  Only 127.0.0.1 is used.  --keep leaves the instance folder (with gateway.log) behind.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from erpstub import ErpStub, Ledger  # noqa: E402

from gateway.cli.demo import SAMPLE
from gateway.operations import instance
from gateway.tls import client_context

TIME_LIMIT_S = 600.0
DRAIN_S = 120.0
READY_S = 60.0  # a (re)started daemon must listen within this
STOP_S = 60.0  # SIGTERM → exit (the gateway's own grace is 30 s)
REQUEST_TIMEOUT_S = 30.0
MAX_CRASHES = 5  # deaths the harness did not cause; past this the run is abandoned
GATES = ("lost", "unexpected", "mismatch", "erp_dupes", "nacked_but_delivered")


class Abort(Exception):
    """The run cannot go on (the daemon does not start, keeps dying, or time is up)."""


def leaves(exc: BaseException) -> list[str]:
    """The messages of the exceptions in a (nested) exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return [m for e in exc.exceptions for m in leaves(e)]
    return [str(exc)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def replace_once(doc: bytes, old: bytes, new: bytes) -> bytes:
    if old not in doc:
        raise AssertionError(f"the sample invoice lacks {old!r}")
    return doc.replace(old, new, 1)


def make_invoice(n: int) -> bytes:
    """The sample with a unique number (the business-duplicate key is partner, type, number, date)."""
    return replace_once(SAMPLE, b"DEMO-2026-0001</cbc:ID>", f"NOLOSS-{n:08d}</cbc:ID>".encode())


def make_reject(n: int) -> tuple[str, bytes]:
    """An invoice the gateway must refuse: alternately another company's (403) and schema-invalid (422)."""
    doc = replace_once(SAMPLE, b"DEMO-2026-0001</cbc:ID>", f"REJECT-{n:08d}</cbc:ID>".encode())
    if n % 2 == 0:
        for old, new in ((b"4000001000006", b"4000009000001"), (b"DE123456789", b"FR12345678901")):
            doc = doc.replace(old, new)
        return "foreign", doc
    return "invalid", replace_once(doc, b"<cbc:IssueDate>2026-11-02<", b"<cbc:IssueDate>2 Nov 2026<")


@dataclass
class Item:
    """One invoice of the generator ledger."""

    n: int
    kind: str  # valid | foreign | invalid
    body: bytes = field(repr=False)
    sha256: str
    outcome: str = ""  # acked | nacked | "" (no answer yet)
    attempts: int = 0
    indeterminate: int = 0  # attempts that ended without an answer
    refused: int = 0  # attempts whose connection was refused (nothing sent)
    message_ids: set[str] = field(default_factory=set)
    receipt_sha256: dict[str, str] = field(default_factory=dict)  # message id → SHA-256 in the receipt
    receipt_status: str = ""
    duplicate_receipts: int = 0
    nack: str = ""  # "403 PARTNER_…" for a refusal


class Daemon:
    """`einvoice-gateway serve` in its own session, so a SIGKILL takes its whole process group
    (as `systemctl kill -s SIGKILL` takes the cgroup)."""

    def __init__(self, config: Path, port: int, log: IO[bytes]):
        self.config = config
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.expected_down = True
        self.starts = 0
        self.kills = 0
        self.crashes = 0

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(self.config)], env=env,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.starts += 1
        self.expected_down = False

    async def ready(self, limit_s: float = READY_S) -> None:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise Abort(f"the gateway exited with {self.proc.returncode if self.proc else None} while starting")
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                await w.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise Abort(f"the gateway did not listen within {limit_s:.0f} s")

    def kill(self) -> None:
        assert self.proc is not None
        self.expected_down = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.kills += 1

    def terminate(self) -> int | None:
        """SIGTERM and wait; the exit code (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.expected_down = True
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            return None

    async def watch(self, stop: asyncio.Event) -> None:
        """Restart a daemon that died on its own (systemd's Restart=always), counting it."""
        while not stop.is_set():
            await asyncio.sleep(0.2)
            if not self.expected_down and self.proc is not None and self.proc.poll() is not None:
                self.crashes += 1
                if self.crashes > MAX_CRASHES:
                    raise Abort(f"the gateway died on its own {self.crashes} times (last exit {self.proc.returncode})")
                self.start()
                await self.ready()


def configure(inst: instance.Instance, stub: ErpStub, workers: int) -> None:
    """One https destination (the stub), no rule packs (this tests delivery, not rules), fast retries."""
    secrets_dir = inst.root / "erp-secrets"
    secrets_dir.mkdir(mode=0o700)
    key_file, token_file = secrets_dir / "erp.hmac", secrets_dir / "erp.token"
    for path, data in ((key_file, stub.hmac_key), (token_file, (stub.bearer_token or "").encode() + b"\n")):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    block = (
        "[[destinations]]\n"
        'name = "erp"\n'
        'type = "https"\n'
        f"url = {json.dumps(stub.url)}\n"
        f"ca = {json.dumps(str(stub.ca_cert))}\n"
        f"hmac_key_file = {json.dumps(str(key_file))}\n"
        f"bearer_token_file = {json.dumps(str(token_file))}\n"
        "concurrency = 8\n"
        "timeout_s = 10\n"
    )
    fast = {"retry_base_s": "0.2", "retry_cap_s": "2.0", "breaker_cooldown_s": "1.0"}
    text = inst.config.read_text()
    text, n = re.subn(r"^\[\[destinations\]\]\n(?:(?:[a-z_]+ = .*|#.*)\n)+", lambda _: block, text, flags=re.M)
    text, m = re.subn(r"^default = \[.*\]$", "default = []", text, count=1, flags=re.M)
    text, w = re.subn(r"^workers = \d+$", f"workers = {workers}", text, flags=re.M)
    if (n, m, w) != (1, 1, 1):
        raise Abort("the config template changed: cannot find the destinations block, rules.default or https.workers")
    if re.search(r"^\[delivery\]$", text, flags=re.M):
        for key, value in fast.items():
            text, k = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
            if k != 1:
                raise Abort(f"the config template changed: delivery.{key} not found once")
    else:
        text += "\n[delivery]\n" + "".join(f"{k} = {v}\n" for k, v in fast.items())
    inst.config.write_text(text)


class Generator:
    """Sends every item until it has a definite answer (202 or a 4xx), at bounded concurrency."""

    def __init__(self, items: list[Item], url: str, ctx: ssl.SSLContext, concurrency: int, rate: float, rng: random.Random):
        self.items = items
        self.interval = 1.0 / rate  # between attempts, over all workers
        self.next_slot = 0.0
        self.url = url
        self.ctx = ctx
        self.concurrency = concurrency
        self.rng = rng
        self.answered = 0
        self.progress = asyncio.Condition()
        self.errors: Counter[str] = Counter()  # attempts without a definite answer, by cause
        self.latency = 0.01  # moving average of answered attempts (s)
        self.in_flight = 0
        self.sending = asyncio.Event()  # set when an attempt starts

    async def run(self, deadline: float) -> None:
        queue: asyncio.Queue[Item] = asyncio.Queue()
        order = list(self.items)
        self.rng.shuffle(order)
        for item in order:
            queue.put_nowait(item)
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        conn = aiohttp.TCPConnector(ssl=self.ctx, limit=self.concurrency)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            async def worker() -> None:
                while self.answered < len(self.items) and time.monotonic() < deadline:
                    try:
                        item = await asyncio.wait_for(queue.get(), 0.25)
                    except TimeoutError:
                        continue
                    now = time.monotonic()
                    self.next_slot = max(now, self.next_slot + self.interval)
                    await asyncio.sleep(self.next_slot - now)
                    if await self._send(session, item):
                        async with self.progress:
                            self.answered += 1
                            self.progress.notify_all()
                    else:  # resent later, with the same bytes
                        loop.call_later(self.rng.uniform(0.1, 0.5), queue.put_nowait, item)

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    async def _send(self, session: aiohttp.ClientSession, item: Item) -> bool:
        """One attempt; True when the answer is definite."""
        item.attempts += 1
        started = time.monotonic()
        self.in_flight += 1
        self.sending.set()
        try:
            async with session.post(f"{self.url}/v1/invoices", data=item.body,
                                    headers={"Content-Type": "application/xml"}) as resp:
                raw = await resp.read()
                status = resp.status
        except aiohttp.ClientConnectorError as exc:  # nothing was sent: not indeterminate
            self.errors[exc.__class__.__name__] += 1
            item.refused += 1
            return False
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.errors[exc.__class__.__name__] += 1
            item.indeterminate += 1
            return False
        finally:
            self.in_flight -= 1
        self.latency = 0.9 * self.latency + 0.1 * (time.monotonic() - started)
        if status == 202:
            receipt = json.loads(raw)
            mid = str(receipt["message_id"])
            item.outcome = "acked"
            item.message_ids.add(mid)
            item.receipt_sha256[mid] = str(receipt.get("sha256", ""))
            item.receipt_status = str(receipt.get("status", ""))
            item.duplicate_receipts += bool(receipt.get("duplicate"))
            return True
        if 400 <= status < 500 and status not in (408, 429):
            item.outcome = "nacked"
            try:
                item.nack = f"{status} {json.loads(raw).get('error', '')}"
            except ValueError:
                item.nack = str(status)
            return True
        self.errors[f"http-{status}"] += 1
        item.indeterminate += 1  # 5xx, 408, 429: the client cannot know; it resends
        return False

    async def wait_progress(self, target: float, done: asyncio.Event) -> None:
        async with self.progress:
            await self.progress.wait_for(lambda: self.answered >= target or done.is_set())


async def sleep_until(deadline: float, seconds: float) -> None:
    await asyncio.sleep(max(0.0, min(seconds, deadline - time.monotonic())))


class Nemesis:
    def __init__(self, daemon: Daemon, stub: ErpStub, gen: Generator, rng: random.Random, say: Callable[[str], None]):
        self.daemon = daemon
        self.stub = stub
        self.gen = gen
        self.rng = rng
        self.say = say
        self.kinds: Counter[str] = Counter()
        self.erp_faults: Counter[str] = Counter()

    def points(self, count: int) -> list[float]:
        total = len(self.gen.items)
        return sorted(self.rng.uniform(0.05, 0.95) * total for _ in range(count))

    async def kills(self, count: int, gen_done: asyncio.Event, deadline: float) -> None:
        for i, point in enumerate(self.points(count)):
            await self._after(point, gen_done, deadline)
            await sleep_until(deadline, self.rng.uniform(0.0, 0.3))
            kind = "delivery" if self.rng.random() < 0.35 else "receive"
            limit = max(0.01, min(3.0, deadline - time.monotonic()))
            if kind == "delivery":  # D-07: the ERP holds its reply, the daemon dies waiting for it
                self.stub.reply_delay_s = 0.3
                self.stub.request_seen.clear()
                try:
                    await asyncio.wait_for(self.stub.request_seen.wait(), limit)
                    await asyncio.sleep(self.rng.uniform(0.0, 0.2))
                except TimeoutError:
                    kind = "delivery-idle"
            elif gen_done.is_set():
                kind = "after-sending"
            else:  # D-01: while an invoice is on its way in (or being stored)
                self.gen.sending.clear()
                try:
                    await asyncio.wait_for(self.gen.sending.wait(), limit)
                    await asyncio.sleep(self.rng.uniform(0.0, self.gen.latency))  # mostly before the answer
                except TimeoutError:
                    kind = "receive-idle"
            self.daemon.kill()
            self.stub.reply_delay_s = 0.0
            self.kinds[kind] += 1
            self.say(f"kill {i + 1}/{count} ({kind}) at {self.gen.answered}/{len(self.gen.items)} answered")
            await sleep_until(deadline, self.rng.uniform(0.05, 0.5))
            self.daemon.start()
            await self.daemon.ready()

    async def erp(self, count: int, gen_done: asyncio.Event, deadline: float) -> None:
        modes = ["down", "503", "commit-then-drop"]
        plan = (modes * (count // len(modes) + 1))[:count]
        self.rng.shuffle(plan)
        for point, mode in zip(self.points(count), plan, strict=True):
            await self._after(point, gen_done, deadline)
            await self.stub.set_mode(mode)
            self.erp_faults[mode] += 1
            self.say(f"ERP {mode} at {self.gen.answered}/{len(self.gen.items)} answered")
            await sleep_until(deadline, self.rng.uniform(0.5, 2.5))
            await self.stub.set_mode("normal")

    async def _after(self, point: float, gen_done: asyncio.Event, deadline: float) -> None:
        """Wait for that much progress; once the generator is done, for a short random pause instead."""
        if time.monotonic() >= deadline:
            raise Abort("time limit reached during the nemesis")
        if not gen_done.is_set():
            try:
                await asyncio.wait_for(self.gen.wait_progress(point, gen_done), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                raise Abort("time limit reached while sending") from None
        if gen_done.is_set():
            await sleep_until(deadline, self.rng.uniform(0.3, 1.5))


def check(items: list[Item], led: Ledger) -> dict[str, Any]:
    """The §5.2 checker over the generator ledger and the ERP ledger."""
    by_sha = {it.sha256: it for it in items}
    receipts = {mid: (it, sha) for it in items for mid, sha in it.receipt_sha256.items()}
    booked = led.booked_message_ids()
    acked = [it for it in items if it.outcome == "acked"]
    expected = {mid for it in acked if it.receipt_status == "accepted" for mid in it.message_ids}
    lost = sorted(expected - set(booked))
    unexpected, recovered = [], set()
    for mid, sha in booked.items():
        if mid not in receipts and sha not in by_sha:
            unexpected.append(mid)
        if sha in by_sha and by_sha[sha].indeterminate:
            recovered.add(by_sha[sha].n)
    # Every POST that reached the ERP, booked or not, must carry the bytes acknowledged under its id.
    mismatch = sorted({p.message_id for p in led.posts if p.message_id in receipts and p.sha256 != receipts[p.message_id][0].sha256}
                      | {mid for mid, (it, sha) in receipts.items() if sha != it.sha256})
    keys_per_sha = Counter(p.sha256 for p in led.bookings.values())
    erp_dupes = sum(c - 1 for c in keys_per_sha.values() if c > 1)
    reached = {p.sha256 for p in led.posts}
    leaked = [it.n for it in items if (it.kind != "valid" or it.outcome == "nacked") and it.sha256 in reached]
    return {
        "acked": len(acked),
        "nacked": sum(it.outcome == "nacked" for it in items),
        "unresolved": sum(not it.outcome for it in items),
        "held": sum(it.receipt_status == "held" for it in acked),
        "indeterminate": sum(bool(it.indeterminate) for it in items),
        "recovered": len(recovered),
        "duplicate_receipts": sum(it.duplicate_receipts for it in items),
        "split_receipts": sum(len(it.message_ids) > 1 for it in items),  # one invoice, several message ids
        "attempts": sum(it.attempts for it in items),
        "refused_attempts": sum(it.refused for it in items),
        "lost": len(lost),
        "unexpected": len(unexpected),
        "mismatch": len(mismatch),
        "erp_dupes": erp_dupes,
        "nacked_but_delivered": len(leaked),
        "dup_attempts": led.dup_attempts,
        "erp_posts": len(led.posts),
        "erp_bookings": len(led.bookings),
        "erp_refused": dict(led.refused),
        "nacks": dict(Counter(it.nack.split(" ")[0] + " " + it.kind for it in items if it.outcome == "nacked")),
        "examples": {"lost": lost[:5], "unexpected": unexpected[:5], "mismatch": mismatch[:5], "leaked": leaked[:5]},
    }


async def until(predicate: Callable[[], Awaitable[bool]], limit_s: float) -> bool:
    deadline = time.monotonic() + max(0.0, limit_s)
    while True:
        if await predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.2)


async def gateway_statuses(url: str, ctx: ssl.SSLContext, message_ids: list[str]) -> Counter[str]:
    """What the gateway itself says about each acknowledged invoice (GET /v1/invoices/{id})."""
    out: Counter[str] = Counter()
    sem = asyncio.Semaphore(8)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=8),
                                     timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
        async def one(mid: str) -> None:
            async with sem:
                try:
                    async with session.get(f"{url}/v1/invoices/{mid}") as resp:
                        out[str((await resp.json()).get("status")) if resp.status == 200 else f"http-{resp.status}"] += 1
                except (aiohttp.ClientError, TimeoutError, ValueError):
                    out["no-answer"] += 1

        await asyncio.gather(*(one(m) for m in message_ids))
    return out


async def run(args: argparse.Namespace, work: Path, say: Callable[[str], None]) -> dict[str, Any]:
    t0 = time.monotonic()
    deadline = t0 + args.time_limit
    rng = random.Random(args.seed)
    inst = instance.init(work / "gw", port=free_port())
    stub = ErpStub(os.urandom(32).hex().encode(), work / "erp", bearer_token=secrets.token_urlsafe(24))
    items = []
    for n in range(args.invoices):
        body = make_invoice(n)
        items.append(Item(n, "valid", body, hashlib.sha256(body).hexdigest()))
    for n in range(args.rejects):
        kind, body = make_reject(n)
        items.append(Item(args.invoices + n, kind, body, hashlib.sha256(body).hexdigest()))
    report: dict[str, Any] = {"invoices": args.invoices, "rejects": args.rejects, "seed": args.seed, "workers": args.workers,
                              "rate": round(args.rate, 1), "concurrency": args.concurrency}
    await stub.start()
    log = (inst.root / "gateway.log").open("ab")
    daemon = Daemon(inst.config, int(inst.https_url.rsplit(":", 1)[1]), log)
    ctx = client_context(inst.ca.cert, inst.demo_client.cert, inst.demo_client.key)
    url = f"https://127.0.0.1:{daemon.port}"
    gen = Generator(items, url, ctx, args.concurrency, args.rate, rng)
    nemesis = Nemesis(daemon, stub, gen, rng, say)
    gen_done, stop_watch = asyncio.Event(), asyncio.Event()
    outcome: dict[str, bool] = {}

    async def generate() -> None:
        try:
            await gen.run(deadline)
        finally:
            gen_done.set()
            async with gen.progress:
                gen.progress.notify_all()

    async def scenario() -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(generate(), name="generator")
                tg.create_task(nemesis.kills(args.kills, gen_done, deadline), name="nemesis-kill")
                tg.create_task(nemesis.erp(args.erp_faults, gen_done, deadline), name="nemesis-erp")
            say(f"sent: {gen.answered}/{len(items)} answered after {time.monotonic() - t0:.1f} s; draining")
            await stub.set_mode("normal")
            expected = {m for it in items if it.outcome == "acked" and it.receipt_status == "accepted" for m in it.message_ids}

            async def all_booked() -> bool:
                return expected <= set(stub.ledger.booked_message_ids())

            outcome["drained"] = await until(all_booked, min(args.drain_s, deadline - time.monotonic()))
            statuses: Counter[str] = Counter()

            async def gateway_settled() -> bool:
                nonlocal statuses
                statuses = await gateway_statuses(url, ctx, sorted(expected))
                return set(statuses) <= {"delivered"}

            outcome["settled"] = await until(gateway_settled, min(30.0, deadline - time.monotonic()))
            report["gateway_status"] = dict(statuses)
        finally:
            stop_watch.set()

    try:
        configure(inst, stub, args.workers)
        daemon.start()
        await daemon.ready()
        async with asyncio.TaskGroup() as top:
            top.create_task(daemon.watch(stop_watch), name="daemon-watch")
            top.create_task(scenario(), name="scenario")
    except* Abort as group:
        report["abort"] = "; ".join(leaves(group))
    finally:
        report["daemon_exit"] = daemon.terminate()
        log.close()
        await stub.stop()
    report.update(check(items, stub.ledger))
    log_text = (inst.root / "gateway.log").read_text(errors="replace")
    errors = [line for line in log_text.splitlines() if '"level": "error"' in line or "Traceback" in line]
    report.update(kills=daemon.kills, starts=daemon.starts, crashes=daemon.crashes, kill_kinds=dict(nemesis.kinds),
                  erp_faults=dict(nemesis.erp_faults), attempt_errors=dict(gen.errors), log_errors=len(errors),
                  log_error_examples=errors[:5],
                  elapsed_s=round(time.monotonic() - t0, 1))
    report["complete"] = (outcome.get("drained", False) and outcome.get("settled", False) and gen.answered == len(items)
                          and daemon.kills == args.kills and report["daemon_exit"] == 0)
    report["ok"] = report["complete"] and all(report[g] == 0 for g in GATES)
    if not report["ok"]:
        report["log_tail"] = log_text.splitlines()[-5:]
    return report


TABLE = ("acked", "nacked", "unresolved", "held", "indeterminate", "recovered", "duplicate_receipts", "lost", "unexpected",
         "mismatch", "erp_dupes", "nacked_but_delivered", "dup_attempts", "erp_bookings", "erp_posts", "kills", "starts",
         "crashes", "log_errors", "elapsed_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--invoices", type=int, default=1000, help="valid invoices to send (default 1000)")
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs of the daemon (default 20)")
    ap.add_argument("--rejects", type=int, default=10, help="invalid invoices, to be refused (default 10)")
    ap.add_argument("--erp-faults", type=int, help="ERP down / 503 / commit-then-drop spells (default: as many as kills, >= 3)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: random, printed)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--rate", type=float, help="attempts per second (default: enough to spread the kills over the "
                    "sending, about 1.5 s of sending per kill, at least 10/s)")
    ap.add_argument("--workers", type=int, default=1, help="https.workers of the daemon (default 1)")
    ap.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help=f"seconds for the whole run (default {TIME_LIMIT_S:.0f})")
    ap.add_argument("--drain-s", type=float, default=DRAIN_S, help=f"wait for delivery at the end (default {DRAIN_S:.0f})")
    ap.add_argument("--keep", action="store_true", help="keep the instance folder (config, state, gateway.log)")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object on the last line")
    ap.add_argument("-v", "--verbose", action="store_true", help="narrate the nemesis on stderr")
    args = ap.parse_args()
    if args.invoices < 1 or args.kills < 0 or args.rejects < 0 or args.concurrency < 1:
        ap.error("--invoices must be >= 1, --kills and --rejects >= 0, --concurrency >= 1")
    if args.seed is None:
        args.seed = secrets.randbelow(2**31)
    if args.rate is None:
        args.rate = max(10.0, (args.invoices + args.rejects) / max(5.0, 1.5 * args.kills))
    if args.erp_faults is None:
        args.erp_faults = max(3, args.kills)

    def say(msg: str) -> None:
        if args.verbose:
            print(f"noloss: {msg}", file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="egw-noloss-"))
    try:
        report = asyncio.run(run(args, work, say))
    finally:
        if not args.keep:
            instance.remove(work)
    if args.keep:
        report["kept"] = str(work)
    for name in TABLE:
        gate = "  (gate)" if name in GATES else ""
        print(f"{name:22s} {report.get(name)}{gate}")
    for name in ("kill_kinds", "erp_faults", "attempt_errors", "erp_refused", "nacks", "gateway_status", "daemon_exit",
                 "abort", "seed", "kept"):
        if name in report:
            print(f"{name:22s} {report[name]}")
    for line in report["log_error_examples"] + report.get("log_tail", []):
        print(f"log: {line[:300]}")
    print(f"result                 {'PASS' if report['ok'] else 'FAIL'}{'' if report['complete'] else ' (incomplete run)'}")
    if args.json:
        print(json.dumps(report, sort_keys=True))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
