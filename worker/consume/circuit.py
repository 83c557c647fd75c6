"""A circuit breaker over a dependency (one per PABX target, one for the store).

``CLOSED`` → (``threshold`` transient failures in a row) → ``OPEN`` → (``reset_s``
later) → ``HALF_OPEN``: one probe request may go out; its success closes the
circuit, its failure opens it again. Permanent answers (400/401/403) count as
success here: the PABX is up, it just refused that request.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum

__all__ = ["CircuitBreaker", "CircuitState"]


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Thread-safe breaker; the consumer pauses while :attr:`state` is ``OPEN``."""

    def __init__(
        self, *, threshold: int, reset_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threshold = threshold
        self._reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False
        #: How many times the circuit has opened (for metrics and tests).
        self.opened = 0

    @property
    def state(self) -> CircuitState:
        with self._lock:
            return self._state()

    def _state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - self._opened_at >= self._reset_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def allow(self) -> bool:
        """Whether a request may go out now (one probe at a time when half-open)."""
        with self._lock:
            state = self._state()
            if state is CircuitState.CLOSED:
                return True
            if state is CircuitState.HALF_OPEN and not self._probing:
                self._probing = True
                return True
            return False

    def abandon(self) -> None:
        """A request allowed by :meth:`allow` will not go out after all: free the probe."""
        with self._lock:
            self._probing = False

    def success(self) -> None:
        with self._lock:
            self._failures, self._opened_at, self._probing = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            half_open = self._state() is CircuitState.HALF_OPEN
            if half_open or (self._opened_at is None and self._failures >= self._threshold):
                self._opened_at = self._clock()
                self.opened += 1
            self._probing = False
