"""The audit log of a real instance: five invoices accepted and delivered by a running gateway, a
malformed one refused, checkpoints by the CLI and the daemon, one record after the last.  Made once
per session (the ``audited`` fixture in tests/conftest.py); a test tampers with its own ``copy_of`` it."""

from __future__ import annotations

import contextlib
import io
import shutil
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from gateway.cli.demo import SAMPLE
from gateway.operations import audit, instance
from gateway.storage.sqlite.store import SqliteStore
from tests.helpers import eventually, post, run_cli, serving
from tests.helpers import numbered as shared_numbered

CANARY = "AUDITCANARY-3f9d20c1b7e4"
NOTE = b"<cbc:Note>Sample invoice shipped with einvoice-gateway.</cbc:Note>"
assert SAMPLE.count(NOTE) == 1
# Not well-formed, and the parser's error names the canary element: the rejection carries body content.
MALFORMED = SAMPLE.replace(NOTE, f"<{CANARY}>".encode())
WAIT_S = 15.0
FIELDS = ("seq", "at", "actor", "action", "partner", "message_id", "detail", "prev", "hash")


def numbered(n: int, note: str | None = None) -> bytes:
    doc = shared_numbered(f"AUDIT-{n:04d}")
    return doc.replace(NOTE, f"<cbc:Note>{note}</cbc:Note>".encode()) if note else doc


@dataclass(frozen=True)
class Populated:
    root: Path
    ids: list[str]  # accepted message ids, in order; ids[2] carries the canary


async def populate(inst: instance.Instance) -> list[str]:
    """Five invoices accepted and delivered by the running instance, one malformed body rejected, an ``audit
    checkpoint`` from the CLI between them, the daemon's own checkpoint when it stops, and one operator record
    after that."""
    ids: list[str] = []
    async with serving(inst, "warning") as running:
        store = running.gw.store

        async def post_and_deliver(*bodies: bytes, rejected: bytes | None = None) -> None:
            async with running.session() as s:
                for body in bodies:
                    sent = await post(s, body)
                    assert sent.status == 202, sent.text
                    ids.append(sent.json["message_id"])
                    if rejected is not None and len(ids) == 2:
                        refused = await post(s, rejected)
                        text = refused.text
                        assert refused.status == 400 and "MALFORMED_XML" in text and CANARY in text, text

            async def all_delivered() -> bool:
                return await store.reports.counts() == {"invoices": len(ids), "deliveries_delivered": len(ids)}

            await eventually(all_delivered, f"{len(ids)} invoices delivered", WAIT_S)

        await post_and_deliver(numbered(1), numbered(2), numbered(3, CANARY), rejected=MALFORMED)
        with contextlib.redirect_stdout(io.StringIO()) as out:  # the operator's checkpoint, beside the daemon
            # (the command runs an event loop of its own: in a thread, as another process would)
            assert await run_cli("audit", "checkpoint", "-c", str(inst.config)) == 0
        assert out.getvalue().startswith("checkpoint ")
        await post_and_deliver(numbered(4), numbered(5))
    # The daemon signed the head when it stopped; one more record is chained but not yet checkpointed.
    store = SqliteStore(inst.state_dir)
    try:
        await store.audit.append("pytest", "operator.note", None, None, {"why": "after the last checkpoint"})
    finally:
        await store.close()
    return ids


@dataclass(frozen=True)
class State:
    root: Path
    ids: list[str]

    @property
    def config(self) -> str:
        return str(self.root / "config.toml")

    @property
    def db(self) -> Path:
        return self.root / "state" / "gateway.db"

    def rows(self) -> list[dict[str, Any]]:
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            return [dict(zip(FIELDS, r, strict=True)) for r in conn.execute(f"SELECT {', '.join(FIELDS)} FROM audit ORDER BY seq")]

    def seq(self, action: str, nth: int = 0) -> int:
        return [r["seq"] for r in self.rows() if r["action"] == action][nth]

    def trusted(self) -> list[x509.Certificate]:
        return [x509.load_pem_x509_certificate((self.root / "pki" / "signing.crt").read_bytes())]

    def verify(self) -> audit.Report:
        return audit.verify(self.rows(), self.trusted())

    def tamper(self, change: Callable[[sqlite3.Connection], None]) -> None:
        with contextlib.closing(sqlite3.connect(self.db)) as conn:
            change(conn)
            conn.commit()


def copy_of(populated: Populated, tmp_path: Path) -> State:
    """A test's own copy of the populated instance, free to tamper with."""
    root = tmp_path / "gw"
    shutil.copytree(populated.root, root)
    return State(root, populated.ids)
