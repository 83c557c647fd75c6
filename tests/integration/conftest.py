"""Integration fixtures: a real RabbitMQ, the simulator over HTTP, a worker thread, pika peers.

The parts are the test kit's (:mod:`tests.kit`); the names below stay importable from here.
"""

from __future__ import annotations

from collections.abc import Iterator

import pika
import pytest

from tests.kit import topology
from tests.kit.events import Peer
from tests.kit.processes import RunningWorker, reset_sim, set_faults, sim_requests
from tests.kit.samples import API_KEY, CHANNEL
from tests.kit.topology import private_settings
from worker.settings import Settings
from worker.simulator import SimulatorThread
from worker.topology import Topology

__all__ = [
    "API_KEY",
    "CHANNEL",
    "Peer",
    "RunningWorker",
    "private_settings",
    "set_faults",
    "sim_requests",
]


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread(api_key=API_KEY) as sim:
        yield sim


@pytest.fixture
def sim(simulator: SimulatorThread) -> SimulatorThread:
    """The simulator with no faults and no recorded requests."""
    return reset_sim(simulator)


@pytest.fixture
def settings(amqp_url: str, sim: SimulatorThread) -> Settings:
    return private_settings(amqp_url, sim.url)


@pytest.fixture
def peer(settings: Settings) -> Iterator[Peer]:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    private = Topology.from_settings(settings)
    topology.declare(channel, private)
    results = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(results, settings.results_exchange, "#")
    yield Peer(settings, connection, channel, results)
    topology.delete(channel, private)
    connection.close()


@pytest.fixture
def worker(settings: Settings, peer: Peer) -> Iterator[RunningWorker]:
    running = RunningWorker(settings)
    yield running
    running.stop()
    assert running.error is None
