"""Per-target request rate limits: a PABX gets at most ``rate_limit`` requests per second."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from worker.pipeline import PabxClient
from worker.settings import PabxTarget

__all__ = ["RateLimitedPabx", "TokenBucket"]


class TokenBucket:
    """Paces callers to ``rate`` per second, allowing a burst of ``burst``; thread-safe."""

    def __init__(
        self,
        rate: float,
        *,
        burst: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1.0) * self._interval
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = clock()

    def acquire(self) -> float:
        """Wait for a token; returns how long the caller waited."""
        with self._lock:
            now = self._clock()
            slot = max(now - self._tolerance, self._next)
            self._next = slot + self._interval
            wait = max(slot - now, 0.0)
        if wait:
            self._sleep(wait)
        return wait


class RateLimitedPabx:
    """Wraps a PABX client so each target with a ``rate_limit`` is paced."""

    def __init__(self, inner: PabxClient, targets: Mapping[str, PabxTarget]) -> None:
        self._inner = inner
        self._buckets = {t.url: TokenBucket(t.rate_limit) for t in targets.values() if t.rate_limit}

    def redirect(self, target: PabxTarget, channel_id: int, body: Mapping[str, str]) -> int:
        bucket = self._buckets.get(target.url)
        if bucket is not None:
            bucket.acquire()
        return self._inner.redirect(target, channel_id, body)
