"""The embedded default backend: every piece of state in one SQLite database in ``state_dir``."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ..base import (
    AccountStore,
    ApprovalStore,
    AuditLog,
    IntakeStore,
    KeyStore,
    OutboxStore,
    QuarantineStore,
    Reports,
    RetentionStore,
)
from .accounts import SqliteAccounts
from .approvals import SqliteApprovals
from .audit import SqliteAuditLog
from .engine import Engine
from .intake import SqliteIntake
from .keys import SqliteKeys
from .outbox import SqliteOutbox
from .quarantine import SqliteQuarantine
from .reports import SqliteReports
from .retention import SqliteRetention


class SqliteStore:
    """Opening creates the database (or migrates an older one) before anything is read."""

    def __init__(self, state_dir: Path):
        self.engine = Engine(state_dir)
        self.path = self.engine.path
        self.intake: IntakeStore = SqliteIntake(self.engine)
        self.outbox: OutboxStore = SqliteOutbox(self.engine)
        self.quarantine: QuarantineStore = SqliteQuarantine(self.engine)
        self.audit: AuditLog = SqliteAuditLog(self.engine)
        self.keys: KeyStore = SqliteKeys(self.engine)
        self.reports: Reports = SqliteReports(self.engine)
        self.accounts: AccountStore = SqliteAccounts(self.engine)
        self.approvals: ApprovalStore = SqliteApprovals(self.engine)
        self.retention: RetentionStore = SqliteRetention(self.engine)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.close)
