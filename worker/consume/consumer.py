"""The broker side of the worker: consume, hand commands to threads, publish, ack.

One thread owns the AMQP connection (py-amqp is not thread-safe): it reads
deliveries, sends heartbeats, publishes outcomes and acks. PABX calls run on a
:class:`~worker.consume.dispatch.KeyedExecutor`, so a slow PABX never starves the
heartbeat. Finished jobs come back through a queue and are carried out here:

    deliver → prepare → [thread: execute] → publish (confirms) → ack

Acks of confirmed deliveries are sent once per turn of the connection thread's loop, a
run of consecutive ones as one ``multiple`` ack (:class:`~worker.consume.acks.Acks`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from prometheus_client import Counter, Histogram

from worker.adapters.broker import broker_errors, connect, where
from worker.adapters.channel import AmqpConnection, Connect, InboundMessage
from worker.adapters.confirms import ConfirmingPublisher
from worker.adapters.frames import write_acks
from worker.adapters.systemd import Notifier
from worker.consume.acks import Acks
from worker.consume.circuit import CircuitState
from worker.consume.dispatch import KeyedExecutor
from worker.consume.fate import fate_of, parks
from worker.consume.inbound import to_delivery, tolerate_non_utf8_properties
from worker.consume.observability import CIRCUIT_VALUES, Metrics
from worker.consume.pipeline import Decision, Finish, Prepared, Processor, Requeue, Retry
from worker.contract.errors import BrokerError, StoreError
from worker.contract.models import Status
from worker.contract.settings import Settings
from worker.contract.topology import Topology
from worker.logs import batched
from worker.tracing import log_ids

__all__ = ["Worker", "WorkerState"]

log = logging.getLogger("pabx_worker.consumer")

#: Longest wait of the connection thread for a frame while commands are in flight: finished
#: jobs are carried out after every frame that arrives, and at least this often. Longer
#: waits mean fewer turns of the loop (and GIL hand-overs) per command: 10 ms instead of
#: 2 ms cost 10-15 % less CPU per command in the bench, with the same throughput and
#: latencies (``bench --kinds worker,worker:poll-2ms``).
BUSY_POLL_S = 0.01
#: Deliveries the broker may hand over per worker thread. Twice CONCURRENCY drains some 8 %
#: more in the bench (``bench --kinds worker,worker:prefetch-2x``), but deliveries waiting
#: for a thread are then taken from other workers, and meet a PABX outage as they start:
#: one per thread keeps a worker's share of the queue, and what an outage catches in
#: flight, at CONCURRENCY.
PREFETCH_PER_THREAD = 1
#: Poll interval while idle (bounds how fast SIGTERM is noticed).
IDLE_POLL_S = 0.2
#: How often the loop looks at the circuits and the store (consume, pause, probe): at most
#: once per turn, and no more often than this while frames keep the loop turning.
BREAKER_CHECK_S = 0.005
#: Longest pause between reconnection attempts.
MAX_RECONNECT_WAIT_S = 10.0
#: How often records past the retention period are dropped from the store.
PURGE_EVERY_S = 3600.0


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


@dataclass
class _Unacked:
    """A delivery waiting for its publications to be confirmed."""

    remaining: int
    ok: bool = True


class Worker:
    """Consumes commands until :meth:`stop`; reconnects when the broker goes away.

    ``connect`` opens each session's connection: by default to ``settings.amqp_url``
    (:func:`worker.adapters.broker.connect`); tests pass ``MemoryBroker.connect``.
    """

    def __init__(
        self,
        settings: Settings,
        processor: Processor,
        metrics: Metrics | None = None,
        *,
        connect: Connect | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self._settings = settings
        #: systemd readiness and watchdog (``pabx-worker run``); silent by default.
        self.notifier = notifier or Notifier(environ={})
        self._connect = connect or self._connect_to_broker
        self._processor = processor
        self._topology = Topology.from_settings(settings)
        self._stop = threading.Event()
        #: SHUTDOWN_TIMEOUT_S after :meth:`stop` was first called (``time.monotonic()``).
        self._stop_by: float | None = None
        self._done: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._executor = KeyedExecutor(settings.concurrency)
        tolerate_non_utf8_properties()
        self.state = WorkerState()
        self.metrics = metrics or Metrics()
        self.metrics.in_flight.set_function(lambda: self.state.in_flight)
        self.metrics.connected.set_function(lambda: int(self.state.connected))
        self.metrics.consuming.set_function(lambda: int(self.state.consuming))
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
        if self._stop_by is None:
            self._stop_by = time.monotonic() + self._settings.shutdown_timeout_s
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
                    self.notifier.status("reconnecting to the broker")
                    self.notifier.watchdog()  # alive: retrying, within MAX_RECONNECT_WAIT_S
                    self._stop.wait(wait)
                    wait = min(wait * 2, MAX_RECONNECT_WAIT_S)
        finally:
            self._finish_in_flight()
            self._executor.shutdown(wait=False)

    def _finish_in_flight(self) -> None:
        """Wait, at most SHUTDOWN_TIMEOUT_S from the stop, for the commands still being
        carried out on worker threads, as when the broker connection went away during the
        drain. Their outcomes go nowhere (the broker redelivers those messages), but their
        store steps must end before the store closes: a request sent without its record
        would be sent again by the worker that takes the command over."""
        if self.state.in_flight <= 0:
            return
        deadline = self._stop_by or time.monotonic() + self._settings.shutdown_timeout_s
        while self.state.in_flight > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                log.warning(
                    "stopping with commands still in flight",
                    extra={"in_flight": self.state.in_flight},
                )
                return
            try:
                self._done.get(timeout=min(left, 0.1))
            except queue.Empty:
                continue
            self.state.in_flight -= 1

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

    def _connect_to_broker(self, session: int) -> AmqpConnection:
        """The connection to ``settings.amqp_url`` (failover starts at URL ``session - 1``)."""
        connection: AmqpConnection = connect(
            self._settings.amqp_url,
            start=session - 1,
            heartbeat=self._settings.heartbeat_s,
            ca_file=self._settings.amqp_ca_file,
            cert_file=self._settings.amqp_cert_file,
            key_file=self._settings.amqp_key_file,
        )
        return connection

    def _session(self) -> None:
        self.state.sessions += 1
        session = self.state.sessions
        connection = self._connect(session)
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

    def __init__(self, worker: Worker, connection: AmqpConnection, session: int) -> None:
        self.worker = worker
        self.settings = worker._settings
        self.connection = connection
        self.session = session
        self.unacked: dict[int, _Unacked] = {}
        self.acks = Acks()
        self.consumer_tag: str | None = None
        self.prefetch = 0
        #: The commands counter's and outcome histogram's series of each outcome kind.
        self.meters: dict[tuple[Status, bool], tuple[Counter, Histogram]] = {}
        #: When the circuits were last looked at (:meth:`_follow_breaker`).
        self.breakers_seen = -math.inf

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
            worker.notifier.watchdog()  # this loop turning is what "alive" means
            with batched():  # a line per command, one write for all of them
                self._carry_out_finished()
            if worker._stop.is_set() and stop_by is None:
                stop_by = worker._stop_by or time.monotonic()
                self._cancel()
            now = time.monotonic()
            if stop_by is None and now - self.breakers_seen >= BREAKER_CHECK_S:
                self.breakers_seen = now
                self._follow_breaker()
            if stop_by is not None and (self._idle() or time.monotonic() > stop_by):
                return
            timeout = BUSY_POLL_S if worker.state.in_flight or self.unacked else IDLE_POLL_S
            with contextlib.suppress(TimeoutError):
                self.connection.drain_events(timeout=timeout)
            self._send_acks()  # confirmed while publishing or in this drain
            now = time.monotonic()
            if now - last_beat > 1.0:
                self.connection.heartbeat_check()
                last_beat = now

    def _send_acks(self) -> None:
        acks = self.acks.flush()
        if acks and not write_acks(self.channel, acks):  # not a py-amqp channel
            for tag, multiple in acks:
                self.channel.basic_ack(tag, multiple=multiple)

    def _idle(self) -> bool:
        return self.worker.state.in_flight == 0 and not self.unacked and not self.acks.waiting

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
                self.worker.notifier.status(f"paused: {what}")
                self._cancel()
            return
        probing = CircuitState.CLOSED not in states.values()
        prefetch = 1 if probing else self.settings.concurrency * PREFETCH_PER_THREAD
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
            self.worker.notifier.ready(f"consuming {self.settings.command_queue}")
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

    def _on_message(self, message: InboundMessage) -> None:
        delivery = to_delivery(message)
        prepared = self.worker._processor.prepare(delivery)
        if (issued := prepared.issued) is not None:
            self.worker.metrics.queue_seconds.observe(max(time.time() - issued, 0.0))
        job = _Job(self.session, message.delivery_tag, prepared)
        self.acks.delivered(message.delivery_tag)
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
        fate = fate_of(self.settings, self.worker._topology, job.prepared, job.decision)
        tag = job.delivery_tag
        if fate.requeue:
            self.channel.basic_reject(tag, requeue=True)
            self.acks.settled(tag)
            return
        self.unacked[tag] = _Unacked(len(fate.publications))
        for publication in fate.publications:
            self.publisher.publish(publication, lambda ok: self._confirmed(tag, ok))
        self._account(job)

    def _meter(self, finish: Finish, seconds: float) -> None:
        metrics, key = self.worker.metrics, (finish.status, finish.duplicate)
        series = self.meters.get(key)
        if series is None:  # a label lookup once per status, not once per command
            status = finish.status.value
            series = (
                metrics.commands.labels(status, str(finish.duplicate).lower()),
                metrics.outcome_seconds.labels(status),
            )
            self.meters[key] = series
        series[0].inc()
        series[1].observe(seconds)
        if parks(finish):
            metrics.parked.inc()

    def _account(self, job: _Job) -> None:
        """Metrics and the one log line per handled command."""
        code, attempts, duplicate = None, 0, False
        trace: Mapping[str, str] = {}
        match job.decision:
            case Finish() as finish:
                key, attempts, duplicate = finish.status.value, finish.attempts, finish.duplicate
                code, trace = (finish.error.code if finish.error else None), finish.trace
                self._meter(finish, time.monotonic() - job.received)
            case Retry() as retry:
                key, attempts, trace = "retry", retry.attempts, retry.trace
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
                **log_ids(trace),
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
            self.acks.ready(delivery_tag)  # sent by _send_acks, after this drain
        else:
            self.channel.basic_reject(delivery_tag, requeue=True)
            self.acks.settled(delivery_tag)
