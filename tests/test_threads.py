"""RenewableThreads: work after a renewal runs on fresh threads; work already running finishes."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from gateway.threads import RenewableThreads, name_os_thread, named_pool


def test_after_a_renewal_work_runs_on_fresh_threads_and_the_old_ones_end() -> None:
    pool = RenewableThreads(2, "t")
    try:
        before = {pool.submit(threading.get_ident).result() for _ in range(8)}
        old_threads = [t for t in threading.enumerate() if t.name.startswith("t_")]
        pool.renew()
        after = {pool.submit(threading.get_ident).result() for _ in range(8)}
        assert before and after and not before & after
        for t in old_threads:
            t.join(timeout=5)
            assert not t.is_alive()
    finally:
        pool.shutdown()


def test_work_running_during_a_renewal_finishes() -> None:
    pool = RenewableThreads(1, "t")
    started, go = threading.Event(), threading.Event()

    def slow() -> str:
        started.set()
        assert go.wait(5)
        return "done"

    try:
        running = pool.submit(slow)
        assert started.wait(5)
        pool.renew()
        fresh = pool.submit(lambda: "fresh")
        assert fresh.result(timeout=5) == "fresh"  # not queued behind the old thread's work
        go.set()
        assert running.result(timeout=5) == "done"
    finally:
        pool.shutdown()


def test_after_shutdown_nothing_more_is_taken() -> None:
    pool = RenewableThreads(1, "t")
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(lambda: None)


def os_name(thread_id: int) -> str:
    return Path(f"/proc/{os.getpid()}/task/{thread_id}/comm").read_text().strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names for the OS: Linux only")
def test_pool_threads_carry_their_name_for_the_operating_system() -> None:
    """What top -H and benchmarks/throughput.py read: the pool's name, cut to the kernel's 15 bytes."""
    pool = RenewableThreads(1, "stage")
    try:
        assert os_name(pool.submit(threading.get_native_id).result()) == "stage_0"
        pool.renew()
        assert os_name(pool.submit(threading.get_native_id).result()) == "stage_0"
    finally:
        pool.shutdown()
    with named_pool(1, "a-very-long-pool-name") as other:
        assert os_name(other.submit(threading.get_native_id).result()) == "a-very-long-poo"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names for the OS: Linux only")
def test_a_thread_names_itself_for_the_operating_system() -> None:
    seen: list[str] = []

    def run() -> None:
        name_os_thread()
        seen.append(os_name(threading.get_native_id()))

    t = threading.Thread(target=run, name="store-writer")
    t.start()
    t.join(5)
    assert seen == ["store-writer"]
    assert os_name(threading.get_native_id()) != "store-writer"  # only the calling thread
