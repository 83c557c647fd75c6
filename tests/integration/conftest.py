"""Integration harness: a real RabbitMQ, the simulator over HTTP, a worker thread, pika peers."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pika
import pytest
import requests

from worker.app import build_processor
from worker.consumer import Worker
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


@dataclass
class Peer:
    """A pika client: publishes commands and reads results, parked and unrouted messages."""

    settings: Settings
    connection: pika.BlockingConnection
    channel: Any
    results_queue: str = ""
    seen: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)

    def publish(self, body: bytes | dict[str, Any], **props: Any) -> None:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        props.setdefault("content_type", "application/json")
        props.setdefault("delivery_mode", 2)
        self.channel.basic_publish(
            self.settings.commands_exchange,
            self.settings.routing_key,
            raw,
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


@pytest.fixture
def settings(amqp_url: str, sim: SimulatorThread) -> Settings:
    return private_settings(amqp_url, sim.url)


@pytest.fixture
def peer(settings: Settings) -> Iterator[Peer]:
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
    def __init__(self, settings: Settings) -> None:
        self._processor_cm = build_processor(settings)
        self.processor = self._processor_cm.__enter__()
        self.worker = Worker(settings, self.processor)
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
def worker(settings: Settings, peer: Peer) -> Iterator[RunningWorker]:
    running = RunningWorker(settings)
    yield running
    running.stop()
    assert running.error is None
