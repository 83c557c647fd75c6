"""Circuit breaker: a failing PABX pauses consumption, recovery resumes it (both brokers)."""

from __future__ import annotations

import time

import pytest

from tests.integration.conftest import (
    ON_BOTH_BROKERS,
    AnyPeer,
    RunningWorker,
    private_settings,
    set_faults,
    sim_requests,
)
from tests.kit.samples import command
from worker.contract.settings import Settings
from worker.tools.simulator import SimulatorThread

pytestmark = ON_BOTH_BROKERS


@pytest.fixture
def settings(broker_url: str, sim: SimulatorThread) -> Settings:
    return private_settings(
        broker_url, sim.url, circuit_threshold=3, circuit_reset_s=0.5, retry_in_process_attempts=1
    )


def wait_for(predicate: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_circuit_opens_pauses_consumption_and_closes_after_recovery(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread
) -> None:
    set_faults(sim, error_rate=1.0, fail_status=503)
    for _ in range(6):
        peer.publish(command())
    breaker, state = worker.processor.breakers["default"], worker.worker.state
    assert wait_for(lambda: breaker.opened >= 1)
    assert wait_for(lambda: not state.consuming)
    assert state.circuits["default"] in ("open", "half_open")
    assert sim_requests(sim)  # it did try before giving up
    set_faults(sim)  # the PABX recovers
    events = peer.events(6, timeout=30)
    assert [e["data"]["status"] for _, e in events] == ["accepted"] * 6
    assert wait_for(lambda: state.circuits["default"] == "closed" and state.consuming)
