"""KeyedExecutor: one job at a time per key, in order; others in parallel."""

from __future__ import annotations

import threading
import time

from worker.consume.dispatch import KeyedExecutor


def test_jobs_with_one_key_run_one_at_a_time_in_order() -> None:
    executor = KeyedExecutor(8)
    order: list[int] = []
    running = 0
    overlap = False
    lock = threading.Lock()
    done = threading.Event()

    def job(n: int) -> None:
        nonlocal running, overlap
        with lock:
            running += 1
            overlap = overlap or running > 1
        time.sleep(0.002)
        with lock:
            running -= 1
            order.append(n)
            if len(order) == 20:
                done.set()

    for n in range(20):
        executor.submit("call-1", lambda n=n: job(n))
    assert done.wait(10)
    executor.shutdown(wait=True)
    assert order == list(range(20)) and not overlap


def test_other_keys_do_not_wait_behind_a_slow_key() -> None:
    executor = KeyedExecutor(4)
    release = threading.Event()
    fast_done = threading.Event()
    executor.submit("slow", lambda: release.wait(10))
    executor.submit("fast", fast_done.set)
    assert fast_done.wait(5)
    release.set()
    executor.shutdown(wait=True)


def test_a_failing_job_does_not_block_its_key() -> None:
    executor = KeyedExecutor(2)
    ran = threading.Event()

    def boom() -> None:
        raise RuntimeError("bug")

    executor.submit("k", boom)
    executor.submit("k", ran.set)
    assert ran.wait(5)
    executor.shutdown(wait=True)
