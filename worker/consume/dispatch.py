"""Runs jobs on a thread pool, one at a time per key, in arrival order per key."""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["KeyedExecutor"]

log = logging.getLogger("pabx_worker.dispatch")

Job = Callable[[], Any]


class KeyedExecutor:
    """A thread pool that never runs two jobs with the same key at once.

    Jobs without a key run as soon as a thread is free. Jobs sharing a key wait
    behind each other in the order they were submitted (same ``ID_CHAMADA``).
    """

    def __init__(self, max_workers: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pabx")
        self._waiting: dict[str, deque[Job]] = {}
        self._lock = threading.Lock()

    def submit(self, key: str | None, job: Job) -> None:
        if key is None:
            self._pool.submit(_run_safely, job)
            return
        with self._lock:
            queue = self._waiting.get(key)
            if queue is not None:
                queue.append(job)
                return
            self._waiting[key] = deque()
        self._pool.submit(self._run_keyed, key, job)

    def _run_keyed(self, key: str, job: Job) -> None:
        next_job: Job | None = job
        while next_job is not None:
            _run_safely(next_job)
            with self._lock:
                queue = self._waiting[key]
                next_job = queue.popleft() if queue else None
                if next_job is None:
                    del self._waiting[key]

    def shutdown(self, *, wait: bool) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=not wait)


def _run_safely(job: Job) -> None:
    try:
        job()
    except Exception:  # a job must not take the keyed queue down with it
        log.exception("job failed")
