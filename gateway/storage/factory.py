"""The one place a storage backend is chosen (today: SQLite in the instance's state folder)."""

from __future__ import annotations

from ..config.model import Config
from .base import Snapshots, Store
from .sqlite.backup import SqliteSnapshots
from .sqlite.store import SqliteStore


def open_store(config: Config) -> Store:
    """Open (creating or migrating) the instance's store."""
    return SqliteStore(config.state_dir)


def snapshots(config: Config | None = None) -> Snapshots:
    """How backups copy, check and restore the instance's state (a restore onto a new machine has no
    configuration yet: the backup brings it)."""
    return SqliteSnapshots()
