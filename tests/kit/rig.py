"""A scenario's world (the chaos tests, the campaign, the bad-input tests): a simulator,
a private topology, and a reader of every outcome event from a durable queue bound to the
results exchange with ``#``."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import pika
import pika.exceptions

from tests.kit import topology
from tests.kit.events import Peer, Seen
from tests.kit.official_sdk import read_outcome
from tests.kit.processes import set_faults, sim_requests
from tests.kit.samples import API_KEY
from tests.kit.topology import private_settings
from worker.contract.settings import Settings
from worker.contract.topology import Topology
from worker.tools.simulator import SimulatorThread

__all__ = ["Rig"]


class Rig:
    """One scenario's world: a simulator, a private topology, a reader of outcome events."""

    def __init__(self, amqp_url: str, *, api_key: str = API_KEY, **settings: Any) -> None:
        self.amqp_url = amqp_url
        self.sim = SimulatorThread(api_key=api_key).start()
        settings.setdefault("pabx_api_key", api_key)
        self.settings = private_settings(amqp_url, self.sim.url, **settings)
        self.topology = Topology.from_settings(self.settings)
        #: Retry queues declared by workers on variants of the settings, deleted at the end.
        self._extra_queues: set[str] = set()
        self.results_queue = self.settings.command_queue.replace(".redirect", ".chaos-results")
        self.seen: list[Seen] = []
        self._closers: list[Callable[[], None]] = []
        self._connect(declare=True)

    # -- broker side ----------------------------------------------------------------

    def _connect(self, declare: bool = False) -> None:
        params = pika.URLParameters(self.amqp_url)
        params.heartbeat = 600
        connection = pika.BlockingConnection(params)
        channel = connection.channel()
        channel.confirm_delivery()
        if declare:
            topology.declare(channel, self.topology)
            channel.queue_declare(self.results_queue, durable=True)
            channel.queue_bind(self.results_queue, self.settings.results_exchange, "#")
        self.peer = Peer(self.settings, connection, channel, self.results_queue)

    def reconnect(self, timeout: float = 120.0) -> None:
        """Open a new reader connection (after a broker restart)."""
        with contextlib.suppress(Exception):
            self.peer.connection.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._connect()
                return
            except pika.exceptions.AMQPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def variant(self, **updates: Any) -> Settings:
        """The rig's settings (same topology names) with ``updates``, cleaned up at the end."""
        settings = self.settings.model_copy(update=updates)
        self._extra_queues.update(Topology.from_settings(settings).retry_queues.values())
        return settings

    def publish(self, commands: Iterable[dict[str, Any]], **props: Any) -> None:
        for cmd in commands:
            cid = cmd["command_id"]
            self.peer.publish(cmd, correlation_id=cid, message_id=cid, **props)

    def queue_length(self, queue: str | None = None) -> int:
        return self.peer.queue_length(queue or self.settings.command_queue)

    def pending(self) -> dict[str, int]:
        """Messages ready in the command queue and in every retry queue."""
        names = [self.settings.command_queue, *self.topology.retry_queues.values()]
        return {name: self.queue_length(name) for name in names}

    def consumers(self) -> int:
        ok = self.peer.channel.queue_declare(self.settings.command_queue, passive=True)
        return int(ok.method.consumer_count)

    def drain(self, queue: str) -> list[tuple[Any, bytes]]:
        got: list[tuple[Any, bytes]] = []
        while True:
            method, props, body = self.peer.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.append((props, body))

    # -- outcome events ---------------------------------------------------------------

    def poll(self) -> int:
        """Read every outcome event waiting in the results queue; returns how many."""
        got = 0
        while True:
            method, props, body = self.peer.channel.basic_get(self.results_queue, auto_ack=True)
            if method is None:
                return got
            event = read_outcome(body, props.content_type, props.headers)
            self.seen.append(Seen(event, props, body, time.monotonic()))
            got += 1

    def events(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for seen in self.seen:
            cid = seen.event["data"]["command_id"]
            found.setdefault(cid, []).append(seen.event)
        return found

    def finished(self) -> set[str]:
        self.poll()
        return {s.event["data"]["command_id"] for s in self.seen}

    def wait_outcomes(self, ids: Iterable[str], timeout: float) -> bool:
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            if wanted <= self.finished():
                return True
            if time.monotonic() > deadline:
                return False
            self.peer.connection.sleep(0.05)

    def settle(self, seconds: float = 0.5) -> None:
        """Let stragglers (re-published events, retry copies) arrive, then read them."""
        self.peer.connection.sleep(seconds)
        self.poll()

    # -- PABX side --------------------------------------------------------------------

    def faults(self, **faults: Any) -> None:
        set_faults(self.sim, **faults)

    def pabx_requests(self) -> list[dict[str, Any]]:
        return sim_requests(self.sim, timeout=10)

    def requests_by_command(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for record in self.pabx_requests():
            body = record.get("body")
            if isinstance(body, dict):
                counts[str(body.get("DADOS") or body.get("ID_CHAMADA"))] += 1
        return counts

    # -- clean-up ---------------------------------------------------------------------

    def on_close(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def close(self) -> None:
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        with contextlib.suppress(Exception):
            self.reconnect(timeout=10)
        extra = [*sorted(self._extra_queues), self.results_queue]
        topology.delete(self.peer.channel, self.topology, extra, quiet=True)
        with contextlib.suppress(Exception):
            self.peer.connection.close()
        self.sim.stop()
