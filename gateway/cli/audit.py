"""``einvoice-gateway audit …``: verify the hash chain and its signed checkpoints, export a range, seal now, list."""

from __future__ import annotations

import argparse
import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config.load import load
from ..config.model import Config
from ..errors import ConfigError
from ..model import stamp
from ..operations import audit as audit_mod
from ..operations.audit import trusted_certificates, unsealed_limit
from ..stages.signature import SigningKey
from .common import count, opened, when, with_config, with_json
from .errors import Refused, UsageError
from .output import Column, listing, print_json


def add_parsers(sub: Any) -> None:
    a = sub.add_parser("audit", help="the tamper-evident audit log")
    asub = a.add_subparsers(dest="action", required=True)
    av = with_config(asub.add_parser("verify", help="check the hash chain and the signed checkpoints"))
    av.add_argument("--file", help="verify an export (audit export) instead of the live log")
    with_json(av, "the report")
    ae = with_config(asub.add_parser("export", help="write a range of records (JSON lines) for an auditor"))
    ae.add_argument("--from-seq", type=int, help="first record (default: the first)")
    ae.add_argument("--to-seq", type=int, help="last record (default: the last)")
    ae.add_argument("--since", type=stamp_of, help="records from this time on (YYYY-MM-DD or an RFC 3339 time, UTC)")
    ae.add_argument("--until", type=stamp_of, help="records before this time")
    ae.add_argument("-o", "--output", required=True, help="file to write (refused if it exists)")
    with_config(asub.add_parser("checkpoint", help="sign the chain's head now (the daemon does it periodically)"))
    al = with_config(asub.add_parser("list", help="the newest records"))
    al.add_argument("--limit", type=count, default=50, help="how many (default 50)")
    with_json(al)


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_audit(load(args.config), args))


async def _audit(cfg: Config, args: argparse.Namespace) -> int:
    async with opened(cfg) as store:
        if args.action == "verify":
            trusted = trusted_certificates(cfg)
            if args.file:
                header, records, seal_problem = read_export(Path(args.file), trusted)
                if seal_problem is not None:  # changed after the console sealed it: a failed check, like a broken chain
                    if args.json:
                        print_json({"ok": False, "records": len(records),
                                    "problem": {"seq": None, "kind": "seal", "message": seal_problem}})
                    else:
                        print(f"audit export FAILED (seal): {seal_problem}")
                    return 1
                report = audit_mod.verify(records, trusted, starts_at_genesis=header.get("first_seq") in (None, 1))
            else:
                report = audit_mod.verify(await audit_mod.read_chain(store.audit), trusted,
                                          max_unsealed_s=unsealed_limit(cfg))
            if args.json:
                print_json(report.as_dict())
            elif report.ok:
                print(f"audit log OK: {report.records} record(s) {report.first_seq}…{report.last_seq}, "
                      f"{report.checkpoints} signed checkpoint(s)")
            else:
                assert report.problem is not None
                print(f"audit log FAILED at record {report.problem.seq} ({report.problem.kind}): {report.problem.message}")
            for note in report.notes if not args.json else ():
                print(f"note: {note}")
            return 0 if report.ok else 1
        if args.action == "export":
            out = Path(args.output)
            if out.exists():
                raise Refused(f"-o: {out} exists; choose a new file name (an export is never overwritten)")
            records = await audit_mod.read_chain(store.audit, args.from_seq, args.to_seq, args.since, args.until)
            with open(out, "x", encoding="utf-8") as fh:
                fh.write(audit_mod.export_text(records, datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")))
            print(f"{len(records)} record(s) written to {out}; check it with: einvoice-gateway audit verify --file {out}")
            return 0
        if args.action == "checkpoint":
            if cfg.signing is None:
                raise ConfigError("signing: audit checkpoints are signed with the [signing] key, which is not configured")
            signer = SigningKey.load(cfg.signing.certificate.read_bytes(), cfg.signing.private_key.read_bytes())
            seq = await store.audit.checkpoint(lambda s, h: audit_mod.checkpoint_detail(signer, s, h))
            print(f"checkpoint {seq} written" if seq else "the head is already a checkpoint")
            return 0
        rows = await store.audit.newest(args.limit)
        return listing(rows, args.json, RECORDS, "the audit log is empty",
                       lambda r: r.as_json() | {"detail": json.loads(r.detail)})


RECORDS: list[Column[Any]] = [
    ("seq", lambda r: r.seq), ("at", lambda r: r.at), ("actor", lambda r: r.actor), ("action", lambda r: r.action),
    ("partner", lambda r: r.partner), ("message id", lambda r: r.message_id)]


def stamp_of(text: str) -> str:
    """An argparse type: ``when``, as the audit log writes times."""
    return stamp(when(text))


def read_export(path: Path, trusted: list[Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]], str | None]:
    """The header and records of an export, and what is wrong with its seal if it has one (from the console)."""
    try:
        data = path.read_bytes()
        lines = data.decode("utf-8").splitlines()
        header = json.loads(lines[0])
        records = [json.loads(line) for line in lines[1:] if line.strip()]
    except (OSError, UnicodeDecodeError, IndexError, ValueError) as exc:
        raise UsageError(f"--file: {path} is not an audit export ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != audit_mod.EXPORT_FORMAT:
        raise UsageError(f"--file: {path} does not start with an {audit_mod.EXPORT_FORMAT} header")
    if records and isinstance(records[-1], dict) and records[-1].get("format") == audit_mod.SEAL_FORMAT:
        seal = records.pop()
        body = data[:data.rstrip(b"\n").rfind(b"\n") + 1]
        return header, records, audit_mod.check_seal(body, seal, trusted or [])
    return header, records, None
