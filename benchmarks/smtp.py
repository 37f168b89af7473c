"""Throughput and latency of the real daemon over SMTP + STARTTLS, with S/MIME signed-then-encrypted mail.

Starts `einvoice-gateway serve` on a fresh instance (as its own process tree, like
benchmarks/throughput.py, whose helpers it uses), builds N distinct ~20 KB invoices as the demo
partner would send them (each signed with the partner's S/MIME key, SHA-256, then encrypted to the
gateway's certificate: AES-256-GCM AuthEnvelopedData or AES-256-CBC EnvelopedData, RSAES-OAEP key
transport), and sends them from this process over `concurrency` SMTP sessions: EHLO, STARTTLS (the
instance CA trusted), then MAIL/RCPT/DATA for message after message on the same session (a new
session every N messages with --messages-per-session N, every message with --new-session-per-message).
Replies other than 250 are failures (the first few are printed); the message is not resent.  Prints invoices/s, p50/p99 latency (MAIL to
the 250 after DATA), failures, server CPU ms per invoice, peak RSS per process and the mean time of
each pipeline stage (the gateway's own histogram), then waits until every invoice is in the
delivery folder.

    python benchmarks/smtp.py --count 3000                      # rules on (the default configuration)
    python benchmarks/smtp.py --count 3000 --no-rules
    python benchmarks/smtp.py --count 3000 --no-rules --messages-per-session 100
    python benchmarks/smtp.py --count 300 --warmup 20 --no-rules --new-session-per-message
    python benchmarks/smtp.py --stages 300                      # no daemon: time each step of opening a message

Messages are built before the timed run (on every core); one is checked with `openssl cms -decrypt |
openssl cms -verify` and sent alone (it must get 250) before the warm-up.  --stages times, in this
process and without load, each step the SMTP listener runs per message (smime.open_message and
smime.authenticate, split into CMS decryption, signature verification, chain check and MIME parsing)
and lists the primitives cProfile finds most costly.

Only 127.0.0.1 is used; the run is bounded by --count and time limits.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import aiosmtplib
from cryptography import x509

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from throughput import CLK_TCK, cpu_seconds, free_port, make_invoice, no_rules, peak_rss_mib, tree_pids  # noqa: E402

from gateway.app.build import smime_parts
from gateway.config import load as config
from gateway.operations import instance
from gateway.partners.book import load_directory
from gateway.partners.edit import edit_partners
from gateway.smime import cms
from gateway.smime import unwrap as smime
from gateway.smime.compose import compose
from gateway.smime.identity import Identity
from gateway.tls import client_context, load_private_key

TIME_LIMIT_S = 600  # the whole load of one phase
START_LIMIT_S = 120  # until every worker listens
DELIVERY_WAIT_S = 120  # after the last 250, for the delivery folder to hold every invoice
SMTP_TIMEOUT_S = 60  # one SMTP command
SHOW_FAILURES = 5
RECIPIENT = f"invoices@{instance.MAIL_HOST}"
CIPHERS = ("aes-256-gcm", "aes-256-cbc")


# --- building the messages (before any timing) ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Keys:
    """Paths of what the demo partner needs to write to the gateway (picklable for the build processes)."""

    demo_cert: Path
    demo_key: Path
    gateway_cert: Path


_built: tuple[Identity, x509.Certificate] | None = None  # per build process


def _load(keys: Keys) -> tuple[Identity, x509.Certificate]:
    demo = Identity(x509.load_pem_x509_certificate(keys.demo_cert.read_bytes()),
                          load_private_key(keys.demo_key.read_bytes()), instance.DEMO_EMAIL)
    return demo, x509.load_pem_x509_certificate(keys.gateway_cert.read_bytes())


def _init_builder(keys: Keys) -> None:
    global _built
    _built = _load(keys)


def _build(job: tuple[int, int, str]) -> bytes:
    n, size, cipher = job
    assert _built is not None
    demo, gateway_cert = _built
    return compose([(make_invoice(n, size), "application/xml", "invoice.xml")], f"Invoice BENCH-{n:08d}\r\n",
                         identity=demo, to=RECIPIENT, subject=f"Invoice BENCH-{n:08d}", recipient=gateway_cert,
                         cipher=cipher)


def build_messages(keys: Keys, numbers: range, size: int, cipher: str) -> list[bytes]:
    """One signed-then-encrypted message per invoice number, built on every core."""
    with ProcessPoolExecutor(os.cpu_count() or 1, initializer=_init_builder, initargs=(keys,)) as pool:
        return list(pool.map(_build, [(n, size, cipher) for n in numbers], chunksize=64))


def keys_of(inst: instance.Instance) -> Keys:
    return Keys(inst.demo_smime.cert, inst.demo_smime.key, inst.smime.cert)


def openssl_check(inst: instance.Instance, message: bytes, tmp: Path) -> None:
    """An independent implementation must open the message: decrypt with the gateway's key, verify against the CA."""
    path = tmp / "sample.eml"
    path.write_bytes(message)
    decrypt = subprocess.run(["openssl", "cms", "-decrypt", "-in", str(path), "-recip", str(inst.smime.cert),
                              "-inkey", str(inst.smime.key)], capture_output=True, timeout=60)
    verify = subprocess.run(["openssl", "cms", "-verify", "-CAfile", str(inst.ca.cert), "-purpose", "smimesign",
                             "-out", os.devnull], input=decrypt.stdout, capture_output=True, timeout=60)
    if decrypt.returncode or verify.returncode:
        raise SystemExit(f"openssl does not accept the message: decrypt exit {decrypt.returncode} "
                         f"{decrypt.stderr.decode(errors='replace')[:300]}; verify exit {verify.returncode} "
                         f"{verify.stderr.decode(errors='replace')[:300]}")
    print(f"sanity: openssl cms -decrypt | openssl cms -verify: {verify.stderr.decode().strip()}")


# --- the daemon ----------------------------------------------------------------------------------------

def configure(inst: instance.Instance, args: argparse.Namespace) -> None:
    """workers and rules processes as throughput.py sets them; the SMTP port ephemeral (read from the log)."""
    text = inst.config.read_text().replace("workers = 0", f"workers = {args.workers}", 1)
    text = text.replace("[rules]\n", f"[rules]\nprocesses = {args.rules_processes}\n", 1)
    smtp = text.index("[smtp]")
    text = text[:smtp] + re.sub(r"\nlisten_port = \d+\n", "\nlisten_port = 0\n", text[smtp:], count=1)
    inst.config.write_text(text)
    if args.no_rules:
        edit_partners(inst.partners, instance.DEMO_PARTNER, no_rules)


@dataclass
class Started:
    smtp_port: int
    admin_url: str | None
    listening: int  # workers that logged smtp.listening


async def wait_started(log_file: Path, proc: subprocess.Popen[bytes]) -> Started:
    """Until the supervisor logs supervisor.ready: the SMTP port from supervisor.started, each worker's smtp.listening."""
    deadline = time.monotonic() + START_LIMIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gateway exited with {proc.returncode}; see {log_file}")
        events = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
        if any(e.get("event") == "supervisor.ready" for e in events):
            started = next(e for e in events if e.get("event") == "supervisor.started")
            admin = next((e["url"] for e in events if e.get("event") == "admin.listening"), None)
            listening = [e["address"] for e in events if e.get("event") == "smtp.listening"]
            return Started(int(started["smtp_port"]), admin, len(listening))
        await asyncio.sleep(0.2)
    raise SystemExit("gateway did not become ready")


async def stage_seconds(admin_url: str | None) -> dict[str, tuple[float, float]]:
    """stage -> (sum of seconds, count) from the gateway's einvoice_stage_seconds histogram (all workers)."""
    if admin_url is None:
        return {}
    async with aiohttp.ClientSession() as session, session.get(f"{admin_url}/metrics") as r:
        text = await r.text()
    out: dict[str, tuple[float, float]] = {}
    for m in re.finditer(r'^einvoice_stage_seconds_(sum|count)\{stage="([^"]+)"\} (\S+)$', text, re.M):
        total, count = out.get(m.group(2), (0.0, 0.0))
        out[m.group(2)] = (float(m.group(3)), count) if m.group(1) == "sum" else (total, float(m.group(3)))
    return out


def labels(pids: list[int]) -> list[str]:
    """supervisor, worker N, or rules (a child of a worker), from each process's command line."""
    out = []
    for pid in pids:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        worker = argv.index(b"--worker") if b"--worker" in argv else -1
        out.append(f"worker {argv[worker + 1].decode()}" if worker >= 0 else
                   "supervisor" if b"serve" in argv else "rules")
    return out


def cpu_each(pids: list[int]) -> list[tuple[float, float]]:
    """(user, system) CPU seconds of each process."""
    out = []
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK))
    return out


def delivered(folder: Path) -> int:
    return sum(1 for _ in folder.glob("*.xml"))


# --- the load ------------------------------------------------------------------------------------------

@dataclass
class Load:
    latencies: list[float] = field(default_factory=list)  # MAIL .. 250 after DATA, per accepted message
    failures: list[str] = field(default_factory=list)  # every reply other than 250, or a broken session
    sessions: int = 0
    session_setup: list[float] = field(default_factory=list)  # connect .. EHLO after STARTTLS
    first: float = 0.0
    last: float = 0.0  # when the last 250 arrived


async def open_session(port: int, ctx: Any, load: Load) -> aiosmtplib.SMTP:
    t0 = time.perf_counter()
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, tls_context=ctx, start_tls=False, timeout=SMTP_TIMEOUT_S)
    await client.connect()
    await client.ehlo()
    await client.starttls()
    await client.ehlo()
    load.sessions += 1
    load.session_setup.append(time.perf_counter() - t0)
    return client


async def send_one(client: aiosmtplib.SMTP, message: bytes) -> tuple[float, str | None, bool]:
    """(seconds from MAIL to the reply after DATA, None if that reply was 250 else the reply, whether the
    session can go on)."""
    t0 = time.perf_counter()
    try:
        await client.mail(instance.DEMO_EMAIL)
        await client.rcpt(RECIPIENT)
        reply = await client.data(message)
    except aiosmtplib.SMTPResponseException as exc:
        seconds, refused = time.perf_counter() - t0, f"{exc.code} {exc.message}"
        try:
            await client.rset()
        except (aiosmtplib.SMTPException, OSError):
            return seconds, refused, False
        return seconds, refused, True
    error = None if reply.code == 250 else f"{reply.code} {reply.message}"
    return time.perf_counter() - t0, error, True


async def drive(port: int, ctx: Any, messages: list[bytes], concurrency: int, per_session: int) -> Load:
    """Send every message over `concurrency` sessions, each taking the next message when it is free;
    a session ends after `per_session` messages (0: never)."""
    load = Load()
    queue: Iterator[bytes] = iter(messages)

    async def session() -> None:
        client: aiosmtplib.SMTP | None = None
        sent = 0
        for message in queue:
            try:
                if client is None:
                    client, sent = await open_session(port, ctx, load), 0
                seconds, error, usable = await send_one(client, message)
            except (aiosmtplib.SMTPException, OSError) as exc:
                load.failures.append(f"session: {exc.__class__.__name__}: {exc}")
                client = None
                continue
            if error is None:
                load.latencies.append(seconds)
                load.last = time.perf_counter()
            else:
                load.failures.append(error)
            sent += 1
            if not usable or sent == per_session:
                if usable:
                    with suppress(aiosmtplib.SMTPException, OSError):
                        await client.quit()
                client = None
        if client is not None:
            await client.quit()

    load.first = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(session() for _ in range(concurrency))), TIME_LIMIT_S)
    return load


# --- --stages: where one message's time goes, in one process ---------------------------------------------

# The functions of the listener's per-message path (SmtpInbound._open), each timed exclusive of the
# others it calls.  Patched in this process only, and only for --stages.
STEPS = (
    (smime, "open_message", "open_message: its own code (Message-ID, result)"),
    (smime, "_crlf", "CRLF check/normalisation (the whole message, the decrypted entity, the signed content)"),
    (smime, "_split", "header/body split"),
    (smime, "_headers", "header parsing (email.parser)"),
    (smime, "_from_address", "From/Sender checks"),
    (smime, "_security_type", "Content-Type checks (smime-type, protocol, boundary)"),
    (smime, "_cms", "CMS body transfer encoding"),
    (smime, "_b64", "base64 of the CMS bodies and the invoice (whitespace removal + b64decode)"),
    (smime, "_multipart", "multipart splits (bytes.split on the boundary)"),
    (smime, "_open_signed", "_open_signed: its own code"),
    (smime, "_leaves", "the signed content's parts (boundary splits, header blocks)"),
    (smime, "_decoded", "the invoice part's transfer encoding"),
    (smime, "_invoice", "choosing the invoice part"),
    (cms, "content_type", "CMS: content-type peek"),
    (cms, "_load", "CMS: ASN.1 ContentInfo load"),
    (cms, "decrypt", "CMS decrypt: certificate/key match check"),
    (cms, "_unwrap", "CMS decrypt: RSA-2048 OAEP key unwrap"),
    (cms, "_issued_by", "CMS: issuer name match (DER, else RFC 5280 comparison)"),
    (cms, "_decrypt", "CMS decrypt: ASN.1 fields, recipient match, AES (the rest)"),
    (cms, "verify", "CMS verify: wrapper"),
    (cms, "_load_certificates", "CMS verify: certificates of the SignedData"),
    (cms, "_verify", "CMS verify: ASN.1, signed attributes, SHA-256, RSA-2048 verify (the rest)"),
    (smime, "authenticate", "authenticate: partner lookup, From checks (the rest)"),
    (cms, "check_signer", "authenticate: chain to the CA, KU/EKU (cryptography x509 verification)"),
)
PRIMITIVES = ("decrypt", "verify", "update", "finalize", "b64decode", "sub", "split", "parsebytes")


@contextmanager
def step_timers() -> Iterator[dict[str, float]]:
    """Wrap every STEPS function so that its exclusive time adds up in the yielded dict (label -> seconds)."""
    spent: dict[str, float] = {label: 0.0 for _, _, label in STEPS}
    stack: list[float] = []  # time spent in timed callees of each active call

    def timed(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                elapsed = time.perf_counter() - t0
                inner = stack.pop()
                spent[label] += elapsed - inner
                if stack:
                    stack[-1] += elapsed
        return wrapper

    originals = [(module, name, getattr(module, name)) for module, name, _ in STEPS]
    try:
        for (module, name, label), (_, _, fn) in zip(STEPS, originals, strict=True):
            setattr(module, name, timed(fn, label))
        yield spent
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


def stages(inst: instance.Instance, args: argparse.Namespace) -> None:
    cfg = config.load(inst.config)
    identity, roots = smime_parts(cfg)
    assert identity is not None
    directory = load_directory(cfg.partners_file)
    max_bytes = cfg.https.max_body_bytes
    n: int = args.stages
    raws = build_messages(keys_of(inst), range(n), args.size, args.cipher)
    now = datetime.now(UTC)

    def open_all() -> float:
        t0 = time.perf_counter()
        for raw in raws:
            smime.authenticate(smime.open_message(raw, identity, max_bytes), directory, roots, None, now)
        return (time.perf_counter() - t0) / n

    open_all()  # warm caches (asn1crypto, cryptography, regexes)
    plain = open_all()
    with step_timers() as spent:
        timed = open_all()
    print(f"{n} messages of {sum(map(len, raws)) // n} bytes ({args.cipher}), in one process without load: "
          f"smime.open_message + smime.authenticate take {plain * 1000:.2f} ms per message "
          f"({timed * 1000:.2f} with the step timers); exclusive ms per message:")
    for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {seconds * 1000 / n:7.3f}  {label}")

    # The C primitives inside (cProfile's count of a long C call is accurate; it inflates Python code).
    profile = cProfile.Profile()
    profile.enable()
    open_all()
    profile.disable()
    print("C primitives (cProfile, own ms per message, calls per message):")
    entries = pstats.Stats(profile).stats.items()  # type: ignore[attr-defined]
    for (_file, line, name), (_cc, calls, own, _cum, _callers) in sorted(entries, key=lambda kv: -kv[1][2]):
        if line == 0 and any(f"'{p}'" in name or f".{p}" in name for p in PRIMITIVES) and own * 1000 / n >= 0.005:
            print(f"  {own * 1000 / n:7.3f}  {calls / n:5.1f}x  {name}"[:150])


# --- main ----------------------------------------------------------------------------------------------

def quantiles(values: list[float]) -> tuple[float, float, float]:
    values = sorted(values)
    q = statistics.quantiles(values, n=100)
    return q[49], q[98], values[-1]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--size", type=int, default=20_000, help="approximate invoice size in bytes")
    ap.add_argument("--cipher", choices=CIPHERS, default="aes-256-gcm", help="content encryption of every message")
    ap.add_argument("--no-rules", action="store_true", help="register the partner with no business rules")
    ap.add_argument("--new-session-per-message", action="store_true",
                    help="connect, EHLO, STARTTLS and QUIT for every message (--messages-per-session 1)")
    ap.add_argument("--messages-per-session", type=int, default=0, metavar="N",
                    help="QUIT and reconnect after N messages (default 0: one session per client for the whole run)")
    ap.add_argument("--workers", type=int, default=0, help="https.workers (0: one per core)")
    ap.add_argument("--rules-processes", type=int, default=2, help="rules.processes (per worker)")
    ap.add_argument("--stages", type=int, metavar="N", help="no daemon: time the steps of opening N messages, then exit")
    args = ap.parse_args()
    per_session = 1 if args.new_session_per_message else args.messages_per_session

    with tempfile.TemporaryDirectory(prefix="egw-bench-smtp-") as tmp:
        port = free_port()
        inst = instance.init(Path(tmp) / "gw", port=port)
        if args.stages:
            stages(inst, args)
            return
        configure(inst, args)
        t0 = time.perf_counter()
        messages = build_messages(keys_of(inst), range(args.warmup + args.count + 1), args.size, args.cipher)
        print(f"built {len(messages)} messages in {time.perf_counter() - t0:.1f} s")
        openssl_check(inst, messages[0], Path(tmp))
        log_file = Path(tmp) / "gateway.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        with log_file.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "-c", str(inst.config)], env=env,
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            started = await wait_started(log_file, proc)
            ctx = client_context(inst.ca.cert)
            sanity = await drive(started.smtp_port, ctx, messages[:1], 1, 1)
            if sanity.failures:
                raise SystemExit(f"the gateway refused the sanity message: {sanity.failures[0]}")
            print(f"sanity: the gateway answered 250 to one message ({sanity.latencies[0] * 1000:.0f} ms); "
                  f"SMTP port {started.smtp_port}, {started.listening} workers listening")
            warm = await drive(started.smtp_port, ctx, messages[1:args.warmup + 1], args.concurrency, per_session)
            pids = tree_pids(proc.pid)
            before = await stage_seconds(started.admin_url)
            cpu0, each0, mine0 = cpu_seconds(pids), cpu_each(pids), os.times()
            load = await drive(started.smtp_port, ctx, messages[args.warmup + 1:], args.concurrency, per_session)
            cpu, mine = cpu_seconds(pids) - cpu0, os.times()
            client_cpu = mine.user + mine.system - mine0.user - mine0.system
            each = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(each0, cpu_each(pids), strict=True)]
            names = labels(pids)
            after = await stage_seconds(started.admin_url)
            rss = peak_rss_mib(pids)
            expected = 1 + args.warmup + args.count - len(warm.failures) - len(load.failures)
            deadline = time.monotonic() + DELIVERY_WAIT_S
            while delivered(inst.delivery_folder) < expected and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            in_folder, folder_wait = delivered(inst.delivery_folder), time.perf_counter() - load.last
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)

    accepted = len(load.latencies)
    wall = load.last - load.first
    p50, p99, worst = quantiles(load.latencies)
    print(f"messages: {args.count} x {sum(map(len, messages)) // len(messages)} bytes (invoice ~{args.size} bytes, "
          f"signed RSA-2048/SHA-256, encrypted {args.cipher} + RSA-OAEP), rules "
          f"{'off' if args.no_rules else 'on (en16931)'}, workers {args.workers or os.cpu_count()} x "
          f"{args.rules_processes} rules process(es), concurrency {args.concurrency}, "
          f"{f'a new session every {per_session} message(s)' if per_session else 'one session per client'} "
          f"({load.sessions} sessions), cores {os.cpu_count()}")
    print(f"throughput: {accepted / wall:.0f} invoices/s ({accepted} accepted in {wall:.1f} s)")
    print(f"latency MAIL..250: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    if len(load.session_setup) > 1:
        s50, s99, _ = quantiles(load.session_setup)
        print(f"session setup (connect, EHLO, STARTTLS, EHLO): p50 {s50 * 1000:.1f} ms, p99 {s99 * 1000:.1f} ms")
    print(f"failures: {len(load.failures)} (warm-up: {len(warm.failures)})")
    for failure in (warm.failures + load.failures)[:SHOW_FAILURES]:
        print(f"  {failure[:300]}")
    print(f"server CPU: {cpu * 1000 / args.count:.2f} ms per invoice (load generator: {client_cpu * 1000 / args.count:.2f} ms)")
    print(f"server CPU by process, user + system s: "
          f"{', '.join(f'{name} {u:.1f} + {k:.1f}' for name, (u, k) in zip(names, each, strict=True))}")
    print(f"peak RSS (MiB): {', '.join(f'{name} {r:.0f}' for name, r in zip(names, rss, strict=True))}")
    if after:
        means = []
        for stage, (total, count) in after.items():
            t, c = before.get(stage, (0.0, 0.0))
            if count > c:
                means.append(f"{stage} {(total - t) * 1000 / (count - c):.2f}")
        print(f"pipeline stages, mean wall ms under load: {', '.join(means)}")
    verdict = "all delivered" if in_folder >= expected else "NOT all delivered"
    print(f"delivery folder: {in_folder} of {expected} invoices (sanity + warm-up + timed) as .xml, "
          f"{folder_wait:.1f} s after the last 250: {verdict}")
    if load.failures or in_folder < expected:
        raise SystemExit(1)


if __name__ == "__main__":
    asyncio.run(main())
