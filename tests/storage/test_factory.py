"""gateway/storage/factory.py: the one place a storage backend is chosen (today SQLite, always).

``open_store(config)`` opens, creating or migrating it, the store in the configuration's
``state_dir`` — that folder, private to the service, and no other; a state written by a newer
gateway is refused with a ConfigError naming ``state_dir``.  ``snapshots(config)`` is the backup
side of the same backend: it finds the live state ``open_store`` made and copies and inspects it.
There is no backend setting yet, so there is no unknown backend to refuse.  What a store does,
method by method, is tests/storage/test_base_contract.py.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import stat
from pathlib import Path

import pytest

from gateway.config import load as config_mod
from gateway.config.model import Config
from gateway.errors import ConfigError, GatewayError
from gateway.operations import instance
from gateway.storage.factory import open_store, snapshots


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Config:
    inst = instance.init(tmp_path_factory.mktemp("factory") / "gw", port=0)
    return config_mod.load(inst.config)


@pytest.fixture
def config(loaded: Config, tmp_path: Path) -> Config:
    """The instance's configuration with a state folder of this test's own (not created yet)."""
    return dataclasses.replace(loaded, state_dir=tmp_path / "var" / "state")


async def test_the_store_is_made_in_the_configured_state_folder_and_private(config: Config) -> None:
    store = open_store(config)
    try:
        assert all(hasattr(store, part) for part in ("intake", "outbox", "quarantine", "audit", "keys", "reports",
                                                     "accounts", "approvals", "retention"))
        assert (await store.reports.counts())["invoices"] == 0
    finally:
        await store.close()
    assert mode(config.state_dir) == 0o700
    files = sorted(p.name for p in config.state_dir.iterdir())
    assert "gateway.db" in files and all(f.startswith("gateway.db") for f in files)  # the database (and its WAL), nothing else
    assert mode(config.state_dir / "gateway.db") == 0o600
    assert sorted(p.name for p in config.state_dir.parent.parent.iterdir()) == ["var"]  # nothing beside it


async def test_the_state_is_the_folders(config: Config, tmp_path: Path) -> None:
    """Opened again from the same configuration, a store reads what was written; another state folder does not."""
    first = open_store(config)
    await first.audit.append("pytest", "test.written", None, None, {"n": 1})
    await first.close()

    again = open_store(config)
    elsewhere = open_store(dataclasses.replace(config, state_dir=tmp_path / "other"))
    try:
        assert [r.action for r in await again.audit.newest(10)] == ["test.written"]
        assert await elsewhere.audit.newest(10) == []
    finally:
        await again.close()
        await elsewhere.close()


async def test_a_state_written_by_a_newer_gateway_is_refused(config: Config) -> None:
    store = open_store(config)
    await store.close()
    db = config.state_dir / "gateway.db"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '999' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(ConfigError) as err:
        open_store(config)
    assert err.value.message.startswith("state_dir: the database has schema 999, newer than this gateway")
    assert "run the newer version" in err.value.message
    with sqlite3.connect(db) as conn:  # left as it was, for the newer gateway
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("999",)
    conn.close()


async def test_snapshots_find_copy_and_inspect_what_open_store_made(config: Config, tmp_path: Path) -> None:
    copies = snapshots(config)
    assert copies.live(config.state_dir) is None  # no state yet: nothing to back up
    store = open_store(config)
    try:
        for i in range(3):
            await store.audit.append("pytest", "test.written", None, None, {"n": i})
        assert copies.live(config.state_dir) == config.state_dir / copies.files[0]

        folder = tmp_path / "backup"
        folder.mkdir()
        for name in copies.files:  # as gateway/operations/backup.py prepares them
            (folder / name).touch(mode=0o600)
        copies.snapshot(config.state_dir, folder)  # while the store is open
    finally:
        await store.close()
    problems, facts = copies.inspect(folder)
    assert problems == []
    assert facts["schema_version"] == copies.schema_version  # the backend's newest schema is what open_store wrote
    assert facts["counts"]["audit"] == 3 and facts["last_audit_seq"] == 3
    assert facts["counts"]["invoices"] == 0 and list(copies.sealed(folder)) == []


@pytest.mark.parametrize("damage", ["state_dir is a file", "gateway.db is not a database"])
def test_an_unusable_state_folder_is_a_gateway_error(config: Config, damage: str) -> None:
    if damage == "state_dir is a file":
        config.state_dir.parent.mkdir(parents=True)
        config.state_dir.write_text("not a folder")
    else:
        config.state_dir.mkdir(parents=True)
        (config.state_dir / "gateway.db").write_bytes(b"not a database " * 100)
    with pytest.raises(GatewayError) as err:
        open_store(config)
    assert "state_dir" in err.value.message
