"""gateway/operations/audit.py: a real instance's hash chain, its signed checkpoints, exports, and tampering.

``audited`` is a real instance run once per session (tests/helpers/audit.py: mutual-TLS listener, delivery
loop): five invoices accepted and delivered, one malformed body rejected, an ``audit checkpoint`` from the
CLI between them, the daemon's own checkpoint when it stops, and one operator record after that.  Each test
works on its own copy of that stopped instance and tampers with the copy's database through sqlite3, as an
attacker with write access to the state folder would; ``audit verify`` (CLI, or ``gateway.operations.audit.verify``
on the rows) must name the first record tampered with.  The ``audit`` commands' own behaviour (listing,
refusing to overwrite an export, refusing a file that is not one) is tested in tests/cli/test_audit.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway import devpki
from gateway.operations import audit, instance
from gateway.stages.signature import SigningKey
from gateway.storage.sqlite.schema import SCHEMA_VERSION
from gateway.storage.sqlite.store import SqliteStore
from tests.helpers import run_command
from tests.helpers.audit import CANARY, FIELDS, MALFORMED, WAIT_S, Populated, State, copy_of

# --- the populated instance -------------------------------------------------------------------------


@pytest.fixture
def state(audited: Populated, tmp_path: Path) -> State:
    return copy_of(audited, tmp_path)


def verify_cli(capsys: pytest.CaptureFixture[str], state: State, *extra: str) -> tuple[int, dict[str, Any]]:
    code, out, err = run_command(capsys, "audit", "verify", "--json", *extra, "-c", state.config)
    assert code in (0, 1), err
    report: dict[str, Any] = json.loads(out)
    assert report["ok"] is (code == 0)
    return code, report


def failed_at(capsys: pytest.CaptureFixture[str], state: State) -> dict[str, Any]:
    """The problem ``audit verify`` reports (CLI, JSON), checked against ``gateway.operations.audit.verify`` on the rows."""
    code, report = verify_cli(capsys, state)
    assert code == 1 and report["problem"], report
    direct = state.verify()
    assert direct.problem is not None
    assert (direct.problem.seq, direct.problem.kind) == (report["problem"]["seq"], report["problem"]["kind"])
    problem: dict[str, Any] = report["problem"]
    return problem


# --- sqlite3 tampering ---------------------------------------------------------------------------------


def rechain(conn: sqlite3.Connection, start: int = 1) -> None:
    """Recompute ``prev`` and ``hash`` of every record from ``start`` on: the chain is consistent again."""
    rows = [dict(zip(FIELDS, r, strict=True)) for r in conn.execute(f"SELECT {', '.join(FIELDS)} FROM audit ORDER BY seq")]
    prev = audit.GENESIS
    for r in rows:
        if r["seq"] >= start:
            r["prev"] = prev
            r["hash"] = audit.record_hash(r)
            conn.execute("UPDATE audit SET prev = ?, hash = ? WHERE seq = ?", (r["prev"], r["hash"], r["seq"]))
        prev = r["hash"]


def renumber_from(conn: sqlite3.Connection, seq: int, by: int) -> None:
    """Shift the seq of every record from ``seq`` on by ``by`` (in two steps: seq is the primary key)."""
    conn.execute("UPDATE audit SET seq = -(seq + ?) WHERE seq >= ?", (by, seq))
    conn.execute("UPDATE audit SET seq = -seq WHERE seq < 0")


def forged(prev: dict[str, Any], seq: int, **fields: Any) -> dict[str, Any]:
    """A plausible record chained to ``prev``, with a correct hash of its own (anyone can compute one)."""
    record = {"seq": seq, "at": prev["at"], "actor": "gateway", "action": "invoice.accepted", "partner": instance.DEMO_PARTNER,
              "message_id": str(uuid.uuid4()), "detail": json.dumps({"sha256": "0" * 64, "size": 1}, sort_keys=True),
              "prev": prev["hash"]} | fields
    return record | {"hash": audit.record_hash(record)}


def insert(conn: sqlite3.Connection, record: dict[str, Any]) -> None:
    conn.execute(f"INSERT INTO audit ({', '.join(FIELDS)}) VALUES ({', '.join('?' * len(FIELDS))})",
                 tuple(record[f] for f in FIELDS))


def other_signer(state: State) -> tuple[SigningKey, devpki.Issued]:
    """A signing key from the instance's own CA that is not the configured one (so not trusted by default)."""
    ca = devpki.Issued(state.root / "pki" / "ca.crt", state.root / "pki" / "ca.key")
    issued = devpki.issue(ca, state.root / "pki", "other-signing", role="signing")
    return SigningKey.load(issued.cert.read_bytes(), issued.key.read_bytes()), issued


# --- the live log --------------------------------------------------------------------------------------


def test_the_live_log_verifies_and_records_what_happened(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_command(capsys, "audit", "verify", "-c", state.config)
    rows = state.rows()
    assert code == 0, out + err
    assert out.startswith(f"audit log OK: {len(rows)} record(s) 1…{len(rows)}, 2 signed checkpoint(s)"), out
    # The last record came after the daemon's final checkpoint: the operator is told it is only chained.
    assert f"note: records after {len(rows) - 2} are chained but not yet covered by a signed checkpoint" in out

    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["prev"] == audit.GENESIS
    assert all(r["prev"] == p["hash"] for p, r in zip(rows, rows[1:], strict=False))
    by_action: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_action.setdefault(r["action"], []).append(r)
    accepted, delivered = by_action["invoice.accepted"], by_action["delivery.delivered"]
    assert [r["message_id"] for r in accepted] == state.ids
    assert sorted(r["message_id"] for r in delivered) == sorted(state.ids)
    assert all(r["actor"] == "gateway" and r["partner"] == instance.DEMO_PARTNER for r in accepted + delivered)
    assert all(json.loads(r["detail"])["destination"] == "erp-inbox" for r in delivered)
    for r in accepted:
        d = json.loads(r["detail"])
        assert set(d) == {"sha256", "document_type", "size", "key_id", "destinations", "held"}
        assert d["document_type"] == "ubl:Invoice" and d["destinations"] == ["erp-inbox"] and d["held"] is False

    [rejected] = by_action["invoice.rejected"]
    assert rejected["partner"] == instance.DEMO_PARTNER and rejected["message_id"] is None
    assert json.loads(rejected["detail"]) == {"code": "MALFORMED_XML", "transport": "https",
                                              "sha256": hashlib.sha256(MALFORMED).hexdigest()}

    first, last = by_action["audit.checkpoint"]
    for cp in (first, last):
        d = json.loads(cp["detail"])
        assert cp["actor"] == "gateway" and d["through_seq"] == cp["seq"] - 1
        assert d["head"] == rows[cp["seq"] - 2]["hash"]
    # The operator's checkpoint came after the first three deliveries, the daemon's when it stopped.
    assert json.loads(first["detail"])["through_seq"] >= max(r["seq"] for r in delivered[:3])
    assert last["seq"] == len(rows) - 1 and rows[-1]["action"] == "operator.note" and rows[-1]["actor"] == "pytest"

    code, report = verify_cli(capsys, state)
    assert code == 0 and report == {
        "ok": True, "records": len(rows), "first_seq": 1, "last_seq": len(rows), "checkpoints": 2,
        "last_checkpoint": len(rows) - 2, "problem": None,
        "notes": [f"records after {len(rows) - 2} are chained but not yet covered by a signed checkpoint"]}


def test_no_audit_record_holds_invoice_content(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # The premise: the canary invoice was accepted and delivered, and the rejected body carried it too.
    assert CANARY in (state.root / "outbox" / f"{state.ids[2]}.xml").read_text()
    for r in state.rows():
        assert all(CANARY not in str(v) for v in r.values()), r
    with contextlib.closing(sqlite3.connect(state.db)) as conn:
        assert conn.execute("SELECT count(*) FROM audit WHERE instr(detail, ?) OR instr(actor || action, ?)",
                            (CANARY, CANARY)).fetchone() == (0,)
    code, out, _ = run_command(capsys, "audit", "list", "--json", "--limit", "1000", "-c", state.config)
    assert code == 0 and CANARY not in out and len(json.loads(out)) == len(state.rows())
    assert run_command(capsys, "audit", "export", "-o", str(tmp_path / "all.jsonl"), "-c", state.config)[0] == 0
    assert CANARY not in (tmp_path / "all.jsonl").read_text()


def test_a_checkpoint_over_a_checkpoint_is_not_written(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_command(capsys, "audit", "checkpoint", "-c", state.config)
    n = len(state.rows())
    assert code == 0 and out.strip() == f"checkpoint {n} written"
    code, out, _ = run_command(capsys, "audit", "checkpoint", "-c", state.config)
    assert code == 0 and out.strip() == "the head is already a checkpoint" and len(state.rows()) == n
    code, report = verify_cli(capsys, state)
    assert code == 0 and report["checkpoints"] == 3 and report["last_checkpoint"] == n - 1 and report["notes"] == []


async def test_records_written_by_the_cli_and_the_daemon_at_once_stay_one_chain(tmp_path: Path) -> None:
    """Two processes' writers (here: two stores on one database) append concurrently; the chain stays linear."""
    stores = [SqliteStore(tmp_path / "state") for _ in range(2)]
    try:
        async def write(i: int) -> None:  # each store's own writer thread commits its records
            for n in range(40):
                await asyncio.wait_for(stores[i].audit.append(f"writer-{i}", "test.note", None, None, {"n": n}), WAIT_S)

        await asyncio.gather(write(0), write(1))
        rows = await audit.read_chain(stores[0].audit)
    finally:
        for s in stores:
            await s.close()
    assert [r["seq"] for r in rows] == list(range(1, 81))
    report = audit.verify(rows, [])
    assert report.ok and report.records == 80, report.problem


# --- tampering with the database -------------------------------------------------------------------------


@pytest.mark.parametrize("column, value", [
    ("detail", '{"code": "SCHEMA_INVALID", "sha256": "00", "transport": "https"}'),
    ("actor", "someone-else"),
    ("at", "2020-01-01T00:00:00.000000Z"),
    ("message_id", "00000000-0000-0000-0000-000000000000"),
])
def test_an_edited_record_is_reported_at_its_seq(state: State, capsys: pytest.CaptureFixture[str], column: str, value: str) -> None:
    k = state.seq("invoice.rejected")
    state.tamper(lambda conn: conn.execute(f"UPDATE audit SET {column} = ? WHERE seq = ?", (value, k)))
    problem = failed_at(capsys, state)
    assert (problem["seq"], problem["kind"]) == (k, "edited"), problem
    code, out, _ = run_command(capsys, "audit", "verify", "-c", state.config)
    assert code == 1 and out.startswith(f"audit log FAILED at record {k} (edited): "), out


def test_an_edited_hash_is_reported_at_its_seq(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    k = state.seq("delivery.delivered", 1)
    state.tamper(lambda conn: conn.execute("UPDATE audit SET hash = ? WHERE seq = ?", ("f" * 64, k)))
    problem = failed_at(capsys, state)
    assert (problem["seq"], problem["kind"]) == (k, "edited"), problem


@pytest.mark.parametrize("which", ["invoice.rejected", "audit.checkpoint"])
def test_a_removed_record_is_reported_at_its_seq(state: State, capsys: pytest.CaptureFixture[str], which: str) -> None:
    k = state.seq(which)
    state.tamper(lambda conn: conn.execute("DELETE FROM audit WHERE seq = ?", (k,)))
    problem = failed_at(capsys, state)
    assert (problem["seq"], problem["kind"]) == (k, "removed"), problem
    assert f"record(s) {k} were removed" in problem["message"]


def test_removed_records_are_reported_from_the_first_of_them(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    state.tamper(lambda conn: conn.execute("DELETE FROM audit WHERE seq IN (4, 5, 6)"))
    problem = failed_at(capsys, state)
    assert (problem["seq"], problem["kind"]) == (4, "removed") and "4–6" in problem["message"], problem


def test_records_removed_from_the_start_are_reported_from_seq_1(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    state.tamper(lambda conn: conn.execute("DELETE FROM audit WHERE seq IN (1, 2)"))
    problem = failed_at(capsys, state)
    assert (problem["seq"], problem["kind"]) == (1, "removed"), problem


def test_records_removed_from_the_start_are_detected(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    state.tamper(lambda conn: conn.execute("DELETE FROM audit WHERE seq IN (1, 2)"))
    problem = failed_at(capsys, state)
    assert problem["kind"] == "removed" and problem["seq"] in (1, 3), problem
    assert "does not start with the first record" in problem["message"]


def insert_renumbered(state: State) -> int:
    """A forged record put before the rejected one, the records after it renumbered (seq is an integer key)."""
    k = state.seq("invoice.rejected")
    prev = state.rows()[k - 2]

    def change(conn: sqlite3.Connection) -> None:
        renumber_from(conn, k, 1)
        insert(conn, forged(prev, k))

    state.tamper(change)
    return k


def test_an_inserted_record_is_detected(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    k = insert_renumbered(state)
    problem = failed_at(capsys, state)
    # The forged record itself is well-formed and linked; what breaks is the renumbered record after it.
    assert problem["seq"] in (k, k + 1) and problem["kind"] in ("inserted", "edited"), problem


def test_an_inserted_record_is_reported_as_inserted_at_its_seq(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    k = insert_renumbered(state)
    problem = failed_at(capsys, state)
    assert (problem["seq"], problem["kind"]) == (k, "inserted"), problem


@pytest.mark.parametrize("gap", [1, 2])
def test_swapped_records_are_reported_at_the_first_of_them(state: State, capsys: pytest.CaptureFixture[str], gap: int) -> None:
    a = state.seq("invoice.accepted", 1)
    b = a + gap

    def change(conn: sqlite3.Connection) -> None:  # the contents change places; each keeps its seq
        conn.execute("UPDATE audit SET seq = -1 WHERE seq = ?", (a,))
        conn.execute("UPDATE audit SET seq = ? WHERE seq = ?", (a, b))
        conn.execute("UPDATE audit SET seq = ? WHERE seq = -1", (b,))

    state.tamper(change)
    problem = failed_at(capsys, state)
    assert problem["seq"] == a and problem["kind"] in ("reordered", "edited"), problem


def test_swapped_records_with_their_own_hashes_redone_are_reported_at_the_first_of_them(
        state: State, capsys: pytest.CaptureFixture[str]) -> None:
    """The attacker swaps two records and recomputes each one's hash over its new seq (but not the chain)."""
    a = state.seq("invoice.accepted", 1)
    rows = {r["seq"]: r for r in state.rows()}

    def change(conn: sqlite3.Connection) -> None:
        for seq, source in ((a, rows[a + 1]), (a + 1, rows[a])):
            record = source | {"seq": seq}
            conn.execute("UPDATE audit SET at = ?, actor = ?, action = ?, partner = ?, message_id = ?, detail = ?, prev = ?, "
                         "hash = ? WHERE seq = ?", (*(record[f] for f in FIELDS[1:8]), audit.record_hash(record), seq))

    state.tamper(change)
    problem = failed_at(capsys, state)
    assert problem["seq"] == a and problem["kind"] in ("reordered", "removed"), problem


# --- a rewritten chain, and the signed checkpoints --------------------------------------------------------


def test_a_consistently_rewritten_chain_is_caught_by_the_checkpoint_over_its_head(state: State,
                                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cp = state.seq("audit.checkpoint")
    head = cp - 1  # the record the operator's checkpoint vouches for

    def change(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE audit SET actor = 'nobody' WHERE seq = ?", (head,))
        rechain(conn, head)

    state.tamper(change)
    rows = state.rows()
    assert all(audit.record_hash(r) == r["hash"] for r in rows)  # the premise: every link holds again
    problem = failed_at(capsys, state)
    assert (problem["seq"], problem["kind"]) == (head, "edited"), problem
    assert f"checkpoint {cp} signed" in problem["message"]


def test_a_rewrite_before_a_checkpoint_is_caught_by_that_checkpoint(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    """Only a chain's head is signed: the rewrite is found, and the range it is in (1…head) is named."""
    k = state.seq("invoice.rejected")
    cp = state.seq("audit.checkpoint")
    assert k < cp - 1

    def change(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE audit SET detail = ? WHERE seq = ?", ('{"code": "OK"}', k))
        rechain(conn, k)

    state.tamper(change)
    problem = failed_at(capsys, state)
    assert problem["kind"] == "edited" and problem["seq"] == cp - 1, problem
    assert f"the chain up to record {cp - 1} differs from what checkpoint {cp} signed" in problem["message"]


def test_a_rewrite_after_the_first_checkpoint_is_caught_by_the_next(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    first, last = state.seq("audit.checkpoint"), state.seq("audit.checkpoint", 1)
    k = first + 1

    def change(conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM audit WHERE seq = ?", (k,))  # removed, the rest renumbered and re-chained
        renumber_from(conn, k + 1, -1)
        rechain(conn, k)

    state.tamper(change)
    problem = failed_at(capsys, state)
    # The daemon's checkpoint (now at last - 1) signed the head through last - 1, which is now another record.
    assert problem["kind"] == "edited" and problem["seq"] == last - 1 and f"checkpoint {last - 1} signed" in problem["message"]


def rewrite_without_checkpointed_heads(state: State) -> int:
    """Edit a record, delete the record each checkpoint vouches for (its head), re-chain the rest: no seq is renumbered."""
    k = state.seq("invoice.rejected")
    heads = [r["seq"] - 1 for r in state.rows() if r["action"] == audit.CHECKPOINT]
    assert len(heads) == 2 and k < heads[0]

    def change(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE audit SET detail = ? WHERE seq = ?", ('{"code": "OK"}', k))
        conn.executemany("DELETE FROM audit WHERE seq = ?", [(h,) for h in heads])
        rechain(conn, k)

    state.tamper(change)
    rows = state.rows()
    assert all(audit.record_hash(r) == r["hash"] for r in rows)  # the premise: every link holds again
    assert all(r["prev"] == p["hash"] for p, r in zip(rows, rows[1:], strict=False))
    return heads[0]


def test_a_rewrite_that_deletes_the_checkpointed_heads_is_caught(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    head = rewrite_without_checkpointed_heads(state)
    problem = failed_at(capsys, state)
    assert problem["seq"] <= head and problem["kind"] in ("removed", "edited", "checkpoint"), problem


def test_a_checkpoint_signed_by_an_untrusted_key_is_reported(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    signer, _ = other_signer(state)
    cp = state.seq("audit.checkpoint")
    head = state.rows()[cp - 2]

    def change(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE audit SET detail = ? WHERE seq = ?",
                     (json.dumps(audit.checkpoint_detail(signer, head["seq"], head["hash"]), sort_keys=True), cp))
        rechain(conn, cp)

    state.tamper(change)
    problem = failed_at(capsys, state)
    assert (problem["seq"], problem["kind"]) == (cp, "checkpoint") and "not trusted" in problem["message"], problem


def test_an_earlier_signing_key_named_in_trusted_certificates_is_accepted(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint signed by another key (say, before the signing key was replaced) verifies once the operator
    lists that key's certificate in audit.trusted_certificates, and is refused before."""
    signer, issued = other_signer(state)
    last = state.rows()[-1]
    record = forged(last, last["seq"] + 1, action=audit.CHECKPOINT, partner=None, message_id=None,
                    detail=json.dumps(audit.checkpoint_detail(signer, last["seq"], last["hash"]), sort_keys=True))
    state.tamper(lambda conn: insert(conn, record))
    assert verify_cli(capsys, state)[1]["problem"]["kind"] == "checkpoint"
    config = Path(state.config)
    text = config.read_text()
    assert text.count("trusted_certificates = []") == 1
    config.write_text(text.replace("trusted_certificates = []", f"trusted_certificates = [{str(issued.cert)!r}]"))
    code, report = verify_cli(capsys, state)
    assert code == 0 and report["checkpoints"] == 3 and report["last_checkpoint"] == last["seq"] and not report["notes"], report


def test_a_rewrite_with_re_signed_checkpoints_is_caught_by_the_signer(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    """The attacker edits a record, rewrites the chain and signs every checkpoint again with a key of their own."""
    signer, _ = other_signer(state)
    k = state.seq("invoice.rejected")

    def change(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE audit SET detail = ? WHERE seq = ?", ('{"code": "OK"}', k))
        rechain(conn, k)
        for (cp,) in conn.execute("SELECT seq FROM audit WHERE action = 'audit.checkpoint' ORDER BY seq").fetchall():
            h = conn.execute("SELECT hash FROM audit WHERE seq = ?", (cp - 1,)).fetchone()[0]
            conn.execute("UPDATE audit SET detail = ? WHERE seq = ?",
                         (json.dumps(audit.checkpoint_detail(signer, cp - 1, h), sort_keys=True), cp))
            rechain(conn, cp)

    state.tamper(change)
    problem = failed_at(capsys, state)
    assert (problem["seq"], problem["kind"]) == (state.seq("audit.checkpoint"), "checkpoint"), problem


def test_a_checkpoint_whose_signature_does_not_match_is_reported(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    cp = state.seq("audit.checkpoint")
    rows = state.rows()
    detail = json.loads(rows[cp - 1]["detail"])
    other = json.loads(rows[state.seq("audit.checkpoint", 1) - 1]["detail"])
    detail["signature"] = other["signature"]  # a genuine signature, of another head

    def change(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE audit SET detail = ? WHERE seq = ?", (json.dumps(detail, sort_keys=True), cp))
        rechain(conn, cp)

    state.tamper(change)
    problem = failed_at(capsys, state)
    assert (problem["seq"], problem["kind"]) == (cp, "checkpoint") and "invalid signature" in problem["message"], problem


def test_a_forged_checkpoint_appended_at_the_end_is_reported(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    signer, _ = other_signer(state)
    last = state.rows()[-1]
    record = forged(last, last["seq"] + 1, action=audit.CHECKPOINT, partner=None, message_id=None,
                    detail=json.dumps(audit.checkpoint_detail(signer, last["seq"], last["hash"]), sort_keys=True))
    state.tamper(lambda conn: insert(conn, record))
    problem = failed_at(capsys, state)
    assert (problem["seq"], problem["kind"]) == (last["seq"] + 1, "checkpoint"), problem


# --- exports -------------------------------------------------------------------------------------------


def export(capsys: pytest.CaptureFixture[str], state: State, out: Path, *extra: str) -> list[str]:
    code, text, err = run_command(capsys, "audit", "export", "-o", str(out), *extra, "-c", state.config)
    assert code == 0, err
    lines = out.read_text(encoding="utf-8").splitlines()
    assert text.startswith(f"{len(lines) - 1} record(s) written to {out}")
    return lines


def verify_file(capsys: pytest.CaptureFixture[str], state: State, path: Path) -> tuple[int, str]:
    code, out, err = run_command(capsys, "audit", "verify", "--file", str(path), "-c", state.config)
    assert code in (0, 1), err
    return code, out


def test_an_export_verifies_on_its_own(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    lines = export(capsys, state, out)
    header = json.loads(lines[0])
    rows = state.rows()
    assert header["format"] == audit.EXPORT_FORMAT and (header["first_seq"], header["last_seq"]) == (1, len(rows))
    assert header["fields"] == list(FIELDS)
    assert [json.loads(line) for line in lines[1:]] == rows
    code, text = verify_file(capsys, state, out)
    assert code == 0 and text.startswith(f"audit log OK: {len(rows)} record(s) 1…{len(rows)}, 2 signed checkpoint(s)"), text
    # The live database is no longer needed: the export verifies with only the configuration's certificates.
    shutil.rmtree(state.root / "state")
    assert verify_file(capsys, state, out)[0] == 0


def test_an_edited_line_of_an_export_is_reported(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    lines = export(capsys, state, out)
    k = state.seq("invoice.rejected")
    record = json.loads(lines[k])
    assert record["seq"] == k
    record["detail"] = record["detail"].replace("MALFORMED_XML", "RULES_FAILED")
    lines[k] = json.dumps(record)
    out.write_text("\n".join(lines) + "\n")
    code, text = verify_file(capsys, state, out)
    assert code == 1 and text.startswith(f"audit log FAILED at record {k} (edited)"), text


def test_a_removed_line_of_an_export_is_reported(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    lines = export(capsys, state, out)
    k = state.seq("invoice.rejected")
    out.write_text("\n".join(lines[:k] + lines[k + 1:]) + "\n")
    code, text = verify_file(capsys, state, out)
    assert code == 1 and text.startswith(f"audit log FAILED at record {k} (removed)"), text


def test_a_line_inserted_into_an_export_is_reported(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    lines = export(capsys, state, out)
    k = state.seq("invoice.rejected")
    line = json.dumps(forged(json.loads(lines[k - 1]), k))  # takes k's place in the file, chained to k - 1
    out.write_text("\n".join([*lines[:k], line, *lines[k:]]) + "\n")
    code, text = verify_file(capsys, state, out)
    assert code == 1 and text.startswith(f"audit log FAILED at record {k} (inserted)"), text


def test_swapped_lines_of_an_export_are_reported_at_the_first_of_them(state: State, capsys: pytest.CaptureFixture[str],
                                                                     tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    lines = export(capsys, state, out)
    k = state.seq("invoice.rejected")
    lines[k], lines[k + 1] = lines[k + 1], lines[k]
    out.write_text("\n".join(lines) + "\n")
    code, text = verify_file(capsys, state, out)
    assert code == 1 and text.startswith(f"audit log FAILED at record {k} (reordered)"), text


def test_swapped_lines_of_an_export_are_detected(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    lines = export(capsys, state, out)
    k = state.seq("invoice.rejected")
    lines[k], lines[k + 1] = lines[k + 1], lines[k]
    out.write_text("\n".join(lines) + "\n")
    code, text = verify_file(capsys, state, out)
    assert code == 1 and "(reordered)" in text, text


def test_a_partial_export_verifies(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    n = len(state.rows())
    for name, extra, first, last in (("from3", ("--from-seq", "3"), 3, n), ("mid", ("--from-seq", "3", "--to-seq", "8"), 3, 8),
                                     ("to5", ("--to-seq", "5"), 1, 5)):
        out = tmp_path / f"{name}.jsonl"
        lines = export(capsys, state, out, *extra)
        header = json.loads(lines[0])
        assert (header["first_seq"], header["last_seq"]) == (first, last) and len(lines) == last - first + 2
        code, text = verify_file(capsys, state, out)
        assert code == 0 and text.startswith(f"audit log OK: {last - first + 1} record(s) {first}…{last}"), (name, text)
    # A partial export is still checked inside: an edited line is found.
    out = tmp_path / "from3.jsonl"
    lines = out.read_text().splitlines()
    record = json.loads(lines[3])
    record["actor"] = "nobody"
    lines[3] = json.dumps(record)
    out.write_text("\n".join(lines) + "\n")
    code, text = verify_file(capsys, state, out)
    assert code == 1 and text.startswith(f"audit log FAILED at record {record['seq']} (edited)"), text


def test_an_export_whose_first_line_was_removed_is_reported(state: State, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    lines = export(capsys, state, out)
    out.write_text("\n".join([lines[0], *lines[2:]]) + "\n")  # the header still says it starts at 1
    code, text = verify_file(capsys, state, out)
    assert code == 1 and "(removed)" in text, text


# --- schema 4 → 5 -----------------------------------------------------------------------------------


def downgrade_to_schema_4(db: Path) -> None:
    """What a schema-4 database looks like: audit records without prev and hash."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("ALTER TABLE audit DROP COLUMN hash")
        conn.execute("ALTER TABLE audit DROP COLUMN prev")
        conn.execute("UPDATE meta SET value = '4' WHERE key = 'schema_version'")
        conn.commit()
        assert [r[1] for r in conn.execute("PRAGMA table_info(audit)")] == list(FIELDS[:7])


async def test_an_unchained_schema_4_log_is_chained_when_opened(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    store = SqliteStore(folder)
    try:
        for n in range(5):
            await store.audit.append(f"op-{n}", "test.note", "acme" if n % 2 else None, None, {"n": n, "text": "ü"})
    finally:
        await store.close()
    downgrade_to_schema_4(folder / "gateway.db")
    with contextlib.closing(sqlite3.connect(folder / "gateway.db")) as conn:
        before = conn.execute("SELECT seq, at, actor, action, partner, message_id, detail FROM audit ORDER BY seq").fetchall()

    store = SqliteStore(folder)
    try:
        rows = await audit.read_chain(store.audit)
        assert [tuple(r[f] for f in FIELDS[:7]) for r in rows] == before  # nothing but the chain was added
        assert rows[0]["prev"] == audit.GENESIS and all(r["hash"] for r in rows)
        report = audit.verify(rows, [])
        assert report.ok and report.records == 5 and report.checkpoints == 0, report.problem
        await store.audit.append("op", "test.note", None, None, {"n": 5})  # new records join the chain
        rows = await audit.read_chain(store.audit)
        assert rows[-1]["prev"] == rows[-2]["hash"] and audit.verify(rows, []).ok
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(folder / "gateway.db")) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)


def test_a_migrated_instance_verifies_with_the_cli_and_takes_checkpoints(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    """A whole instance's log, unchained (schema 4), then opened by the CLI: chained again, identically."""
    original = state.rows()
    downgrade_to_schema_4(state.db)
    code, report = verify_cli(capsys, state)
    assert code == 0 and report["records"] == len(original), report
    assert state.rows() == original  # the same content in the same order hashes to the same chain
    code, out, _ = run_command(capsys, "audit", "checkpoint", "-c", state.config)
    assert code == 0 and out.strip() == f"checkpoint {len(original) + 1} written"
    assert verify_cli(capsys, state)[1]["checkpoints"] == 3
