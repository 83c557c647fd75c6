"""Idempotency: conflicts, and one command in flight in two workers (in memory and on RabbitMQ)."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import (
    ON_BOTH_BROKERS,
    AnyPeer,
    RunningWorker,
    set_faults,
    sim_requests,
)
from tests.kit.samples import command
from worker.contract.settings import Settings
from worker.tools.simulator import SimulatorThread

pytestmark = ON_BOTH_BROKERS


def test_same_id_with_another_body_is_rejected_as_conflict(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread
) -> None:
    first = command()
    peer.publish(first)
    assert peer.events(1)[0][1]["data"]["status"] == "accepted"
    changed = {**first, "redirect": {**first["redirect"], "DISPOSITIVO_DESTINO": "1199000"}}
    peer.publish(changed)
    _, event = peer.events(2)[1]
    assert event["data"]["status"] == "rejected"
    assert event["data"]["error"]["code"] == "idempotency_conflict"
    assert len(sim_requests(sim)) == 1
    parked = peer.drain(peer.settings.parked_queue, 1)
    assert parked[0][0].headers["x-pabx-error-code"] == "idempotency_conflict"


def test_command_in_flight_in_one_worker_waits_in_the_other(
    settings: Settings, peer: AnyPeer, sim: SimulatorThread, tmp_path: Path
) -> None:
    shared = settings.model_copy(
        update={"store_url": f"sqlite:///{tmp_path / 'shared.sqlite3'}", "concurrency": 4}
    )
    workers = [RunningWorker(shared, peer.connect), RunningWorker(shared, peer.connect)]
    try:
        set_faults(sim, latency_ms=600)  # long enough for the copy to meet a live lease
        cmd = command()
        for _ in range(4):
            peer.publish(cmd)
        events = peer.events(4, timeout=30)
        waited = sum(w.worker.state.handled.get("retry", 0) for w in workers)
    finally:
        for running in workers:
            running.stop()
    assert len(events) == 4
    assert len({e["id"] for _, e in events}) == 1
    assert sum(not e["data"]["duplicate"] for _, e in events) == 1
    assert len(sim_requests(sim)) == 1
    assert waited >= 1  # a copy met the other worker's live lease and went to a retry queue
