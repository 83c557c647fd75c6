"""Integration harness: a broker, the simulator over HTTP, a worker thread, peers.

The broker is the real RabbitMQ, read and written by a pika :class:`Peer`; a test that asks
for the ``backend`` fixture by parametrization (:data:`ON_BOTH_BROKERS`) runs twice, once on
the in-memory broker (:class:`~worker.memory_broker.MemoryBroker`, with a
:class:`MemoryPeer` of the same methods) and once on RabbitMQ (marked ``integration``).
"""

from __future__ import annotations

import contextlib
import json
import struct
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pika
import pytest
import requests
from amqp import Message

from worker.app import build_processor
from worker.channel import Connect
from worker.consumer import Worker
from worker.inbound import tolerate_non_utf8_properties
from worker.memory_broker import MemoryBroker, StoredMessage
from worker.settings import Settings, load_settings
from worker.simulator import SimulatorThread
from worker.topology import Topology

API_KEY = "it-key-5f2b"
CHANNEL = 17


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorThread]:
    with SimulatorThread(api_key=API_KEY) as sim:
        yield sim


@pytest.fixture
def sim(simulator: SimulatorThread) -> SimulatorThread:
    """The simulator with no faults and no recorded requests."""
    requests.put(f"{simulator.url}/_sim/faults", json={}, timeout=5).raise_for_status()
    requests.delete(f"{simulator.url}/_sim/requests", timeout=5).raise_for_status()
    return simulator


def sim_requests(sim: SimulatorThread) -> list[dict[str, Any]]:
    reply = requests.get(f"{sim.url}/_sim/requests", timeout=5)
    reply.raise_for_status()
    return list(reply.json()["requests"])


def set_faults(sim: SimulatorThread, **faults: Any) -> None:
    requests.put(f"{sim.url}/_sim/faults", json=faults, timeout=5).raise_for_status()


def private_settings(amqp_url: str, sim_url: str, **values: Any) -> Settings:
    """Settings on a private topology (unique names), so tests never share queues."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    names = {
        "commands_exchange": f"{prefix}.commands",
        "command_queue": f"{prefix}.redirect",
        "results_exchange": f"{prefix}.results",
        "unrouted_exchange": f"{prefix}.unrouted",
        "dead_exchange": f"{prefix}.dead",
        "parked_queue": f"{prefix}.parked",
        "retry_queue_prefix": f"{prefix}.retry",
    }
    defaults: dict[str, Any] = {
        "amqp_url": amqp_url,
        "pabx_url": sim_url,
        "pabx_api_key": API_KEY,
        "pabx_channel_id": CHANNEL,
        "store_url": "memory://",
        "concurrency": 8,
        "http_port": 0,
        "retry_delays_s": (0.2, 0.5),
        "retry_in_process_max_wait_s": 0.05,
        "pabx_read_timeout_s": 1.0,
        "shutdown_timeout_s": 10.0,
        **names,
    }
    defaults.update(values)
    return load_settings(None, **defaults)


#: The brokers a test runs on: ``@ON_BOTH_BROKERS`` on a test using ``worker``/``peer``.
BACKENDS = ("memory", pytest.param("rabbitmq", marks=pytest.mark.integration))
ON_BOTH_BROKERS = pytest.mark.parametrize("backend", BACKENDS, indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """``rabbitmq`` unless the test is parametrized with ON_BOTH_BROKERS."""
    return str(getattr(request, "param", "rabbitmq"))


@dataclass
class Peer:
    """A pika client: publishes commands and reads results, parked and unrouted messages."""

    settings: Settings
    connection: pika.BlockingConnection
    channel: Any
    results_queue: str = ""
    seen: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)
    #: How a worker reaches this peer's broker: None is ``settings.amqp_url``.
    connect: Connect | None = None

    def temporary_queue(self) -> str:
        """A new exclusive queue with a server-chosen name."""
        return str(self.channel.queue_declare("", exclusive=True).method.queue)

    def sleep(self, seconds: float) -> None:
        self.connection.sleep(seconds)

    def publish(self, body: bytes | dict[str, Any], **props: Any) -> None:
        """Publish a command (JSON and persistent unless ``props`` say otherwise)."""
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        props.setdefault("content_type", "application/json")
        props.setdefault("delivery_mode", 2)
        self.send(raw, props)

    def send(self, body: bytes, props: Mapping[str, Any]) -> None:
        """Publish ``body`` to the commands exchange with exactly these pika properties."""
        self.channel.basic_publish(
            self.settings.commands_exchange,
            self.settings.routing_key,
            body,
            pika.BasicProperties(**props),
            mandatory=True,
        )

    def events(self, count: int, timeout: float = 15.0) -> list[tuple[Any, dict[str, Any]]]:
        """Wait for ``count`` outcome events in all (properties, event)."""
        deadline = time.monotonic() + timeout
        while len(self.seen) < count and time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(self.results_queue, auto_ack=True)
            if method is None:
                self.connection.sleep(0.05)
                continue
            self.seen.append((props, json.loads(body)))
        return list(self.seen)

    def drain(self, queue: str, count: int, timeout: float = 10.0) -> list[tuple[Any, bytes]]:
        got: list[tuple[Any, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                self.connection.sleep(0.05)
                continue
            got.append((props, body))
        return got

    def queue_length(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)


def through_the_wire(body: bytes, props: Mapping[str, Any], redelivered: bool = False) -> Message:
    """The message as the worker's py-amqp channel builds it from pika's encoding."""
    tolerate_non_utf8_properties()
    encoded = b"".join(pika.BasicProperties(**props).encode())
    message = Message()
    message.inbound_header(struct.pack(">HxxQ", 60, len(body)) + encoded)
    if body:
        message.inbound_body(body)
    message.delivery_info = {"delivery_tag": 1, "redelivered": redelivered}
    return message


#: py-amqp property names that pika spells otherwise.
_PIKA_NAMES = {"application_headers": "headers"}


def as_pika_properties(properties: Mapping[str, Any]) -> pika.BasicProperties:
    """Properties as a pika consumer would read them, so assertions read alike on both."""
    return pika.BasicProperties(**{_PIKA_NAMES.get(k, k): v for k, v in properties.items()})


@dataclass
class MemoryPeer:
    """The :class:`Peer` methods on a :class:`MemoryBroker`.

    What it publishes goes through pika's encoding and py-amqp's decoding first, so the
    worker reads the same properties as from RabbitMQ; what it reads comes back as pika's
    ``BasicProperties``.
    """

    settings: Settings
    broker: MemoryBroker
    results_queue: str = ""
    seen: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)

    @property
    def connect(self) -> Connect:
        return self.broker.connect

    def publish(self, body: bytes | dict[str, Any], **props: Any) -> None:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        props.setdefault("content_type", "application/json")
        props.setdefault("delivery_mode", 2)
        self.send(raw, props)

    def send(self, body: bytes, props: Mapping[str, Any]) -> None:
        properties = through_the_wire(body, props).properties
        routed = self.broker.publish(
            self.settings.commands_exchange, self.settings.routing_key, body, properties
        )
        assert routed, "unroutable (pika's mandatory publish would raise)"

    def events(self, count: int, timeout: float = 15.0) -> list[tuple[Any, dict[str, Any]]]:
        """Wait for ``count`` outcome events in all (properties, event)."""
        for message in self._take(self.results_queue, count - len(self.seen), timeout):
            self.seen.append((as_pika_properties(message.properties), json.loads(message.body)))
        return list(self.seen)

    def drain(self, queue: str, count: int, timeout: float = 10.0) -> list[tuple[Any, bytes]]:
        return [
            (as_pika_properties(m.properties), m.body) for m in self._take(queue, count, timeout)
        ]

    def _take(self, queue: str, count: int, timeout: float) -> list[StoredMessage]:
        got: list[StoredMessage] = []

        def enough() -> bool:
            while len(got) < count and (message := self.broker.get(queue)) is not None:
                got.append(message)
            return len(got) >= count

        self.broker.wait_for(enough, timeout)
        return got

    def queue_length(self, queue: str) -> int:
        return self.broker.queue_length(queue)

    def temporary_queue(self) -> str:
        return self.broker.declare_queue("")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


#: The peer of either broker.
AnyPeer = Peer | MemoryPeer


#: The AMQP URL in settings for the in-memory broker: never connected to.
MEMORY_URL = "amqp://memory.invalid:1/%2F"


def url_for(backend: str, request: pytest.FixtureRequest) -> str:
    """The broker URL for ``backend``: RabbitMQ's skips (fails under CI) when it is down."""
    if backend == "memory":
        return MEMORY_URL
    return str(request.getfixturevalue("amqp_url"))


@pytest.fixture
def broker_url(backend: str, request: pytest.FixtureRequest) -> str:
    return url_for(backend, request)


@pytest.fixture
def settings(broker_url: str, sim: SimulatorThread) -> Settings:
    return private_settings(broker_url, sim.url)


@contextlib.contextmanager
def open_peer(settings: Settings) -> Iterator[AnyPeer]:
    """A peer on a new in-memory broker for MEMORY_URL, else on RabbitMQ."""
    if settings.amqp_url == MEMORY_URL:
        yield memory_peer(settings, MemoryBroker())
    else:
        yield from pika_peer(settings)


@pytest.fixture
def peer(settings: Settings) -> Iterator[AnyPeer]:
    with open_peer(settings) as opened:
        yield opened


def memory_peer(settings: Settings, broker: MemoryBroker) -> MemoryPeer:
    """A peer on ``broker`` with the topology declared and a queue bound to every outcome."""
    topology = Topology.from_settings(settings)
    for ex in topology.exchanges:
        broker.declare_exchange(ex.name, ex.type, ex.arguments)
    for q in topology.queues:
        broker.declare_queue(q.name, q.arguments)
    for b in topology.bindings:
        broker.bind(b.queue, b.exchange, b.routing_key)
    results = broker.declare_queue("")
    broker.bind(results, settings.results_exchange, "#")
    return MemoryPeer(settings, broker, results)


def pika_peer(settings: Settings) -> Iterator[Peer]:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    topology = Topology.from_settings(settings)
    for ex in topology.exchanges:
        channel.exchange_declare(ex.name, ex.type, durable=True, arguments=ex.arguments)
    for q in topology.queues:
        channel.queue_declare(q.name, durable=True, arguments=q.arguments)
    for b in topology.bindings:
        channel.queue_bind(b.queue, b.exchange, b.routing_key)
    results = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(results, settings.results_exchange, "#")
    yield Peer(settings, connection, channel, results)
    for q in topology.queues:
        channel.queue_delete(q.name)
    for ex in topology.exchanges:
        channel.exchange_delete(ex.name)
    connection.close()


class RunningWorker:
    def __init__(self, settings: Settings, connect: Connect | None = None) -> None:
        self._processor_cm = build_processor(settings)
        self.processor = self._processor_cm.__enter__()
        self.worker = Worker(settings, self.processor, connect=connect)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.worker.ready.wait(15):
            self.stop()
            raise RuntimeError(f"worker did not start: {self.error!r}")

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(30)
        self._processor_cm.__exit__(None, None, None)


@pytest.fixture
def worker(settings: Settings, peer: AnyPeer) -> Iterator[RunningWorker]:
    running = RunningWorker(settings, peer.connect)
    yield running
    running.stop()
    assert running.error is None
