"""The producer side: publish commands with confirms and wait for their outcomes.

Used by ``pabx-worker send`` and ``demo``; usable from any Python program::

    with Producer(settings) as producer:
        producer.publish([command_bytes], reply=True)
        outcome = producer.wait_outcomes({command_id}, timeout=10)
"""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from worker.adapters.broker import broker_errors, connect
from worker.adapters.confirms import ConfirmingPublisher, Publication
from worker.contract.errors import BrokerError, ConfigurationError
from worker.contract.settings import Settings
from worker.contract.topology import Topology
from worker.tracing import NO_TRACING, Tracing

__all__ = ["Outgoing", "Producer", "PublishReport", "raw_body"]


#: Publications in flight before :meth:`Producer.publish_messages` waits for confirms.
DEFAULT_WINDOW = 512


@dataclass(frozen=True)
class Outgoing:
    """One message for :meth:`Producer.publish_messages`.

    ``properties`` are AMQP basic properties (``content_type``, ``message_id``,
    ``correlation_id``, ``reply_to``, ``timestamp``, ``application_headers`` …);
    ``delivery_mode`` is always 2 (persistent). ``context`` is the caller's, untouched.
    """

    body: bytes
    properties: Mapping[str, Any] = field(default_factory=dict)
    context: Any = None

    @classmethod
    def command(cls, body: bytes, command_id: str, context: Any = None) -> Outgoing:
        """A command as ``send`` and ``batch`` publish it: JSON, ids set to the command id."""
        props = {
            "content_type": "application/json",
            "correlation_id": command_id,
            "message_id": command_id,
        }
        return cls(body, props, context)

    @property
    def correlation_id(self) -> str | None:
        value = self.properties.get("correlation_id")
        return str(value) if value is not None else None


@dataclass
class PublishReport:
    """What became of each message given to :meth:`Producer.publish_messages`."""

    confirmed: list[Outgoing] = field(default_factory=list)
    #: Refused (nack) or returned as unroutable, with the reason.
    failed: list[tuple[Outgoing, str]] = field(default_factory=list)
    #: Published but not confirmed when the connection failed: may or may not be queued.
    unsettled: list[Outgoing] = field(default_factory=list)
    #: Why publishing stopped early (connection lost, no confirms), else None.
    error: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.unsettled and self.error is None


OnSettled = Callable[[Outgoing, bool, str | None], None]


def raw_body(message: Any) -> bytes:
    """A py-amqp message's body as bytes (py-amqp decodes it when it names an encoding)."""
    body = message.body
    if isinstance(body, str):
        return body.encode(message.properties.get("content_encoding") or "utf-8")
    return bytes(body)


class Producer:
    """Publishes commands to ``pabx.commands`` and collects outcome events by correlation id.

    Use one from one thread at a time, as the py-amqp connection under it is: give each
    thread that publishes a producer of its own.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        declare: bool = True,
        needs: tuple[str, ...] = (),
        tracing: Tracing = NO_TRACING,
    ) -> None:
        """Connect; declare the topology, or with ``declare=False`` only check it passively.

        ``needs`` names queues the caller will read (the parked queue), checked too.
        ``tracing``: each command starts a trace, its ``traceparent`` in the AMQP headers.
        """
        self._settings = settings
        self._tracing = tracing
        self._connection = connect(
            settings.amqp_url,
            ca_file=settings.amqp_ca_file,
            cert_file=settings.amqp_cert_file,
            key_file=settings.amqp_key_file,
        )
        topology = Topology.from_settings(settings)
        with broker_errors():
            channel = self._connection.channel()
        if declare:
            with broker_errors():
                topology.declare(channel)
        else:
            try:
                with broker_errors():
                    topology.check(channel, exchanges=(settings.commands_exchange,), queues=needs)
            except ConfigurationError:
                self.close()
                raise
        with broker_errors():
            publisher_channel = self._connection.channel()
        self._publisher = ConfirmingPublisher(publisher_channel)
        self._reply_queue: str | None = None
        self._outcomes: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection
            self._connection.release()

    @property
    def reply_queue(self) -> str:
        """An exclusive queue receiving the outcomes of commands sent with ``reply=True``."""
        if self._reply_queue is None:
            with broker_errors():
                channel = self._connection.channel()
            name, _, _ = channel.queue_declare("", exclusive=True, auto_delete=True)
            channel.basic_consume(name, callback=self._on_outcome, no_ack=True)
            self._reply_queue = name
        return self._reply_queue

    def publish(
        self, bodies: Iterable[tuple[bytes, str]], *, reply: bool = False, timeout: float = 30.0
    ) -> None:
        """Publish ``(body, correlation_id)`` pairs; returns once the broker confirmed all."""
        report = self.publish_messages(
            (Outgoing.command(body, cid) for body, cid in bodies), reply=reply, timeout=timeout
        )
        if report.error is not None:
            raise BrokerError(report.error)
        refused = [m.correlation_id for m, _ in report.failed]
        if refused or report.unsettled:
            raise BrokerError(
                f"the broker refused or could not route {len(refused)} command(s): {refused[:5]}"
                f" (is a queue bound to {self._settings.commands_exchange!r}?)"
            )

    def wait_outcomes(self, correlation_ids: set[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Outcome events received for these ids within ``timeout`` seconds."""
        self._drain_until(lambda: correlation_ids <= self._outcomes.keys(), timeout)
        return {cid: self._outcomes[cid] for cid in correlation_ids if cid in self._outcomes}

    def _on_outcome(self, message: Any) -> None:
        cid = message.properties.get("correlation_id") or str(uuid.uuid4())
        self._outcomes[cid] = json.loads(message.body)

    def _drain_until(self, done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                with broker_errors():
                    self._connection.drain_events(timeout=min(left, 0.2))
            except BrokerError as exc:
                if isinstance(exc.__cause__, TimeoutError | socket.timeout):
                    continue
                raise

    # -- many messages, pipelined ---------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self._settings

    def channel(self) -> Any:
        """A new py-amqp channel on this producer's connection (e.g. to read a queue)."""
        with broker_errors():
            return self._connection.channel()

    def publish_messages(
        self,
        messages: Iterable[Outgoing],
        *,
        reply: bool = False,
        exchange: str | None = None,
        routing_key: str | None = None,
        window: int = DEFAULT_WINDOW,
        rate: float | None = None,
        timeout: float = 30.0,
        on_settled: OnSettled | None = None,
    ) -> PublishReport:
        """Publish with ``mandatory`` and pipelined confirms; report each message's fate.

        At most ``window`` messages wait for their confirm at once; ``rate`` caps the
        messages sent per second. ``on_settled(message, ok, reason)`` runs as each
        confirm (or refusal) arrives. The iterable is consumed lazily, so it may read
        from the broker itself. Connection loss does not raise: ``report.error`` says
        why publishing stopped and ``report.unsettled`` lists what was not confirmed.
        """
        run = _PublishRun(on_settled)
        try:
            self._publish_all(run, messages, reply, exchange, routing_key, window, rate, timeout)
        except BrokerError as exc:
            run.report.error = str(exc)
        run.report.unsettled.extend(run.pending.values())
        return run.report

    def _publish_all(
        self,
        run: _PublishRun,
        messages: Iterable[Outgoing],
        reply: bool,
        exchange: str | None,
        routing_key: str | None,
        window: int,
        rate: float | None,
        timeout: float,
    ) -> None:
        target = (
            self._settings.commands_exchange if exchange is None else exchange,
            self._settings.routing_key if routing_key is None else routing_key,
        )
        extra = {"reply_to": self.reply_queue} if reply else {}
        started = time.monotonic()
        for count, message in enumerate(messages):
            if rate is not None:
                self._drain_for(started + count / rate - time.monotonic())
            if len(run.pending) >= window:
                self._await_confirms(run, lambda: len(run.pending) < window, timeout)
            props = {"timestamp": int(time.time()), **extra, **message.properties}
            props.pop("delivery_mode", None)
            key = run.add(message)
            with self._tracing.producer_span(str(props.get("message_id"))) as (_, trace):
                if trace:
                    props["application_headers"] = {**props.get("application_headers", {}), **trace}
                publication = Publication(message.body, *target, props, mandatory=True)
                with broker_errors():
                    self._publisher.publish(publication, functools.partial(run.settle, key))
        self._await_confirms(run, lambda: not run.pending, timeout)

    def _await_confirms(self, run: _PublishRun, done: Callable[[], bool], timeout: float) -> None:
        """Drain until ``done()``; a broker that confirms nothing for ``timeout`` s is an error."""
        while not done():
            settled = run.settled
            self._drain_until(lambda s=settled: done() or run.settled != s, timeout)
            if not done() and run.settled == settled:
                raise BrokerError(f"no publisher confirm from the broker within {timeout:g} s")

    def idle(self, seconds: float) -> None:
        """Wait ``seconds`` while serving the connection (heartbeats, returns, confirms)."""
        self._drain_for(seconds)

    def _drain_for(self, seconds: float) -> None:
        if seconds > 0:
            self._drain_until(lambda: False, seconds)

    def wait_for(
        self,
        correlation_ids: Iterable[str],
        timeout: float,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """Like :meth:`wait_outcomes`, reporting the number received so far to ``progress``."""
        wanted = set(correlation_ids)
        deadline = time.monotonic() + timeout
        while True:
            have = wanted & self._outcomes.keys()
            if progress is not None:
                progress(len(have))
            left = deadline - time.monotonic()
            if have == wanted or left <= 0:
                return {cid: self._outcomes[cid] for cid in have}
            self._drain_until(lambda: wanted <= self._outcomes.keys(), min(left, 0.25))


class _PublishRun:
    """Book-keeping of one :meth:`Producer.publish_messages` call."""

    def __init__(self, on_settled: OnSettled | None) -> None:
        self.on_settled = on_settled
        self.report = PublishReport()
        self.pending: dict[int, Outgoing] = {}
        self.settled = 0
        self._next = 0

    def add(self, message: Outgoing) -> int:
        self._next += 1
        self.pending[self._next] = message
        return self._next

    def settle(self, key: int, ok: bool) -> None:
        message = self.pending.pop(key)
        self.settled += 1
        reason = None if ok else "refused by the broker, or unroutable (no queue bound for it)"
        if reason is None:
            self.report.confirmed.append(message)
        else:
            self.report.failed.append((message, reason))
        if self.on_settled is not None:
            self.on_settled(message, reason is None, reason)
