"""RenewableThreads: work after a renewal runs on fresh threads; work already running finishes."""

from __future__ import annotations

import threading

import pytest

from gateway.threads import RenewableThreads


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
