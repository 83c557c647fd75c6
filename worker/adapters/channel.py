"""What the consumer needs of an AMQP connection and its channels, as typed protocols.

The real path is kombu's ``Connection`` and the py-amqp ``Channel`` it opens (see
:func:`worker.adapters.broker.connect`): they satisfy these protocols as they are, so nothing on the
wire changes. :class:`worker.tools.memory_broker.MemoryBroker` is the in-memory one, for tests.

Only the calls the worker makes are here, with py-amqp's names and argument order::

    connection.channel() → channel
    channel.exchange_declare / queue_declare / queue_bind      (Topology.declare)
    channel.basic_qos / basic_consume / basic_cancel           (consuming)
    channel.basic_ack / basic_reject                           (settling a delivery)
    channel.confirm_select / basic_publish / channel.events    (publishing with confirms)
    connection.drain_events / heartbeat_check / release        (the connection thread)

``channel.events`` maps ``basic_ack`` and ``basic_nack`` to callbacks taking
``(delivery_tag, multiple)``, and ``basic_return`` to callbacks taking
``(exc, exchange, routing_key, message)``. All callbacks, and those given to
``basic_consume``, run on the connection's thread, from ``drain_events``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = ["AmqpChannel", "AmqpConnection", "Connect", "InboundMessage", "OutboundMessage"]


class InboundMessage(Protocol):
    """A delivery as a consumer callback gets it (py-amqp's ``Message``)."""

    @property
    def body(self) -> Any:
        """Bytes with ``auto_decode`` off (py-amqp gives ``""`` for an empty body)."""

    @property
    def properties(self) -> Mapping[str, Any]:
        """py-amqp property names: ``content_type``, ``application_headers`` ..."""

    @property
    def delivery_info(self) -> Mapping[str, Any]:
        """``delivery_tag``, ``redelivered``, ``exchange``, ``routing_key``."""

    @property
    def delivery_tag(self) -> int: ...


class OutboundMessage(Protocol):
    """A message to publish (py-amqp's ``Message`` built by the publisher)."""

    @property
    def body(self) -> Any: ...

    @property
    def properties(self) -> Mapping[str, Any]: ...


class AmqpChannel(Protocol):
    """One AMQP channel."""

    #: Off: bodies stay bytes whatever their ``content_encoding``.
    auto_decode: bool

    @property
    def events(self) -> Mapping[str, set[Callable[..., Any]]]: ...

    def exchange_declare(
        self,
        exchange: str,
        type: str,
        *,
        durable: bool,
        auto_delete: bool,
        arguments: Mapping[str, Any] | None,
    ) -> Any: ...

    def queue_declare(
        self, queue: str, *, durable: bool, auto_delete: bool, arguments: Mapping[str, Any] | None
    ) -> Any: ...

    def queue_bind(self, queue: str, exchange: str, routing_key: str) -> Any: ...

    def basic_qos(self, prefetch_size: int, prefetch_count: int, a_global: bool) -> Any: ...

    def basic_consume(self, queue: str, *, callback: Callable[[InboundMessage], None]) -> str: ...

    def basic_cancel(self, consumer_tag: str) -> Any: ...

    def basic_ack(self, delivery_tag: int, multiple: bool = False) -> Any:
        """Ack one delivery; with ``multiple``, every unacked one up to ``delivery_tag``."""

    def basic_reject(self, delivery_tag: int, requeue: bool) -> Any: ...

    def confirm_select(self) -> Any: ...

    def basic_publish(
        self, msg: OutboundMessage, *, exchange: str, routing_key: str, mandatory: bool
    ) -> Any: ...


class AmqpConnection(Protocol):
    """One open connection to a broker."""

    def channel(self) -> AmqpChannel: ...

    def drain_events(self, *, timeout: float) -> Any:
        """Run the callbacks of what arrived; raise TimeoutError if nothing did in time."""

    def heartbeat_check(self) -> Any: ...

    def release(self) -> None: ...

    def info(self) -> Mapping[str, Any]:
        """``hostname`` and ``port``, for logs (never credentials)."""


#: Opens the connection of session ``n`` (1, 2, ...); raises BrokerError or
#: ConfigurationError as :func:`worker.adapters.broker.connect` does.
Connect = Callable[[int], AmqpConnection]
