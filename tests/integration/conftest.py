"""Integration fixtures: a broker, the simulator over HTTP, a worker thread, peers.

The broker is the real RabbitMQ, read and written by a pika :class:`Peer`; a test that asks
for the ``backend`` fixture by parametrization (:data:`ON_BOTH_BROKERS`) runs twice, once on
the in-memory broker (:class:`~worker.tools.memory_broker.MemoryBroker`, with a
:class:`~tests.kit.events.MemoryPeer` of the same methods) and once on RabbitMQ (marked
``integration``). The parts are the test kit's (:mod:`tests.kit`); the names below stay
importable from here.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kit.events import (
    MEMORY_URL,
    AnyPeer,
    MemoryPeer,
    Peer,
    open_peer,
    through_the_wire,
)
from tests.kit.processes import RunningWorker, reset_sim, set_faults, sim_requests
from tests.kit.samples import API_KEY, CHANNEL
from tests.kit.topology import private_settings
from worker.contract.settings import Settings
from worker.tools.simulator import SimulatorThread

__all__ = [
    "API_KEY",
    "BACKENDS",
    "CHANNEL",
    "ON_BOTH_BROKERS",
    "AnyPeer",
    "MemoryPeer",
    "Peer",
    "RunningWorker",
    "open_peer",
    "private_settings",
    "set_faults",
    "sim_requests",
    "through_the_wire",
    "url_for",
]

#: The brokers a test runs on: ``@ON_BOTH_BROKERS`` on a test using ``worker``/``peer``.
BACKENDS = ("memory", pytest.param("rabbitmq", marks=pytest.mark.integration))
ON_BOTH_BROKERS = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """``rabbitmq`` unless the test is parametrized with ON_BOTH_BROKERS."""
    return str(getattr(request, "param", "rabbitmq"))


def url_for(backend: str, request: pytest.FixtureRequest) -> str:
    """The broker URL for ``backend``: RabbitMQ's skips (fails under CI) when it is down."""
    if backend == "memory":
        return MEMORY_URL
    return str(request.getfixturevalue("amqp_url"))


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread(api_key=API_KEY) as sim:
        yield sim


@pytest.fixture
def sim(simulator: SimulatorThread) -> SimulatorThread:
    """The simulator with no faults and no recorded requests."""
    return reset_sim(simulator)


@pytest.fixture
def broker_url(backend: str, request: pytest.FixtureRequest) -> str:
    return url_for(backend, request)


@pytest.fixture
def settings(broker_url: str, sim: SimulatorThread) -> Settings:
    return private_settings(broker_url, sim.url)


@pytest.fixture
def peer(settings: Settings) -> Iterator[AnyPeer]:
    with open_peer(settings) as opened:
        yield opened


@pytest.fixture
def worker(settings: Settings, peer: AnyPeer) -> Iterator[RunningWorker]:
    running = RunningWorker(settings, peer.connect)
    yield running
    running.stop()
    assert running.error is None
