"""Circuit breaker transitions, on a controlled clock."""

from __future__ import annotations

from worker.consume.circuit import CircuitBreaker, CircuitState


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_threshold_failures_in_a_row_and_probes_after_reset() -> None:
    clock = Clock()
    breaker = CircuitBreaker(threshold=3, reset_s=10, clock=clock)
    for _ in range(2):
        breaker.failure()
    breaker.success()  # resets the count
    for _ in range(2):
        breaker.failure()
    assert breaker.state is CircuitState.CLOSED and breaker.allow()
    breaker.failure()
    assert breaker.state is CircuitState.OPEN and not breaker.allow()
    clock.now = 10
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.allow() and not breaker.allow()  # a single probe
    breaker.failure()
    assert breaker.state is CircuitState.OPEN and breaker.opened == 2
    clock.now = 20
    assert breaker.allow()
    breaker.success()
    assert breaker.state is CircuitState.CLOSED and breaker.allow() and breaker.allow()
