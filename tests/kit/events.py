"""The peers of a test: publish commands, read outcome events and other queues.

:class:`Peer` speaks pika to RabbitMQ; :class:`MemoryPeer` has the same methods on the
in-memory broker (:class:`~worker.tools.memory_broker.MemoryBroker`), so one test body runs on both.
"""

from __future__ import annotations

import contextlib
import json
import struct
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pika
from amqp import Message

from tests.kit import topology
from tests.kit.official_sdk import read_outcome
from worker.adapters.channel import Connect
from worker.consume.inbound import tolerate_non_utf8_properties
from worker.contract.settings import Settings
from worker.contract.topology import Topology
from worker.tools.memory_broker import MemoryBroker, StoredMessage

__all__ = [
    "MEMORY_URL",
    "AnyPeer",
    "MemoryPeer",
    "Peer",
    "Seen",
    "as_pika_properties",
    "memory_peer",
    "open_peer",
    "pika_peer",
    "through_the_wire",
]

#: The AMQP URL in settings for the in-memory broker: never connected to.
MEMORY_URL = "amqp://memory.invalid:1/%2F"


def as_command(body: bytes | dict[str, Any], props: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """A command's raw body and properties: JSON and persistent unless ``props`` say otherwise."""
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    return raw, {"content_type": "application/json", "delivery_mode": 2, **props}


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
        self.send(*as_command(body, props))

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
            self.seen.append((props, read_outcome(body, props.content_type, props.headers)))
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
        """Publish a command (JSON and persistent unless ``props`` say otherwise)."""
        self.send(*as_command(body, props))

    def send(self, body: bytes, props: Mapping[str, Any]) -> None:
        properties = through_the_wire(body, props).properties
        routed = self.broker.publish(
            self.settings.commands_exchange, self.settings.routing_key, body, properties
        )
        assert routed, "unroutable (pika's mandatory publish would raise)"

    def events(self, count: int, timeout: float = 15.0) -> list[tuple[Any, dict[str, Any]]]:
        """Wait for ``count`` outcome events in all (properties, event)."""
        for message in self._take(self.results_queue, count - len(self.seen), timeout):
            props = as_pika_properties(message.properties)
            self.seen.append((props, read_outcome(message.body, props.content_type, props.headers)))
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


#: The peer of either broker.
AnyPeer = Peer | MemoryPeer


@contextlib.contextmanager
def open_peer(settings: Settings) -> Iterator[AnyPeer]:
    """A peer on a new in-memory broker for MEMORY_URL, else on RabbitMQ."""
    if settings.amqp_url == MEMORY_URL:
        yield memory_peer(settings, MemoryBroker())
    else:
        yield from pika_peer(settings)


def memory_peer(settings: Settings, broker: MemoryBroker) -> MemoryPeer:
    """A peer on ``broker`` with the topology declared and a queue bound to every outcome."""
    private = Topology.from_settings(settings)
    for ex in private.exchanges:
        broker.declare_exchange(ex.name, ex.type, ex.arguments)
    for q in private.queues:
        broker.declare_queue(q.name, q.arguments)
    for b in private.bindings:
        broker.bind(b.queue, b.exchange, b.routing_key)
    results = broker.declare_queue("")
    broker.bind(results, settings.results_exchange, "#")
    return MemoryPeer(settings, broker, results)


def pika_peer(settings: Settings) -> Iterator[Peer]:
    """A pika peer with the private topology declared (deleted afterwards)."""
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


@dataclass
class Seen:
    """One outcome event as received."""

    event: dict[str, Any]
    properties: Any
    raw: bytes
    at: float
