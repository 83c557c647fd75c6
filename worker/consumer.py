"""The broker side of the worker: consume, hand commands to threads, publish, ack.

One thread owns the AMQP connection (py-amqp is not thread-safe): it reads
deliveries, sends heartbeats, publishes outcomes and acks. PABX calls run on a
:class:`~worker.dispatch.KeyedExecutor`, so a slow PABX never starves the
heartbeat. Finished jobs come back through a queue and are carried out here:

    deliver → prepare → [thread: execute] → publish (confirms) → ack
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kombu import Connection

from worker import headers as hdr
from worker.broker import broker_errors, connect, where
from worker.circuit import CircuitState
from worker.dispatch import KeyedExecutor
from worker.errors import BrokerError, StoreError
from worker.messages import Delivery, header_count
from worker.models import ErrorInfo
from worker.observability import CIRCUIT_VALUES, Metrics
from worker.outcomes import CONTENT_TYPE, routing_key_for
from worker.pipeline import Decision, Finish, Prepared, Processor, Requeue, Retry
from worker.publisher import ConfirmingPublisher, Publication
from worker.settings import Settings
from worker.topology import Topology

__all__ = ["Worker", "WorkerState"]

log = logging.getLogger("pabx_worker.consumer")

#: Poll interval of the connection thread while commands are in flight.
BUSY_POLL_S = 0.002
#: Poll interval while idle (bounds how fast SIGTERM is noticed).
IDLE_POLL_S = 0.2
#: Longest pause between reconnection attempts.
MAX_RECONNECT_WAIT_S = 10.0
#: How often records past the retention period are dropped from the store.
PURGE_EVERY_S = 3600.0
#: Largest ``x-pabx-error`` header on a parked copy.
MAX_REASON_CHARS = 512
#: Largest encoded size of the producer's headers kept on a parked or retry copy.
MAX_COPIED_HEADER_BYTES = 16 * 1024


@dataclass
class WorkerState:
    """What probes and tests can see of a running worker."""

    connected: bool = False
    consuming: bool = False
    in_flight: int = 0
    sessions: int = 0
    #: Circuit state by PABX target name.
    circuits: dict[str, str] = field(default_factory=dict)
    handled: dict[str, int] = field(default_factory=dict)


@dataclass
class _Job:
    session: int
    delivery_tag: int
    prepared: Prepared
    decision: Decision = field(default_factory=lambda: Requeue("not handled"))
    received: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class _Fate:
    """What the connection thread does with a delivery once it is decided.

    Every publication is published with confirms; the delivery is acked once all are
    confirmed, and given back to the broker if one is not. With ``requeue``, it is given
    back at once.
    """

    publications: tuple[Publication, ...] = ()
    requeue: bool = False


@dataclass
class _Unacked:
    """A delivery waiting for its publications to be confirmed."""

    remaining: int
    ok: bool = True


class Worker:
    """Consumes commands until :meth:`stop`; reconnects when the broker goes away."""

    def __init__(
        self, settings: Settings, processor: Processor, metrics: Metrics | None = None
    ) -> None:
        self._settings = settings
        self._processor = processor
        self._topology = Topology.from_settings(settings)
        self._stop = threading.Event()
        self._done: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._executor = KeyedExecutor(settings.concurrency)
        _tolerate_non_utf8_properties()
        self.state = WorkerState()
        self.metrics = metrics or Metrics()
        self.metrics.in_flight.set_function(lambda: self.state.in_flight)
        self.metrics.connected.set_function(lambda: int(self.state.connected))
        for name, breaker in processor.breakers.items():
            self.metrics.circuit.labels(name).set_function(
                lambda b=breaker: CIRCUIT_VALUES[b.state.value]  # type: ignore[misc]
            )
        self.metrics.store_up.set_function(
            lambda: int(processor.store_breaker.state is CircuitState.CLOSED)
        )
        self.ready = threading.Event()

    def stop(self) -> None:
        """Ask the worker to finish in-flight commands and return from :meth:`run`."""
        self._stop.set()
        self._processor.stopping.set()

    def run(self) -> None:
        """Consume until stopped; a ConfigurationError ends it.

        That is a topology mismatch, refused credentials or vhost, or a TLS certificate
        failure: retrying cannot fix any of them.
        """
        wait = 0.5
        purger = threading.Thread(target=self._purge_loop, name="pabx-purge", daemon=True)
        purger.start()
        try:
            while not self._stop.is_set():
                try:
                    self._session()
                    wait = 0.5
                except BrokerError as exc:
                    log.warning("broker connection lost; reconnecting", extra={"error": str(exc)})
                    self._stop.wait(wait)
                    wait = min(wait * 2, MAX_RECONNECT_WAIT_S)
        finally:
            self._executor.shutdown(wait=False)

    def _purge_loop(self) -> None:
        while True:
            try:
                dropped = self._processor.purge()
                log.debug("purged idempotency records", extra={"dropped": dropped})
            except StoreError as exc:
                log.warning("purge failed", extra={"error": str(exc)})
            if self._stop.wait(PURGE_EVERY_S):
                return

    # -- one connection's lifetime ------------------------------------------------------

    def _session(self) -> None:
        self.state.sessions += 1
        session = self.state.sessions
        connection = connect(
            self._settings.amqp_url,
            start=session - 1,
            heartbeat=self._settings.heartbeat_s,
            ca_file=self._settings.amqp_ca_file,
            cert_file=self._settings.amqp_cert_file,
            key_file=self._settings.amqp_key_file,
        )
        try:
            self.state.connected = True
            log.info("connected to the broker", extra={"broker": where(connection)})
            _Session(self, connection, session).run()
        finally:
            self.state.connected = self.state.consuming = False
            self.ready.clear()
            try:
                connection.release()
            except Exception:  # the socket is already gone
                log.debug("error while closing a dead connection", exc_info=True)

    # -- called from worker threads -----------------------------------------------------

    def _execute(self, job: _Job) -> None:
        """Decide one command's fate on a worker thread (never raises)."""
        try:
            job.decision = self._processor.execute(job.prepared)
        finally:
            self._done.put(job)


class _Session:
    """The loop over one open connection."""

    def __init__(self, worker: Worker, connection: Connection, session: int) -> None:
        self.worker = worker
        self.settings = worker._settings
        self.connection = connection
        self.session = session
        self.unacked: dict[int, _Unacked] = {}
        self.consumer_tag: str | None = None
        self.prefetch = 0

    def run(self) -> None:
        with broker_errors():
            declare_channel = self.connection.channel()
            self.worker._topology.declare(declare_channel)
            self.channel = self.connection.channel()
        # Keep bodies as bytes: py-amqp would turn a body whose content_encoding names a
        # codec (utf-8, latin-1 ...) into str, which the pipeline cannot take.
        self.channel.auto_decode = False
        with broker_errors():
            publisher_channel = self.connection.channel()
        self.publisher = ConfirmingPublisher(publisher_channel)
        with broker_errors():
            self._loop()

    def _loop(self) -> None:
        worker = self.worker
        stop_by: float | None = None
        last_beat = 0.0
        while True:
            self._carry_out_finished()
            if worker._stop.is_set() and stop_by is None:
                stop_by = time.monotonic() + self.settings.shutdown_timeout_s
                self._cancel()
            if stop_by is None:
                self._follow_breaker()
            if stop_by is not None and (self._idle() or time.monotonic() > stop_by):
                return
            timeout = BUSY_POLL_S if worker.state.in_flight or self.unacked else IDLE_POLL_S
            with contextlib.suppress(TimeoutError):
                self.connection.drain_events(timeout=timeout)
            now = time.monotonic()
            if now - last_beat > 1.0:
                self.connection.heartbeat_check()
                last_beat = now

    def _idle(self) -> bool:
        return self.worker.state.in_flight == 0 and not self.unacked

    def _follow_breaker(self) -> None:
        """Consume while the store answers and some PABX target's circuit is not open.

        While every target's circuit is open consumption pauses; while none is closed
        (probing), one command at a time. A command for an open target among closed ones
        waits in a broker-held retry queue.
        """
        processor = self.worker._processor
        states = {name: b.state for name, b in processor.breakers.items()}
        self.worker.state.circuits = {name: st.value for name, st in states.items()}
        store_down = processor.store_breaker.state is not CircuitState.CLOSED
        if store_down or all(st is CircuitState.OPEN for st in states.values()):
            if self.consumer_tag is not None:
                what = "the store does not answer" if store_down else "every PABX keeps failing"
                log.warning("%s: consumption paused", what)
                self._cancel()
            return
        probing = CircuitState.CLOSED not in states.values()
        prefetch = 1 if probing else self.settings.concurrency
        if prefetch != self.prefetch:
            self.channel.basic_qos(0, prefetch, False)
            self.prefetch = prefetch
            if self.consumer_tag is not None:
                # A per-consumer prefetch only applies to consumers created after it
                # (RabbitMQ; quorum queues refuse the global one): consume again, or
                # the probe's limit of 1 outlives the half-open state.
                self.channel.basic_cancel(self.consumer_tag)
                self.consumer_tag = None
        if self.consumer_tag is None:
            self.consumer_tag = self.channel.basic_consume(
                self.settings.command_queue, callback=self._on_message
            )
            self.worker.state.consuming = True
            self.worker.ready.set()
            log.info(
                "consuming",
                extra={
                    "queue": self.settings.command_queue,
                    "circuits": self.worker.state.circuits,
                },
            )

    def _cancel(self) -> None:
        if self.consumer_tag is not None:
            self.channel.basic_cancel(self.consumer_tag)
            self.consumer_tag = None
            self.worker.state.consuming = False
            self.worker.ready.clear()

    def _on_message(self, message: Any) -> None:
        delivery = _to_delivery(message)
        prepared = self.worker._processor.prepare(delivery)
        issued = prepared.command.issued_at if prepared.command else None
        if (since := issued or delivery.timestamp) is not None:
            waited = time.time() - since.timestamp()
            self.worker.metrics.queue_seconds.observe(max(waited, 0.0))
        job = _Job(self.session, message.delivery_tag, prepared)
        self.worker.state.in_flight += 1
        self.worker._executor.submit(prepared.call_key, lambda: self.worker._execute(job))

    def _carry_out_finished(self) -> None:
        done = self.worker._done
        while not done.empty():
            job = done.get_nowait()
            # Counted when it was submitted, whichever connection it came from.
            self.worker.state.in_flight -= 1
            if job.session != self.session:
                continue  # from a lost connection: the broker redelivers that message
            self._carry_out(job)

    def _carry_out(self, job: _Job) -> None:
        fate = _fate(self.settings, self.worker._topology, job)
        tag = job.delivery_tag
        if fate.requeue:
            self.channel.basic_reject(tag, requeue=True)
            return
        self.unacked[tag] = _Unacked(len(fate.publications))
        for publication in fate.publications:
            self.publisher.publish(publication, lambda ok: self._confirmed(tag, ok))
        self._account(job)

    def _account(self, job: _Job) -> None:
        """Metrics and the one log line per handled command."""
        code, attempts, duplicate = None, 0, False
        match job.decision:
            case Finish() as finish:
                key, attempts, duplicate = finish.status.value, finish.attempts, finish.duplicate
                code = finish.error.code if finish.error else None
                self.worker.metrics.commands.labels(key, str(duplicate).lower()).inc()
            case Retry() as retry:
                key, attempts = "retry", retry.attempts
                self.worker.metrics.retries.inc()
            case Requeue():
                return
        self.worker.state.handled[key] = self.worker.state.handled.get(key, 0) + 1
        command = job.prepared.command
        log.info(
            "command %s",
            key,
            extra={
                "command_id": job.prepared.command_id,
                "ID_CHAMADA": command.redirect.ID_CHAMADA if command else None,
                "status": key,
                "error_code": code,
                "attempt": attempts,
                "duplicate": duplicate,
                "duration_ms": round((time.monotonic() - job.received) * 1000, 1),
            },
        )

    def _confirmed(self, delivery_tag: int, ok: bool) -> None:
        pending = self.unacked[delivery_tag]
        pending.remaining -= 1
        pending.ok = pending.ok and ok
        if pending.remaining:
            return
        del self.unacked[delivery_tag]
        if pending.ok:
            self.channel.basic_ack(delivery_tag)
        else:
            self.channel.basic_reject(delivery_tag, requeue=True)


_LENIENT_LOCK = threading.Lock()


def _tolerate_non_utf8_properties() -> None:
    """Let py-amqp read message properties that are not UTF-8 (idempotent).

    py-amqp decodes short strings (content_type, correlation_id, message_id, header
    names ...) as strict UTF-8 while it reads the frame, before any callback: one such
    message from any producer raised out of ``drain_events`` and stopped the worker.
    When the strict decoding fails, the properties are decoded again with U+FFFD for
    the bad bytes; the message is then handled like any other (and rejected when its
    content type or id is unusable).
    """
    from amqp import serialization
    from amqp.spec import Basic

    strict = serialization.PROPERTY_CLASSES[Basic.CLASS_ID]
    if getattr(strict, "lenient", False):
        return

    def lenient_str(value: Any) -> Any:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    def decode(buf: Any, offset: int) -> Any:
        try:
            return strict(buf, offset)
        except UnicodeDecodeError:
            with _LENIENT_LOCK:
                saved = serialization.pstr_t
                serialization.pstr_t = lenient_str
                try:
                    return strict(buf, offset)
                finally:
                    serialization.pstr_t = saved

    decode.lenient = True  # type: ignore[attr-defined]
    serialization.PROPERTY_CLASSES[Basic.CLASS_ID] = decode


def _to_delivery(message: Any) -> Delivery:
    """The message as the pipeline sees it; never raises.

    Properties that cannot be read (a bug, not bad input: each one is handled below) give
    a delivery with the body only, which then ends ``rejected`` like any unusable command.
    """
    try:
        return _read_delivery(message)
    except Exception:
        log.exception("could not read a message's properties")
        body = message.body if isinstance(message.body, bytes | bytearray) else b""
        return Delivery(body=bytes(body))


def _read_delivery(message: Any) -> Delivery:
    props = message.properties
    headers = props.get("application_headers") or {}
    stamp = props.get("timestamp")
    timestamp = None
    if isinstance(stamp, int | float):
        with contextlib.suppress(OverflowError, OSError, ValueError):  # year 10^11
            timestamp = datetime.fromtimestamp(stamp, UTC)
    elif isinstance(stamp, datetime):
        timestamp = stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp
    body = _body_bytes(message.body, props.get("content_encoding"))
    redelivered = bool(message.delivery_info.get("redelivered"))
    return Delivery(
        body=body,
        content_type=props.get("content_type"),
        content_encoding=props.get("content_encoding"),
        message_id=props.get("message_id"),
        correlation_id=props.get("correlation_id"),
        reply_to=props.get("reply_to"),
        user_id=props.get("user_id"),
        timestamp=timestamp,
        headers=headers,
        redelivered=redelivered,
        # Only the broker's count is trusted: a producer may set the header itself.
        delivery_count=header_count(headers, hdr.DELIVERY_COUNT) if redelivered else 0,
    )


def _body_bytes(body: Any, encoding: str | None) -> bytes:
    """The body as bytes: py-amqp gives ``""`` (str) for an empty body."""
    if isinstance(body, str):
        try:
            return body.encode(encoding or "utf-8", "surrogateescape")
        except (LookupError, ValueError):  # unknown codec; a name with a NUL is a ValueError
            return body.encode("utf-8", "surrogatepass")
    return bytes(body)


def _fate(settings: Settings, topology: Topology, job: _Job) -> _Fate:
    """What becomes of a delivery, from its decision: the one place that says so."""
    delivery = job.prepared.delivery
    match job.decision:
        case Requeue():
            return _Fate(requeue=True)
        case Retry() as retry:
            return _Fate((_retry_copy(topology, delivery, retry),))
        case Finish() as finish:
            return _Fate(tuple(_outcome_publications(settings, topology, job.prepared, finish)))
    raise TypeError(f"not a decision: {job.decision!r}")  # pragma: no cover


def _outcome_publications(
    settings: Settings, topology: Topology, prepared: Prepared, finish: Finish
) -> list[Publication]:
    """The outcome event, a reply if asked for, and the parked copy of a failure."""
    delivery = prepared.delivery
    props = {
        "content_type": CONTENT_TYPE,
        "message_id": prepared.event_id,
        "correlation_id": delivery.correlation_id or prepared.command_id,
        "timestamp": int(time.time()),
    }
    props = {k: v for k, v in props.items() if v is not None}
    result = [
        Publication(
            finish.event,
            settings.results_exchange,
            routing_key_for(finish.status),
            props,
            mandatory=True,
        )
    ]
    if delivery.reply_to and _may_reply_to(settings, topology, delivery.reply_to):
        result.append(Publication(finish.event, "", delivery.reply_to, props))
    if finish.park and finish.error is not None and not finish.duplicate:
        result.append(_parked_copy(settings, delivery, finish, finish.error))
    return result


def _may_reply_to(settings: Settings, topology: Topology, queue: str) -> bool:
    """Never reply into the topology: an outcome there would be consumed as a command."""
    own = {
        settings.command_queue,
        settings.parked_queue,
        settings.unrouted_exchange,
        *topology.retry_queues.values(),
    }
    if queue in own or queue.startswith("pabx."):
        log.warning("reply_to names a topology queue: not replied to", extra={"queue": queue})
        return False
    return True


def _original_properties(delivery: Delivery, headers: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = {
        "content_type": delivery.content_type,
        "content_encoding": delivery.content_encoding,
        "message_id": delivery.message_id,
        "correlation_id": delivery.correlation_id,
        "reply_to": delivery.reply_to,
        "application_headers": headers,
    }
    if delivery.timestamp is not None:
        props["timestamp"] = int(delivery.timestamp.timestamp())
    return {k: v for k, v in props.items() if v is not None}


def _retry_copy(topology: Topology, delivery: Delivery, decision: Retry) -> Publication:
    steps = sorted(topology.retry_queues)
    delay = next((s for s in steps if s >= decision.delay_s), steps[-1])
    headers = _copied_headers(delivery)
    headers[hdr.RETRIES] = header_count(headers, hdr.RETRIES) + 1
    headers[hdr.ATTEMPTS] = decision.attempts
    return Publication(
        delivery.body,
        "",
        topology.retry_queues[delay],
        _original_properties(delivery, headers),
        mandatory=True,  # a retry queue that is gone must not swallow the command
    )


def _parked_copy(
    settings: Settings, delivery: Delivery, decision: Finish, error: ErrorInfo
) -> Publication:
    headers = _copied_headers(delivery)
    headers.update(
        {
            hdr.ERROR_CODE: error.code.value,
            hdr.ERROR: error.message[:MAX_REASON_CHARS],
            hdr.ATTEMPTS: decision.attempts,
            hdr.STATUS: decision.status.value,
            hdr.PARKED_AT: datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
    )
    return Publication(
        delivery.body,
        settings.dead_exchange,
        f"{settings.routing_key}.{error.code.value}",
        _original_properties(delivery, headers),
        mandatory=True,
    )


def _copied_headers(delivery: Delivery) -> dict[str, Any]:
    """The producer's headers for a copy, within :data:`MAX_COPIED_HEADER_BYTES`.

    A copy adds headers of its own; producer headers close to the broker's frame size
    would make it unpublishable (FRAME_ERROR closes the connection, the message comes
    back, again and again). Headers past the budget are left out and named.
    """
    from amqp.serialization import dumps

    kept: dict[str, Any] = {}
    dropped: list[str] = []
    budget = MAX_COPIED_HEADER_BYTES
    for name, value in delivery.headers.items():
        if name == hdr.DELIVERY_COUNT:
            continue
        try:
            cost = len(dumps("F", [{name: value}]))
        except Exception:  # not encodable again: leave it out
            cost = budget + 1
        if cost > budget:
            dropped.append(str(name))
            continue
        budget -= cost
        kept[name] = value
    if dropped:
        kept[hdr.DROPPED_HEADERS] = ",".join(dropped)[:MAX_REASON_CHARS]
    return kept
