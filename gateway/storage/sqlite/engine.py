"""The SQLite engine: one writer thread with group commit, reader threads, and the async face of both.

SQLite in WAL mode with ``synchronous=FULL``: a commit returns only after the WAL is fsynced.  Every
write is an operation (a function of a connection) queued to the one writer thread, which commits
whatever has queued up while the previous fsync ran (group commit): one fsync covers many
invoices, and an invoice, its index row and its delivery jobs become durable in one transaction.
Each operation runs in a savepoint, so one refused operation (a duplicate conflict) spares the
others of its batch.  Reads run on a small pool of reader threads, each with its own connection.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from ...errors import ConfigError, GatewayError, StorageUnavailable
from ...threads import name_os_thread
from . import schema

T = TypeVar("T")
Op = Callable[[sqlite3.Connection], T]

DB_FILE = "gateway.db"
MAX_BATCH = 256  # operations per group commit
BUSY_TIMEOUT_MS = 30_000  # other processes (CLI, other workers) holding the write lock
# The writer waits for another process's write lock in short steps of its own: SQLite's busy
# handler sleeps up to 100 ms per step, which would show in every acknowledgement's latency.
LOCK_RETRY_MIN_S = 0.0002
LOCK_RETRY_MAX_S = 0.002
READER_THREADS = 2  # status reads, reports and the outbox's polls; never queued behind the writer


class Engine:
    def __init__(self, state_dir: Path):
        self.path = state_dir / DB_FILE
        self._local = threading.local()
        self._queue: queue.SimpleQueue[tuple[Op[Any], Future[Any]] | None] = queue.SimpleQueue()
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            conn = self.connect()
            try:
                schema.migrate(conn, begin)
            finally:
                conn.close()
        except (OSError, sqlite3.Error) as exc:
            cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(f"state_dir: cannot open the database {self.path}: {cause}") from None
        self._readers = ThreadPoolExecutor(max_workers=READER_THREADS, thread_name_prefix="store-read",
                                           initializer=self._open_reader)
        self._reader_conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, name="store-writer", daemon=True)
        self._writer.start()

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA secure_delete=ON")
        self.path.chmod(0o600)
        return conn

    # --- reads -------------------------------------------------------------------------------------

    def _open_reader(self) -> None:
        name_os_thread()
        conn = self.connect()
        self._local.conn = conn
        with self._conns_lock:
            self._reader_conns.append(conn)

    async def read(self, fn: Op[T]) -> T:
        """Run ``fn`` on a reader thread's connection (it sees what was committed)."""
        return await asyncio.get_running_loop().run_in_executor(self._readers, self._read, fn)

    def _read(self, fn: Op[T]) -> T:
        return fn(self._local.conn)

    # --- writes: group commit ---------------------------------------------------------------------

    async def write(self, op: Op[T]) -> T:
        """Run ``op`` in a write transaction; returns once it is durable (or raises what it raised:
        a GatewayError fails this operation alone, anything else fails its whole batch as
        StorageUnavailable)."""
        return await asyncio.wrap_future(self.submit(op))

    def submit(self, op: Op[T]) -> Future[T]:
        fut: Future[T] = Future()
        if not self._writer.is_alive():
            fut.set_exception(StorageUnavailable("the store is closed"))
        else:
            self._queue.put((op, fut))
        return fut

    def _write_loop(self) -> None:
        name_os_thread()
        conn = self.connect()
        conn.execute("PRAGMA busy_timeout=0")  # begin() waits for the lock itself
        while True:
            item = self._queue.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            # A running future can no longer be cancelled by its waiter; one cancelled while queued
            # (the request went away) is dropped: nobody was told it was stored.
            batch = [(op, fut) for op, fut in batch if fut.set_running_or_notify_cancel()]
            if batch:
                self._commit(conn, batch)
        conn.close()

    @staticmethod
    def _commit(conn: sqlite3.Connection, batch: list[tuple[Op[Any], Future[Any]]]) -> None:
        outcomes: list[tuple[bool, Any]] = []
        try:
            begin(conn)
            for op, _ in batch:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op(conn)))
                    conn.execute("RELEASE op")
                except GatewayError as exc:  # a permanent verdict for this one operation only
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except Exception as exc:  # sqlite3.Error, or a bug in an operation: fail the batch, keep the writer
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            error = StorageUnavailable("the invoice could not be stored durably; retry later")
            error.__cause__ = exc
            for _, fut in batch:
                fut.set_exception(error)
            return
        for (ok, value), (_, fut) in zip(outcomes, batch, strict=True):
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def close(self) -> None:
        """Finish what was queued, then close every connection."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
        self._readers.shutdown(wait=True)
        with self._conns_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()


def begin(conn: sqlite3.Connection) -> None:
    """BEGIN IMMEDIATE, waiting for another process's write lock in short steps."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = LOCK_RETRY_MIN_S
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            return
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, LOCK_RETRY_MAX_S)
