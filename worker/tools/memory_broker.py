"""An AMQP broker in memory, for fast tests of the worker (as dramatiq ships ``StubBroker``).

:meth:`MemoryBroker.connect` opens a connection that satisfies
:class:`worker.adapters.channel.AmqpConnection`, so a
:class:`~worker.consume.consumer.Worker` runs on it unchanged
(``Worker(settings, processor, connect=broker.connect)``); tests publish commands and read
outcome events, parked copies and retry queues through the broker's own methods::

    broker = MemoryBroker()
    broker.declare_queue("events")
    broker.bind("events", settings.results_exchange, "#")   # once the worker declared it
    broker.publish(settings.commands_exchange, settings.routing_key, body, properties)
    broker.get("events")

What it models, as RabbitMQ does it, and only as far as the worker's behaviour needs:

* direct, fanout and topic exchanges (``*`` one word, ``#`` any words), the default
  exchange, ``alternate-exchange``; a mandatory message nobody takes is returned
  (``basic_return`` before its confirm);
* publisher confirms (every publish on a confirm channel is acked, in order);
* queues with ``x-message-ttl`` that dead-letter to ``x-dead-letter-exchange`` /
  ``x-dead-letter-routing-key`` (the retry queues), ``x-max-length`` with ``drop-head``;
* consumers with a per-consumer prefetch (``basic_qos`` applies to later consumers),
  ``basic_ack``, ``basic_reject`` with or without requeue (without: dead-lettered);
* redelivery: a message requeued, or unacked when its connection closes, comes back with
  ``redelivered`` set: first on a classic queue, last on a quorum queue (as RabbitMQ 3.10
  does), where the broker's ``x-delivery-count`` replaces the producer's on every delivery
  and a message past ``x-delivery-limit`` is dead-lettered;
* a declare with other arguments than the existing ones raises ``PreconditionFailed``;
  :meth:`MemoryBroker.close_connections` drops every connection (the worker reconnects).

What it does not model: the wire (no encoding: property types stay as given, no frame size
limit, bodies are never decoded), headers exchanges and exchange-to-exchange bindings,
``x-death`` headers, nacks, ``reject-publish`` overflow, per-message TTL, priorities,
exclusive or auto-delete queues (nothing is deleted), ``basic_get``/``basic_qos`` global
prefetch on the channel API, users, vhosts, permissions, TLS, clustering and heartbeats.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from amqp.exceptions import (
    ChannelError,
    NotFound,
    PreconditionFailed,
    RecoverableConnectionError,
    error_for_code,
)

from worker.adapters.channel import InboundMessage, OutboundMessage
from worker.contract import headers as hdr

__all__ = ["MemoryBroker", "MemoryChannel", "MemoryConnection", "StoredMessage"]

#: Exchange types routed here.
EXCHANGE_TYPES = frozenset({"direct", "fanout", "topic"})
#: What RabbitMQ says of a mandatory message that no queue took.
NO_ROUTE = (312, "NO_ROUTE")


@dataclass(frozen=True)
class StoredMessage:
    """A message in a queue, or as a consumer gets it (then with ``delivery_info``)."""

    body: bytes
    #: py-amqp property names (``application_headers`` for the headers).
    properties: Mapping[str, Any]
    exchange: str = ""
    routing_key: str = ""
    redelivered: bool = False
    #: Earlier deliveries, counted by the broker.
    delivery_count: int = 0
    #: ``time.monotonic()`` past which a TTL queue dead-letters it.
    expires_at: float | None = None
    delivery_info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> Mapping[str, Any]:
        return self.properties.get("application_headers") or {}

    @property
    def delivery_tag(self) -> int:
        return int(self.delivery_info["delivery_tag"])


@dataclass
class _Exchange:
    type: str
    arguments: Mapping[str, Any]
    #: (queue, routing key or pattern)
    bindings: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Queue:
    name: str
    arguments: Mapping[str, Any]
    messages: deque[StoredMessage] = field(default_factory=deque)

    @property
    def quorum(self) -> bool:
        return self.arguments.get("x-queue-type") == "quorum"


@dataclass
class _Consumer:
    tag: str
    queue: str
    channel: MemoryChannel
    prefetch: int
    callback: Callable[[InboundMessage], None]


@dataclass
class _Unacked:
    queue: str
    consumer: str
    message: StoredMessage


def _topic_match(pattern: list[str], words: list[str]) -> bool:
    """``*`` stands for one word, ``#`` for zero or more."""
    if not pattern:
        return not words
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        return any(_topic_match(rest, words[i:]) for i in range(len(words) + 1))
    return bool(words) and head in ("*", words[0]) and _topic_match(rest, words[1:])


def _matches(kind: str, binding_key: str, routing_key: str) -> bool:
    if kind == "fanout":
        return True
    if kind == "direct":
        return binding_key == routing_key
    return _topic_match(binding_key.split("."), routing_key.split("."))


class MemoryBroker:
    """Exchanges, queues and consumers in one process; thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._changed = threading.Condition(threading.RLock())
        self._exchanges: dict[str, _Exchange] = {}
        self._queues: dict[str, _Queue] = {}
        self._consumers: list[_Consumer] = []
        self._connections: list[MemoryConnection] = []
        self._tags = itertools.count(1)
        #: Connections opened so far (one per worker session).
        self.connections_opened = 0

    # -- topology ---------------------------------------------------------------------

    def declare_exchange(
        self, name: str, type: str = "topic", arguments: Mapping[str, Any] | None = None
    ) -> None:
        """Declare an exchange; another type or arguments raise PreconditionFailed."""
        if type not in EXCHANGE_TYPES:
            raise NotImplementedError(f"the memory broker does not route {type!r} exchanges")
        with self._changed:
            wanted = dict(arguments or {})
            existing = self._exchanges.get(name)
            if existing is None:
                self._exchanges[name] = _Exchange(type, wanted)
            elif (existing.type, dict(existing.arguments)) != (type, wanted):
                raise PreconditionFailed(f"PRECONDITION_FAILED - inequivalent exchange {name!r}")

    def declare_queue(self, name: str = "", arguments: Mapping[str, Any] | None = None) -> str:
        """Declare a queue (a fresh name for ``""``); other arguments raise PreconditionFailed."""
        with self._changed:
            name = name or f"amq.gen-{next(self._tags)}"
            wanted = dict(arguments or {})
            existing = self._queues.get(name)
            if existing is None:
                self._queues[name] = _Queue(name, wanted)
            elif dict(existing.arguments) != wanted:
                raise PreconditionFailed(f"PRECONDITION_FAILED - inequivalent queue {name!r}")
            return name

    def bind(self, queue: str, exchange: str, routing_key: str) -> None:
        with self._changed:
            self._queue(queue)
            bindings = self._exchange(exchange).bindings
            if (queue, routing_key) not in bindings:
                bindings.append((queue, routing_key))

    # -- what tests use -----------------------------------------------------------------

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Mapping[str, Any] | None = None,
    ) -> bool:
        """Publish as a producer would; False if no queue took it."""
        with self._changed:
            return bool(self._route(exchange, routing_key, body, dict(properties or {})))

    def get(self, queue: str) -> StoredMessage | None:
        """Take the first ready message of ``queue`` (acked at once), or None."""
        with self._changed:
            self._expire()
            messages = self._queue(queue).messages
            return messages.popleft() if messages else None

    def drain(self, queue: str) -> list[StoredMessage]:
        """Take every ready message of ``queue``."""
        return list(iter(lambda: self.get(queue), None))

    def queue_length(self, queue: str) -> int:
        """Ready messages (not those delivered and not yet acked), as RabbitMQ counts them."""
        with self._changed:
            self._expire()
            return len(self._queue(queue).messages)

    def queues(self) -> list[str]:
        with self._changed:
            return list(self._queues)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds after some change in the broker, or time out."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.05))
                self._expire()
            return True

    def close_connections(self) -> None:
        """Drop every open connection, as a broker restart does: unacked messages return."""
        with self._changed:
            for connection in list(self._connections):
                self._close(connection)
                connection.lost = True

    # -- connections ----------------------------------------------------------------------

    def connect(self, session: int = 1) -> MemoryConnection:
        """A new connection (the worker's ``connect`` argument)."""
        with self._changed:
            connection = MemoryConnection(self)
            self._connections.append(connection)
            self.connections_opened += 1
            return connection

    def _close(self, connection: MemoryConnection) -> None:
        if connection not in self._connections:
            return
        self._connections.remove(connection)
        self._consumers = [c for c in self._consumers if c.channel.connection is not connection]
        for channel in connection.channels:
            held = list(channel.unacked.values())
            channel.unacked.clear()
            # Back in delivery order: classic queues take them at the head, quorum at the tail.
            for unacked in reversed(held):
                if not self._queues[unacked.queue].quorum:
                    self._requeue(unacked)
            for unacked in held:
                if self._queues[unacked.queue].quorum:
                    self._requeue(unacked)
            channel.pending.clear()
        self._changed.notify_all()

    # -- inside ---------------------------------------------------------------------------

    def _exchange(self, name: str) -> _Exchange:
        try:
            return self._exchanges[name]
        except KeyError:
            raise NotFound(f"NOT_FOUND - no exchange {name!r}") from None

    def _queue(self, name: str) -> _Queue:
        try:
            return self._queues[name]
        except KeyError:
            raise NotFound(f"NOT_FOUND - no queue {name!r}") from None

    def _targets(self, exchange: str, routing_key: str) -> list[str]:
        if exchange == "":
            return [routing_key] if routing_key in self._queues else []
        found = self._exchange(exchange)
        queues = [q for q, key in found.bindings if _matches(found.type, key, routing_key)]
        alternate = found.arguments.get("alternate-exchange")
        if not queues and alternate in self._exchanges:
            return self._targets(str(alternate), routing_key)
        return list(dict.fromkeys(queues))

    def _route(
        self, exchange: str, routing_key: str, body: bytes, properties: Mapping[str, Any]
    ) -> int:
        targets = self._targets(exchange, routing_key)
        for name in targets:
            self._enqueue(
                self._queues[name], StoredMessage(body, properties, exchange, routing_key)
            )
        return len(targets)

    def _enqueue(self, queue: _Queue, message: StoredMessage) -> None:
        ttl = queue.arguments.get("x-message-ttl")
        expires = self._clock() + ttl / 1000 if isinstance(ttl, int | float) else None
        queue.messages.append(replace(message, expires_at=expires, redelivered=False))
        limit = queue.arguments.get("x-max-length")
        if isinstance(limit, int):
            while len(queue.messages) > limit:
                self._dead_letter(queue, queue.messages.popleft())
        self._dispatch()

    def _dead_letter(self, queue: _Queue, message: StoredMessage) -> None:
        exchange = queue.arguments.get("x-dead-letter-exchange")
        if exchange is None:
            return
        key = queue.arguments.get("x-dead-letter-routing-key", message.routing_key)
        with_count = dict(message.properties)
        headers = dict(message.headers)
        headers.pop(hdr.DELIVERY_COUNT, None)
        if headers or "application_headers" in with_count:
            with_count["application_headers"] = headers
        self._route(str(exchange), str(key), message.body, with_count)

    def _expire(self) -> None:
        now = self._clock()
        for queue in list(self._queues.values()):
            while queue.messages and (queue.messages[0].expires_at or now + 1) <= now:
                self._dead_letter(queue, queue.messages.popleft())

    def _requeue(self, unacked: _Unacked) -> None:
        queue = self._queues[unacked.queue]
        message = unacked.message
        count = message.delivery_count + 1
        limit = queue.arguments.get("x-delivery-limit")
        stored = replace(message, delivery_info={}, redelivered=True, delivery_count=count)
        if queue.quorum and isinstance(limit, int) and count > limit:
            self._dead_letter(queue, stored)
        elif queue.quorum:  # RabbitMQ 3.10's quorum queues requeue at the back
            queue.messages.append(stored)
        else:
            queue.messages.appendleft(stored)
        self._dispatch()

    def _settle(self, channel: MemoryChannel, tag: int, requeue: bool | None) -> None:
        """Ack (``requeue`` None), requeue, or reject to the dead-letter exchange."""
        unacked = channel.unacked.pop(tag, None)
        if unacked is None:
            raise PreconditionFailed(f"PRECONDITION_FAILED - unknown delivery tag {tag}")
        if requeue is True:
            self._requeue(unacked)
        elif requeue is False:
            self._dead_letter(self._queues[unacked.queue], unacked.message)
        self._dispatch()

    def _dispatch(self) -> None:
        """Hand ready messages to consumers with room under their prefetch, round-robin."""
        moved = True
        while moved:
            moved = False
            for consumer in list(self._consumers):
                queue = self._queues[consumer.queue]
                if not queue.messages or not consumer.channel.has_room(consumer):
                    continue
                self._deliver(consumer, queue.messages.popleft())
                self._consumers.remove(consumer)  # to the back: round-robin
                self._consumers.append(consumer)
                moved = True
        self._changed.notify_all()

    def _deliver(self, consumer: _Consumer, message: StoredMessage) -> None:
        channel = consumer.channel
        tag = channel.next_tag()
        properties = dict(message.properties)
        if self._queues[consumer.queue].quorum:  # set by the broker, 0 on a first delivery
            headers = {**message.headers, hdr.DELIVERY_COUNT: message.delivery_count}
            properties["application_headers"] = headers
        info = {
            "delivery_tag": tag,
            "redelivered": message.redelivered,
            "exchange": message.exchange,
            "routing_key": message.routing_key,
            "consumer_tag": consumer.tag,
        }
        delivered = replace(message, properties=properties, delivery_info=info)
        channel.unacked[tag] = _Unacked(consumer.queue, consumer.tag, message)
        channel.pending.append(lambda: consumer.callback(delivered))


class MemoryChannel:
    """One channel of a :class:`MemoryConnection` (:class:`worker.adapters.channel.AmqpChannel`)."""

    def __init__(self, connection: MemoryConnection) -> None:
        self.connection = connection
        self._broker = connection.broker
        self.auto_decode = True
        self.events: defaultdict[str, set[Callable[..., Any]]] = defaultdict(set)
        self.unacked: dict[int, _Unacked] = {}
        #: Callbacks to run on the connection's thread, in order, from drain_events.
        self.pending: deque[Callable[[], None]] = deque()
        self._prefetch = 0
        self._tags = itertools.count(1)
        self._confirming = False
        self._published = 0

    def next_tag(self) -> int:
        return next(self._tags)

    def has_room(self, consumer: _Consumer) -> bool:
        if consumer.prefetch == 0:
            return True
        held = sum(1 for u in self.unacked.values() if u.consumer == consumer.tag)
        return held < consumer.prefetch

    def exchange_declare(
        self,
        exchange: str,
        type: str,
        *,
        durable: bool = True,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> None:
        self._live()
        self._broker.declare_exchange(exchange, type, arguments)

    def queue_declare(
        self,
        queue: str = "",
        *,
        durable: bool = True,
        auto_delete: bool = False,
        arguments: Mapping[str, Any] | None = None,
    ) -> str:
        self._live()
        return self._broker.declare_queue(queue, arguments)

    def queue_bind(self, queue: str, exchange: str, routing_key: str) -> None:
        self._live()
        self._broker.bind(queue, exchange, routing_key)

    def basic_qos(self, prefetch_size: int, prefetch_count: int, a_global: bool) -> None:
        self._prefetch = prefetch_count

    def basic_consume(self, queue: str, *, callback: Callable[[InboundMessage], None]) -> str:
        broker = self._broker
        with broker._changed:
            self._live()
            broker._queue(queue)
            tag = f"amq.ctag-{next(broker._tags)}"
            broker._consumers.append(_Consumer(tag, queue, self, self._prefetch, callback))
            broker._dispatch()
            return tag

    def basic_cancel(self, consumer_tag: str) -> None:
        broker = self._broker
        with broker._changed:
            broker._consumers = [c for c in broker._consumers if c.tag != consumer_tag]

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> None:
        """Ack ``delivery_tag``; with ``multiple``, every unacked delivery up to it too."""
        with self._broker._changed:
            self._live()
            if not multiple:
                self._broker._settle(self, delivery_tag, None)
                return
            if delivery_tag not in self.unacked:
                unknown = f"PRECONDITION_FAILED - unknown delivery tag {delivery_tag}"
                raise PreconditionFailed(unknown)
            for tag in sorted(t for t in self.unacked if t <= delivery_tag):
                self._broker._settle(self, tag, None)

    def basic_reject(self, delivery_tag: int, requeue: bool) -> None:
        with self._broker._changed:
            self._live()
            self._broker._settle(self, delivery_tag, requeue)

    def confirm_select(self) -> None:
        self._confirming = True

    def basic_publish(
        self,
        msg: OutboundMessage,
        *,
        exchange: str = "",
        routing_key: str = "",
        mandatory: bool = False,
    ) -> None:
        broker = self._broker
        body = msg.body if isinstance(msg.body, bytes) else str(msg.body).encode()
        properties = dict(msg.properties)
        with broker._changed:
            self._live()
            routed = broker._route(exchange, routing_key, body, properties)
            if mandatory and not routed:
                returned = StoredMessage(body, properties, exchange, routing_key)
                self.pending.append(lambda: self._returned(returned))
            if self._confirming:
                self._published += 1
                seq = self._published
                self.pending.append(lambda: self._emit("basic_ack", seq, False))
            broker._changed.notify_all()

    def _returned(self, message: StoredMessage) -> None:
        code, text = NO_ROUTE
        exc = error_for_code(code, text, None, ChannelError)
        self._emit("basic_return", exc, message.exchange, message.routing_key, message)

    def _emit(self, event: str, *args: Any) -> None:
        for callback in list(self.events.get(event, ())):
            callback(*args)

    def _live(self) -> None:
        if self.connection.lost:
            raise RecoverableConnectionError("the memory broker closed the connection")


class MemoryConnection:
    """A connection to a :class:`MemoryBroker` (:class:`worker.adapters.channel.AmqpConnection`)."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.channels: list[MemoryChannel] = []
        #: Set when the broker dropped it: every call raises, as on a dead socket.
        self.lost = False

    def channel(self) -> MemoryChannel:
        with self.broker._changed:
            if self.lost:
                raise RecoverableConnectionError("the memory broker closed the connection")
            channel = MemoryChannel(self)
            self.channels.append(channel)
            return channel

    def drain_events(self, *, timeout: float) -> None:
        """Run what arrived for this connection's channels; TimeoutError if nothing did."""
        broker = self.broker
        deadline = time.monotonic() + timeout
        with broker._changed:
            while True:
                if self.lost:
                    raise RecoverableConnectionError("the memory broker closed the connection")
                broker._expire()
                work = list(self._take())
                if work:
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no events")
                broker._changed.wait(min(left, 0.02))
        for callback in work:  # outside the lock: callbacks ack, publish and take locks
            callback()

    def _take(self) -> Iterator[Callable[[], None]]:
        for channel in self.channels:
            while channel.pending:
                yield channel.pending.popleft()

    def heartbeat_check(self) -> None:
        return None

    def release(self) -> None:
        with self.broker._changed:
            self.broker._close(self)
            self.lost = True

    def info(self) -> Mapping[str, Any]:
        return {"hostname": "memory", "port": None}
