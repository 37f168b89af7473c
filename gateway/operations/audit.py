"""The tamper-evident audit log: a hash chain with signed checkpoints.

Every record carries the SHA-256 of the record before it (``prev``) and its own hash over its
sequence number, time, actor, action, partner, message id, detail and ``prev``.  Editing a record
changes its hash; removing, inserting or reordering records breaks the link of the next one.  An
attacker who can write the database could recompute the whole chain, so every
``checkpoint_interval_s`` the gateway appends a checkpoint record: the sequence number and hash of
the chain's head, signed with the gateway's signing key.  A rewritten chain no longer matches the
signed head hashes.  Records after the last checkpoint are protected by the chain only (their
removal from the tail is visible only against a later checkpoint or an earlier export).

Records never hold invoice content: ids, codes, hashes and who did what.  This module does no I/O;
the store appends records in the caller's transaction and ``verify`` checks a sequence of them
(from the database or from an ``audit export`` file).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509

from ..config.model import Config
from ..stages.signature import SigningKey, verify_raw_signature
from ..storage.base import AuditLog
from ..storage.chain import CHECKPOINT, FIELDS, GENESIS, record_hash
from ..tls import spki_sha256

EXPORT_FORMAT = "einvoice-gateway-audit/1"


async def read_chain(log: AuditLog, first: int | None = None, last: int | None = None, since: str | None = None,
                     until: str | None = None) -> list[dict[str, Any]]:
    """Records ``first``..``last`` (or by time) in chain order, as ``verify`` and ``export_text`` read them."""
    return [r.as_chain() async for r in log.records(first, last, since, until)]


def checkpoint_statement(through_seq: int, head_hash: str) -> bytes:
    """What a checkpoint signs: the head it vouches for, in a form no other signature of the gateway takes."""
    return f"einvoice-gateway audit checkpoint\nthrough {through_seq}\nhead {head_hash}\n".encode()


def checkpoint_detail(signer: SigningKey, through_seq: int, head_hash: str) -> dict[str, Any]:
    return {"through_seq": through_seq, "head": head_hash, "signer_spki": spki_sha256(signer.cert),
            "algorithm": signer.method.name, "signature": base64.b64encode(
                signer.raw_signature(checkpoint_statement(through_seq, head_hash))).decode()}


@dataclass(frozen=True, slots=True)
class Problem:
    seq: int
    kind: str  # edited | removed | inserted | reordered | checkpoint
    message: str


@dataclass
class Report:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    last_checkpoint: int | None = None  # seq of the last record a valid checkpoint vouches for
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "first_seq": self.first_seq, "last_seq": self.last_seq,
                "checkpoints": self.checkpoints, "last_checkpoint": self.last_checkpoint,
                "problem": None if self.problem is None else
                {"seq": self.problem.seq, "kind": self.problem.kind, "message": self.problem.message},
                "notes": self.notes}


def _classify(records: Sequence[dict[str, Any]], i: int, hashes: list[str]) -> Problem:
    """Record i does not link to record i-1: say what most likely happened, naming the first record concerned."""
    r, prev = records[i], records[i - 1]
    later = {h: j for j, h in enumerate(hashes)}
    j = later.get(r["prev"])
    if j is not None and j < i - 1:  # i links to an earlier record: what lies between was put there
        if r["seq"] == records[j]["seq"] + 1 or prev["seq"] != r["seq"] - 1:
            return Problem(records[j + 1]["seq"], "inserted",
                           f"record {records[j + 1]['seq']} is not part of the chain (inserted); record {r['seq']} "
                           f"follows record {records[j]['seq']}")
        return Problem(prev["seq"], "reordered", f"record {prev['seq']} is out of order (record {r['seq']} "
                       f"follows record {records[j]['seq']})")
    if j is not None and j > i:
        return Problem(min(r["seq"], records[j]["seq"]), "reordered", f"records around {prev['seq']} and {r['seq']} are out of order "
                       f"(record {r['seq']} follows record {records[j]['seq']})")
    if r["seq"] > prev["seq"] + 1:
        gap = f"{prev['seq'] + 1}" if r["seq"] == prev["seq"] + 2 else f"{prev['seq'] + 1}–{r['seq'] - 1}"
        return Problem(prev["seq"] + 1, "removed", f"record(s) {gap} were removed (record {r['seq']} does not "
                       f"follow record {prev['seq']})")
    if r["seq"] <= prev["seq"]:
        return Problem(r["seq"], "reordered", f"record {r['seq']} comes after record {prev['seq']}")
    return Problem(r["seq"], "removed", f"the record that record {r['seq']} follows is missing or was replaced")


MAX_RENUMBERED = 8  # an edited record is checked for a shifted seq (records inserted before it) up to this far


def verify(records: Iterable[dict[str, Any]], trusted: Sequence[x509.Certificate], *,
           starts_at_genesis: bool = True, max_unsealed_s: float | None = None, now: datetime | None = None) -> Report:
    """Check a run of records in storage order; stop at the first problem.

    ``trusted``: the certificates whose keys may sign checkpoints (the current signing certificate
    and any earlier ones named in ``audit.trusted_certificates``).  ``starts_at_genesis`` False for
    an export that begins mid-chain (its first ``prev`` cannot be checked).  ``max_unsealed_s``: a
    record older than this must be covered by a later checkpoint — the gateway writes one every
    ``audit.checkpoint_interval_s``, so a log whose checkpoints were deleted (and its chain redone)
    is caught.
    """
    keys = {spki_sha256(c): c for c in trusted}
    rs = list(records)
    report = Report(records=len(rs))
    if not rs:
        return report
    report.first_seq, report.last_seq = rs[0]["seq"], rs[-1]["seq"]
    hashes = [str(r.get("hash", "")) for r in rs]
    by_seq = {r["seq"]: k for k, r in enumerate(rs)}
    for i, r in enumerate(rs):
        report.problem = _link(rs, i, hashes, starts_at_genesis)
        if report.problem is None and r["action"] == CHECKPOINT:
            report.problem = _check_point(r, rs, by_seq, keys)
            if report.problem is None:
                report.checkpoints += 1
                report.last_checkpoint = int(_detail(r)["through_seq"])
        if report.problem is not None:
            return report
    covered = report.last_checkpoint if report.last_checkpoint is not None else rs[0]["seq"] - 1
    unsealed = [r for r in rs if r["seq"] > covered and r["action"] != CHECKPOINT]
    if unsealed and max_unsealed_s is not None:
        oldest = datetime.fromisoformat(unsealed[0]["at"].replace("Z", "+00:00"))
        if ((now or datetime.now(UTC)) - oldest).total_seconds() > max_unsealed_s:
            report.problem = Problem(unsealed[0]["seq"], "checkpoint", f"record {unsealed[0]['seq']} and those after it "
                                     f"are older than {max_unsealed_s:.0f} s and no signed checkpoint covers them "
                                     "(checkpoints were removed, or the gateway has not run since)")
            return report
    if report.last_checkpoint is None:
        report.notes.append("no signed checkpoint in this range: the chain is consistent, but a rewrite of the whole "
                            "range would not be detected")
    elif unsealed:
        report.notes.append(f"records after {report.last_checkpoint} are chained but not yet covered by a signed "
                            "checkpoint")
    return report


def _link(rs: Sequence[dict[str, Any]], i: int, hashes: list[str], starts_at_genesis: bool) -> Problem | None:
    """Is record i intact, and does it follow record i-1?"""
    r = rs[i]
    if record_hash(r) != r.get("hash"):
        for d in range(1, MAX_RENUMBERED + 1):  # intact but renumbered: d records were put before it
            if record_hash(r | {"seq": r["seq"] - d}) == r.get("hash"):
                return Problem(r["seq"] - d, "inserted", f"record {r['seq'] - d} is not part of the chain (inserted); "
                               f"the records after it were renumbered")
        return Problem(r["seq"], "edited", f"record {r['seq']} was changed after it was written "
                       "(its content does not match its hash)")
    if i == 0:
        if starts_at_genesis and (r["prev"] != GENESIS or r["seq"] != 1):
            lost = f"1–{r['seq'] - 1}" if r["seq"] > 2 else "1"
            return Problem(1, "removed", f"the log does not start with the first record (records {lost} were removed)")
        return None
    prev = rs[i - 1]
    if r["prev"] != prev["hash"]:
        return _classify(rs, i, hashes)
    if r["seq"] != prev["seq"] + 1:  # a chain redone over a gap: the signed checkpoints decide, but say it here
        return Problem(prev["seq"] + 1, "removed", f"record {prev['seq'] + 1} is missing (record {r['seq']} follows "
                       f"record {prev['seq']})")
    return None


def _detail(r: dict[str, Any]) -> dict[str, Any]:
    d = r["detail"]
    out = json.loads(d) if isinstance(d, str) else d
    if not isinstance(out, dict):
        raise ValueError("detail is not an object")
    return out


def _check_point(r: dict[str, Any], rs: Sequence[dict[str, Any]], by_seq: dict[int, int],
                 keys: dict[str, x509.Certificate]) -> Problem | None:
    seq = r["seq"]
    try:
        d = _detail(r)
        through, head, spki = int(d["through_seq"]), str(d["head"]), str(d["signer_spki"])
        signature = base64.b64decode(d["signature"], validate=True)
    except (KeyError, ValueError, TypeError):
        return Problem(seq, "checkpoint", f"checkpoint {seq} is malformed")
    cert = keys.get(spki)
    if cert is None:
        return Problem(seq, "checkpoint", f"checkpoint {seq} is signed by a key that is not trusted (SPKI SHA-256 "
                       f"{spki}); add its certificate to audit.trusted_certificates if it is an earlier gateway key")
    if not verify_raw_signature(cert, checkpoint_statement(through, head), signature):
        return Problem(seq, "checkpoint", f"checkpoint {seq} has an invalid signature")
    k = by_seq.get(through)
    if k is None and rs[0]["seq"] <= through < seq:
        return Problem(through, "removed", f"record {through}, which checkpoint {seq} signed, is missing")
    if k is not None and rs[k]["hash"] != head:
        return Problem(through, "edited", f"the chain up to record {through} differs from what checkpoint {seq} signed "
                       "(the log was rewritten)")
    return None


def export_header(first: int | None, last: int | None, exported_at: str) -> dict[str, Any]:
    return {"format": EXPORT_FORMAT, "first_seq": first, "last_seq": last, "exported_at": exported_at,
            "fields": list(FIELDS) + ["hash"]}


def export_text(records: Sequence[dict[str, Any]], exported_at: str) -> str:
    """An export: the header line, then one JSON line per record (the CLI's file, the console's download)."""
    header = export_header(records[0]["seq"] if records else None, records[-1]["seq"] if records else None, exported_at)
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in [header, *records])


SEAL_FORMAT = "einvoice-gateway-audit-seal/1"


def _seal_statement(digest: str) -> bytes:
    return f"einvoice-gateway audit export\nsha256 {digest}\n".encode()


def export_seal(signer: SigningKey, body: bytes) -> dict[str, Any]:
    """The last line of a signed export: the gateway's signature over the SHA-256 of every line before
    it, so a range handed to an outside auditor cannot be trimmed or edited unnoticed."""
    digest = hashlib.sha256(body).hexdigest()
    return {"format": SEAL_FORMAT, "sha256": digest, "signer_spki": spki_sha256(signer.cert),
            "algorithm": signer.method.name,
            "signature": base64.b64encode(signer.raw_signature(_seal_statement(digest))).decode()}


def check_seal(body: bytes, seal: dict[str, Any], trusted: Sequence[x509.Certificate]) -> str | None:
    """None when ``seal`` signs ``body`` with a trusted key, else what is wrong."""
    digest = hashlib.sha256(body).hexdigest()
    if seal.get("sha256") != digest:
        return "the export's content differs from what its seal signed (lines were edited, added or removed)"
    cert = next((c for c in trusted if spki_sha256(c) == seal.get("signer_spki")), None)
    if cert is None:
        return f"the export is sealed by a key that is not trusted (SPKI SHA-256 {seal.get('signer_spki')})"
    try:
        signature = base64.b64decode(str(seal.get("signature", "")), validate=True)
    except ValueError:
        return "the export's seal is not base64"
    if not verify_raw_signature(cert, _seal_statement(digest), signature):
        return "the export's seal has an invalid signature"
    return None


# --- what an instance trusts, and sealing from the CLI ---------------------------------------------

def trusted_certificates(cfg: Config) -> list[x509.Certificate]:
    """The certificates whose audit checkpoints and export seals are accepted: the current signing key's
    and the earlier ones of audit.trusted_certificates."""
    paths = ([cfg.signing.certificate] if cfg.signing else []) + list(cfg.operations.audit_trusted)
    return [x509.load_pem_x509_certificate(p.read_bytes()) for p in paths]


def unsealed_limit(cfg: Config) -> float | None:
    """The daemon seals the head every checkpoint_interval_s; a longer unsealed stretch means
    checkpoints were removed (allowing for one missed interval and a slow shutdown)."""
    return 2 * cfg.operations.audit_checkpoint_s + 120 if cfg.signing else None


def signer_of(cfg: Config) -> SigningKey | None:
    if cfg.signing is None:
        return None
    return SigningKey.load(cfg.signing.certificate.read_bytes(), cfg.signing.private_key.read_bytes())


async def seal(cfg: Config, log: AuditLog) -> None:
    """A signed checkpoint over the audit chain's head, now (a change made from the CLI is sealed at once:
    the daemon may be stopped)."""
    signer = signer_of(cfg)
    if signer is not None:
        await log.checkpoint(lambda seq, head: checkpoint_detail(signer, seq, head))


async def record(cfg: Config, log: AuditLog, actor: str, action: str, partner: str | None, detail: dict[str, Any]) -> None:
    """An administrative audit record, sealed at once by a signed checkpoint."""
    await log.append(actor, action, partner, None, detail)
    await seal(cfg, log)
