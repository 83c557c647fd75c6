"""The RabbitMQ topology (SPEC §3) as data: declared by the worker, exported for operators."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from worker.adapters.channel import AmqpChannel
from worker.contract.errors import ConfigurationError
from worker.contract.settings import Settings

__all__ = ["Binding", "ExchangeDef", "QueueDef", "Topology", "retry_queue_name"]


@dataclass(frozen=True)
class ExchangeDef:
    name: str
    type: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class QueueDef:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


def _delay_queue(queue_type: str) -> dict[str, Any]:
    """Arguments of a retry queue: replicated like the command queue when that is quorum.

    Quorum retry queues dead-letter at least once (the broker keeps a message until the
    command queue confirmed it), which needs ``reject-publish`` overflow.
    """
    if queue_type != "quorum":
        return {"x-queue-type": "classic"}
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def retry_queue_name(prefix: str, delay_s: float) -> str:
    """``pabx.retry.5s`` for a 5 s step."""
    return f"{prefix}.{delay_s:g}s"


@dataclass(frozen=True)
class Topology:
    """Every exchange, queue and binding pabx-worker relies on."""

    exchanges: tuple[ExchangeDef, ...]
    queues: tuple[QueueDef, ...]
    bindings: tuple[Binding, ...]
    retry_queues: dict[float, str]

    @classmethod
    def from_settings(cls, s: Settings) -> Topology:
        typed = {"x-queue-type": s.queue_type}
        command_args: dict[str, Any] = {**typed, "x-dead-letter-exchange": s.dead_exchange}
        if s.queue_type == "quorum":
            command_args["x-delivery-limit"] = s.delivery_limit
        retry = {d: retry_queue_name(s.retry_queue_prefix, d) for d in s.retry_delays_s}
        retry_defs = tuple(
            QueueDef(
                name,
                {
                    **_delay_queue(s.queue_type),
                    "x-message-ttl": int(delay * 1000),
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": s.command_queue,
                },
            )
            for delay, name in retry.items()
        )
        return cls(
            exchanges=(
                ExchangeDef(s.commands_exchange, "topic"),
                ExchangeDef(s.unrouted_exchange, "fanout"),
                ExchangeDef(
                    s.results_exchange, "topic", {"alternate-exchange": s.unrouted_exchange}
                ),
                ExchangeDef(s.dead_exchange, "topic"),
            ),
            queues=(
                QueueDef(s.command_queue, command_args),
                QueueDef(
                    s.unrouted_exchange,
                    {
                        "x-queue-type": s.queue_type,
                        "x-max-length": s.unrouted_max_length,
                        "x-overflow": "drop-head",
                    },
                ),
                QueueDef(s.parked_queue, dict(typed)),
                *retry_defs,
            ),
            bindings=(
                Binding(s.commands_exchange, s.command_queue, s.routing_key),
                Binding(s.unrouted_exchange, s.unrouted_exchange, ""),
                Binding(s.dead_exchange, s.parked_queue, "#"),
            ),
            retry_queues=retry,
        )

    def declare(self, channel: AmqpChannel) -> None:
        """Declare everything on an open py-amqp channel; a mismatch is a ConfigurationError.

        So is a user without configure permission: producers use ``--no-declare``.
        """
        from amqp.exceptions import AccessRefused

        try:
            self._declare(channel)
        except AccessRefused as exc:
            raise ConfigurationError(
                f"PABX_WORKER_AMQP_URL: this user may not declare the topology ({exc.reply_text});"
                " producers and operators without configure permission pass --no-declare"
            ) from None

    def _declare(self, channel: AmqpChannel) -> None:
        from amqp.exceptions import PreconditionFailed

        for exchange in self.exchanges:
            try:
                channel.exchange_declare(
                    exchange.name,
                    exchange.type,
                    durable=True,
                    auto_delete=False,
                    arguments=exchange.arguments,
                )
            except PreconditionFailed as exc:
                raise _mismatch("exchange", exchange.name, exchange.arguments, exc) from None
        for queue in self.queues:
            try:
                channel.queue_declare(
                    queue.name, durable=True, auto_delete=False, arguments=queue.arguments
                )
            except PreconditionFailed as exc:
                raise _mismatch("queue", queue.name, queue.arguments, exc) from None
        for binding in self.bindings:
            channel.queue_bind(binding.queue, binding.exchange, binding.routing_key)

    def check(
        self, channel: Any, *, exchanges: tuple[str, ...], queues: tuple[str, ...] = ()
    ) -> None:
        """Check passively that an operator declared what a producer needs (``--no-declare``).

        Needs no configure permission; a missing exchange or queue is a ConfigurationError.
        The broker closes ``channel`` on the first one missing: pass a channel of its own.
        """
        from amqp.exceptions import NotFound

        for kind, names in (("exchange", exchanges), ("queue", queues)):
            for name in names:
                try:
                    if kind == "exchange":
                        channel.exchange_declare(name, "topic", passive=True)
                    else:
                        channel.queue_declare(name, passive=True)
                except NotFound:
                    raise ConfigurationError(
                        f"{kind} {name!r} does not exist on the broker: an operator declares the"
                        " topology first (`pabx-worker topology declare` with configure"
                        " permission); --no-declare only checks it"
                    ) from None

    def definitions(self, vhost: str = "/") -> dict[str, Any]:
        """The topology as a RabbitMQ definitions document (``rabbitmqctl import_definitions``)."""
        return {
            "exchanges": [
                {
                    "name": e.name,
                    "vhost": vhost,
                    "type": e.type,
                    "durable": True,
                    "auto_delete": False,
                    "internal": False,
                    "arguments": e.arguments,
                }
                for e in self.exchanges
            ],
            "queues": [
                {
                    "name": q.name,
                    "vhost": vhost,
                    "durable": True,
                    "auto_delete": False,
                    "arguments": q.arguments,
                }
                for q in self.queues
            ],
            "bindings": [
                {
                    "source": b.exchange,
                    "vhost": vhost,
                    "destination": b.queue,
                    "destination_type": "queue",
                    "routing_key": b.routing_key,
                    "arguments": {},
                }
                for b in self.bindings
            ],
        }


def _mismatch(kind: str, name: str, wanted: dict[str, Any], exc: Exception) -> ConfigurationError:
    return ConfigurationError(
        f"{kind} {name!r} already exists with other arguments than {wanted}: {exc}."
        " Delete it, or set the PABX_WORKER_* topology settings to match it."
    )
