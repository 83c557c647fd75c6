"""The bench's side of the broker: declaring, publishing commands, reading outcome events."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from typing import Any

import pika
import pika.exceptions

from bench.commands import command_body, command_id
from bench.options import BenchError
from bench.processes import Child
from tests.kit import topology as kit_topology
from worker.contract.settings import Settings
from worker.contract.topology import Topology

__all__ = ["STALL_S", "Broker", "OutcomeReader"]

#: A scenario ends early when no outcome arrived for this long.
STALL_S = 30.0


def _pika_params(url: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    params.blocked_connection_timeout = 60
    return params


class Broker:
    """A pika connection for declaring, publishing commands and asking queue depths."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.connection = pika.BlockingConnection(_pika_params(url))
        self.channel = self.connection.channel()

    def _fresh_channel(self) -> Any:
        if not self.channel.is_open:
            self.channel = self.connection.channel()
        return self.channel

    def declare(self, topology: Topology) -> None:
        kit_topology.declare(self._fresh_channel(), topology)

    def delete(self, topology: Topology) -> None:
        for q in topology.queues:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._fresh_channel().queue_delete(q.name)
        for ex in topology.exchanges:
            with contextlib.suppress(pika.exceptions.AMQPError):
                self._fresh_channel().exchange_delete(ex.name)

    def depth(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers) of a queue."""
        method = self._fresh_channel().queue_declare(queue, passive=True).method
        return int(method.message_count), int(method.consumer_count)

    def publish_command(self, settings: Settings, prefix: str, index: int) -> float:
        """Publish one command now (no confirm: the drain check counts them); its publish time."""
        now = time.time()
        cid = command_id(prefix, index)
        self.channel.basic_publish(
            settings.commands_exchange,
            settings.routing_key,
            command_body(prefix, index, now),
            pika.BasicProperties(
                content_type="application/json",
                delivery_mode=2,
                message_id=cid,
                correlation_id=cid,
                timestamp=int(now),
            ),
        )
        return now

    def fill(self, settings: Settings, prefix: str, count: int, start: int = 0) -> list[float]:
        """Publish ``count`` commands and wait until the queue holds them all."""
        self._fresh_channel()
        stamps = []
        for i in range(start, start + count):
            stamps.append(self.publish_command(settings, prefix, i))
            if i % 1000 == 999:
                self.connection.process_data_events(0)
        return stamps

    def wait_depth(self, queue: str, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.depth(queue)[0] >= count:
                return
            self.connection.sleep(0.1)
        raise BenchError(f"queue {queue} did not reach {count} messages in {timeout:g} s")

    def wait_consumers(self, queue: str, count: int, timeout: float, children: list[Child]) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.depth(queue)[1] >= count:
                    return
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:  # 404: not declared yet, so no consumer yet
                    raise
            for child in children:
                if not child.alive():
                    raise BenchError(f"{child.name} exited: {child.log_tail()}")
            self.connection.sleep(0.1)
        raise BenchError(f"{count} consumer(s) did not appear on {queue} in {timeout:g} s")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.close()


class OutcomeReader(threading.Thread):
    """Consumes the results exchange and notes when each command's first outcome arrived."""

    def __init__(self, url: str, exchange: str, *, keep_bodies: bool = True) -> None:
        super().__init__(name="bench-reader", daemon=True)
        self.connection = pika.BlockingConnection(_pika_params(url))
        self.channel = self.connection.channel()
        queue = self.channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.channel.queue_bind(queue, exchange, "#")
        self.channel.basic_consume(queue, self._on_message, auto_ack=True)
        self.keep_bodies = keep_bodies
        #: command id → arrival time of its first outcome.
        self.arrivals: dict[str, float] = {}
        self.bodies: dict[str, bytes] = {}
        #: command-id prefix → outcomes (first ones) received.
        self.counts: dict[str, int] = {}
        self.total = 0
        self.last_arrival = time.monotonic()
        self.error: BaseException | None = None

    def _on_message(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        now = time.time()
        self.total += 1
        self.last_arrival = time.monotonic()
        cid = props.correlation_id or ""
        if cid in self.arrivals:
            return
        self.arrivals[cid] = now
        if self.keep_bodies:
            self.bodies[cid] = body
        prefix = cid.rpartition("-")[0]
        self.counts[prefix] = self.counts.get(prefix, 0) + 1

    def run(self) -> None:
        try:
            self.channel.start_consuming()
        except BaseException as exc:  # reported by wait_for
            self.error = exc

    def wait_for(
        self, prefix: str, count: int, timeout: float, children: Iterable[Child] = ()
    ) -> str | None:
        """Wait until ``count`` outcomes of ``prefix`` arrived; the reason if they did not."""
        deadline = time.monotonic() + timeout
        while self.counts.get(prefix, 0) < count:
            if self.error is not None:
                return f"outcome reader failed: {self.error!r}"
            for child in children:
                if not child.alive():
                    return f"{child.name} exited with {child.proc.returncode}: {child.log_tail()}"
            now = time.monotonic()
            if now > deadline:
                return f"timed out after {timeout:g} s"
            if now - self.last_arrival > STALL_S:
                return f"no outcome for {STALL_S:g} s"
            time.sleep(0.02)
        return None

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.add_callback_threadsafe(self.channel.stop_consuming)
        self.join(10)
        with contextlib.suppress(Exception):
            self.connection.close()
