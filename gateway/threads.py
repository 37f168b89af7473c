"""A thread pool whose threads can be replaced by fresh ones.

What a thread holds for its whole life goes when it ends: lxml interns every element and attribute
name it parses in a dictionary per thread that never shrinks, so a stream of documents with ever new
names would grow a long-lived thread without bound.  ``renew`` sends new work to fresh threads; the old
ones finish what they are running and end.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


class RenewableThreads(Executor):
    def __init__(self, max_workers: int, thread_name_prefix: str):
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._pool = self._fresh()
        self.renewals = 0

    def _fresh(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix=self._prefix)

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        with self._lock:  # never to a pool that a renewal has just shut down
            return self._pool.submit(fn, *args, **kwargs)

    def renew(self) -> None:
        """New work runs on fresh threads; the current ones end after the work they already have."""
        with self._lock:
            old, self._pool = self._pool, self._fresh()
            self.renewals += 1
            old.shutdown(wait=False)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            pool = self._pool
        pool.shutdown(wait=wait, cancel_futures=cancel_futures)
