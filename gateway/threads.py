"""A thread pool whose threads can be replaced by fresh ones; threads named for the operating system too.

What a thread holds for its whole life goes when it ends: lxml interns every element and attribute
name it parses in a dictionary per thread that never shrinks, so a stream of documents with ever new
names would grow a long-lived thread without bound.  ``renew`` sends new work to fresh threads; the old
ones finish what they are running and end.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

PR_SET_NAME = 15  # prctl(2): set the calling thread's name (what /proc/<pid>/task/<tid>/comm shows)
OS_NAME_BYTES = 15  # the kernel keeps 16 bytes, the last one a NUL


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def name_os_thread() -> None:
    """Give the calling thread's name to the operating system, so that ``top -H``, ``ps -L`` and
    benchmarks/throughput.py tell the gateway's threads apart (Python before 3.14 leaves every thread
    named after the process).  Linux only; elsewhere, and if it fails, nothing happens."""
    if sys.platform != "linux":
        return
    name = threading.current_thread().name.encode("ascii", "replace")[:OS_NAME_BYTES]
    try:
        _libc().prctl(PR_SET_NAME, ctypes.c_char_p(name), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def named_pool(max_workers: int, thread_name_prefix: str) -> ThreadPoolExecutor:
    """A thread pool whose threads carry ``<prefix>_<n>`` for the operating system as well."""
    return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=thread_name_prefix, initializer=name_os_thread)


class RenewableThreads(Executor):
    def __init__(self, max_workers: int, thread_name_prefix: str):
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._lock = threading.Lock()
        self._pool = self._fresh()
        self.renewals = 0

    def _fresh(self) -> ThreadPoolExecutor:
        return named_pool(self._max_workers, self._prefix)

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
