"""The store the SQLite tests open: a fresh one in the test's own directory, closed after."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.storage.sqlite.store import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state")
    try:
        yield s
    finally:
        await s.close()
