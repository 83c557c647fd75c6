"""Deadlines, timeouts and the circuit breaker against the simulator's injected faults.

Every test runs twice: on the in-memory broker and on RabbitMQ.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from tests.integration.conftest import (
    ON_BOTH_BROKERS,
    AnyPeer,
    RunningWorker,
    set_faults,
    sim_requests,
)
from tests.kit.samples import command
from worker.tools.simulator import SimulatorThread

pytestmark = ON_BOTH_BROKERS


def test_hang_times_out_once_and_is_not_resent(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread
) -> None:
    set_faults(sim, hang=True)
    peer.publish(command())
    deadline = time.monotonic() + 10
    while not sim_requests(sim) and time.monotonic() < deadline:
        time.sleep(0.05)
    set_faults(sim)  # the hung request times out (1 s read timeout): it may have been acted on
    _, event = peer.events(1)[0]
    assert event["data"]["status"] == "failed" and event["data"]["attempts"] == 1
    assert event["data"]["error"]["code"] == "pabx_outcome_unknown"
    assert len(sim_requests(sim)) == 1
    assert len(peer.drain(peer.settings.parked_queue, 1)) == 1


def test_hang_is_resent_when_ambiguous_retries_are_allowed(
    peer: AnyPeer, sim: SimulatorThread
) -> None:
    running = RunningWorker(
        peer.settings.model_copy(update={"retry_ambiguous": True}), peer.connect
    )
    try:
        set_faults(sim, hang=True)
        peer.publish(command())
        deadline = time.monotonic() + 10
        while not sim_requests(sim) and time.monotonic() < deadline:
            time.sleep(0.05)
        set_faults(sim)
        _, event = peer.events(1)[0]
    finally:
        running.stop()
    assert event["data"]["status"] == "accepted" and event["data"]["attempts"] == 2
    assert len(sim_requests(sim)) == 2


def test_past_deadline_is_expired_and_nothing_is_sent(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread
) -> None:
    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    peer.publish(command(expires_at=past))
    _, event = peer.events(1)[0]
    assert event["data"]["status"] == "expired" and event["data"]["error"]["code"] == "expired"
    assert sim_requests(sim) == []
    assert peer.queue_length(peer.settings.parked_queue) == 0  # expired is not parked


def test_outage_until_the_deadline_ends_expired(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread
) -> None:
    set_faults(sim, error_rate=1.0, fail_status=503)
    soon = (datetime.now(UTC) + timedelta(seconds=1.5)).isoformat()
    peer.publish(command(expires_at=soon))
    _, event = peer.events(1)[0]
    assert event["data"]["status"] == "expired"
    assert event["data"]["attempts"] >= 3
