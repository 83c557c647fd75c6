"""Circuit breaker on the real broker: a failing PABX pauses consumption, recovery resumes it."""

from __future__ import annotations

import time

import pytest

from tests.kit.events import Peer
from tests.kit.processes import RunningWorker, set_faults, sim_requests
from tests.kit.samples import command
from tests.kit.topology import private_settings
from worker.settings import Settings
from worker.simulator import SimulatorThread

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(amqp_url: str, sim: SimulatorThread) -> Settings:
    return private_settings(
        amqp_url, sim.url, circuit_threshold=3, circuit_reset_s=0.5, retry_in_process_attempts=1
    )


def wait_for(predicate: object, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_circuit_opens_pauses_consumption_and_closes_after_recovery(
    worker: RunningWorker, peer: Peer, sim: SimulatorThread
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
