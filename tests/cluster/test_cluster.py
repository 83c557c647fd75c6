"""The worker on a real three-node RabbitMQ cluster: its node goes away mid-stream.

A private cluster (``pabxc1..3@localhost``, AMQP 5681-5683, see rabbit_cluster.py) is formed for
this module and thrown away afterwards; the shared ``rabbit@localhost`` is never touched.

Scenario: the command queue is a quorum queue with a member on every node and its leader on
node 2; the worker is given the URLs ``node2;node1;node3`` (kombu's failover list) and so
consumes through node 2; a pika producer publishes a paced stream of commands to node 1 with
publisher confirms. A third into the stream node 2 is stopped (``rabbitmqctl stop_app``): the
worker's connection and the queue's leader go away together. Later node 2 is started again.
Every confirmed command must get exactly one outcome (one distinct event id), none lost, and
none sent to the PABX twice.

The figures (formation time, outcomes by status, lost, surplus PABX requests, recovery time)
are printed as one ``[cluster-report]`` JSON line: run with ``-s`` to see them.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.conftest import IN_CI
from tests.kit.processes import ClusterURLs, RunningWorker, find_sbin, local_cluster, set_faults
from tests.kit.processes import sim_requests as recorded_requests
from tests.kit.samples import API_KEY, command
from tests.kit.topology import declare, private_settings
from worker.contract.settings import Settings
from worker.contract.topology import Topology
from worker.tools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

COMMANDS = int(os.environ.get("PABX_CLUSTER_COMMANDS", "300"))
BASE_PORT = int(os.environ.get("PABX_CLUSTER_BASE_PORT", "5681"))
#: Pause between two publishes: the stream lasts about COMMANDS * this.
PUBLISH_GAP_S = 0.02
#: Simulated PABX latency.
PABX_LATENCY_MS = 100
#: Node the worker consumes through and that is stopped mid-stream (1-based).
VICTIM = 2


def _require_rabbitmq_server() -> None:
    if os.environ.get("PABX_SKIP_CLUSTER") == "1":
        pytest.skip("PABX_SKIP_CLUSTER=1")
    if find_sbin() is None:
        message = "rabbitmq-server is not on PATH: cannot start a local cluster"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: set PABX_SKIP_CLUSTER=1 to skip)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterURLs]:
    _require_rabbitmq_server()
    directory = tmp_path_factory.mktemp("rabbit-cluster")
    with local_cluster(directory, 3, BASE_PORT, slots=4) as urls:  # 4: concurrent runs
        yield urls


@pytest.fixture(scope="module")
def cluster_sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(api_key=API_KEY) as sim:
        yield sim


def _connect(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def _declare_topology(urls: list[str], settings: Settings, results_queue: str) -> None:
    """Declare the command queue through the victim node (so its leader is there), the rest
    through node 1 (classic retry/unrouted queues live on their declaring node, and that one
    must stay up), and a quorum results queue for the test through node 3."""
    topology = Topology.from_settings(settings)
    command_queue = next(q for q in topology.queues if q.name == settings.command_queue)
    via = {
        "victim": _connect(urls[VICTIM - 1]),
        "first": _connect(urls[0]),
        "third": _connect(urls[2]),
    }
    try:
        ch = via["victim"].channel()
        ch.queue_declare(command_queue.name, durable=True, arguments=command_queue.arguments)
        declare(via["first"].channel(), topology)
        ch = via["third"].channel()
        ch.queue_declare(results_queue, durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(results_queue, settings.results_exchange, "#")
    finally:
        for connection in via.values():
            connection.close()


@dataclass
class Publisher:
    """Publishes the stream from its own thread, to node 1, one confirm at a time."""

    url: str
    settings: Settings
    commands: list[dict[str, Any]]
    published: int = 0
    republished: int = 0
    errors: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="cluster-publisher", daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        connection = None
        try:
            connection = _connect(self.url)
            channel = connection.channel()
            channel.confirm_delivery()
            for cmd in self.commands:
                self._publish_until_confirmed(channel, cmd)
                self.published += 1
                connection.sleep(PUBLISH_GAP_S)
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            if connection is not None and connection.is_open:
                connection.close()
            self.done.set()

    def _publish_until_confirmed(self, channel: Any, cmd: dict[str, Any]) -> None:
        body = json.dumps(cmd).encode()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        for attempt in range(5):  # an at-least-once producer: a nack means "send it again"
            try:
                channel.basic_publish(
                    self.settings.commands_exchange,
                    self.settings.routing_key,
                    body,
                    props,
                    mandatory=True,
                )
                return
            except (pika.exceptions.NackError, pika.exceptions.UnroutableError) as exc:
                self.republished += 1
                self.errors.append(f"attempt {attempt}: {type(exc).__name__}")
                time.sleep(0.5)
        raise RuntimeError(f"command {cmd['command_id']} never confirmed")


class StateProbe:
    """Samples the worker's state every few ms and remembers when it changed."""

    def __init__(self, running: RunningWorker) -> None:
        self.state = running.worker.state
        self.changes: list[tuple[float, bool, bool, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = None
        while not self._stop.is_set():
            now = (self.state.connected, self.state.consuming, self.state.sessions)
            if now != last:
                self.changes.append((time.monotonic(), *now))
                last = now
            self._stop.wait(0.005)

    def first(self, after: float, *, consuming: bool, deadline_s: float = 90.0) -> float | None:
        """When the worker was first (not) consuming at or after ``after``; waits for it."""
        stop_at = time.monotonic() + deadline_s
        while time.monotonic() < stop_at:
            for when, _, is_consuming, _ in list(self.changes):
                if when >= after and is_consuming is consuming:
                    return when
            time.sleep(0.01)
        return None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)


def _worker_ports(cluster: ClusterURLs) -> list[int]:
    """Server ports of the py-amqp (worker) connections, as node 1 lists them."""
    rows = cluster.cluster.ctl_json(1, "list_connections", "port", "client_properties", "--quiet")
    return sorted(
        int(row["port"])
        for row in rows
        if ["product", "longstr", "py-amqp"] in (row.get("client_properties") or [])
    )


def _read_events(url: str, queue: str, ids: set[str], timeout: float) -> list[dict[str, Any]]:
    """Every event on ``queue`` until each of ``ids`` has one, plus a short grace period."""
    connection = _connect(url)
    events: list[dict[str, Any]] = []
    seen: set[str] = set()
    try:
        channel = connection.channel()
        deadline = time.monotonic() + timeout
        grace_until: float | None = None
        while time.monotonic() < deadline:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                if grace_until is not None and time.monotonic() > grace_until:
                    break
                connection.sleep(0.05)
                continue
            event = json.loads(body)
            events.append(event)
            seen.add(event["data"]["command_id"])
            if grace_until is None and ids <= seen:
                grace_until = time.monotonic() + 2.0  # late duplicates, if any
    finally:
        connection.close()
    return events


@pytest.mark.timeout(600)
def test_worker_survives_losing_its_node_and_the_queue_leader(
    cluster: ClusterURLs, cluster_sim: SimulatorThread, tmp_path: Path
) -> None:
    rc = cluster.cluster
    victim = rc.node(VICTIM)
    others = [n for n in rc.nodes if n is not victim]
    worker_url = ";".join([victim.url, *(n.url for n in others)])
    settings = private_settings(worker_url, cluster_sim.url, concurrency=8)
    results_queue = f"{settings.command_queue}.it-results"
    _declare_topology(list(cluster), settings, results_queue)

    all_nodes = sorted(n.name for n in rc.nodes)
    assert rc.queue_members(settings.command_queue) == all_nodes
    assert rc.queue_members(settings.parked_queue) == all_nodes
    assert rc.queue_members(results_queue) == all_nodes
    assert rc.queue_leader(settings.command_queue) == victim.name

    # ~100 ms per PABX call and 8 threads: several commands are in flight when the node goes.
    set_faults(cluster_sim, latency_ms=PABX_LATENCY_MS)
    requests_before = len(recorded_requests(cluster_sim))
    run = uuid.uuid4().hex[:8]
    commands = [
        command(f"cl-{run}-{i}", redirect={"DADOS": f"cl-{run}-{i}"}) for i in range(COMMANDS)
    ]
    ids = {c["command_id"] for c in commands}

    running = RunningWorker(settings)
    probe = StateProbe(running)
    report: dict[str, Any] = {"cluster_formed_s": round(rc.formed_in_s or 0, 1)}
    try:
        assert _worker_ports(cluster) == [victim.amqp_port]
        publisher = Publisher(cluster[0], settings, commands)
        publishing = publisher.start()

        _wait_for(lambda: publisher.published >= COMMANDS // 3, 60, "a third of the stream")
        stopped_at = time.monotonic()
        report["published_at_stop"] = publisher.published
        report["in_flight_at_stop"] = running.worker.state.in_flight
        rc.stop_app(victim)
        report["stop_app_s"] = round(time.monotonic() - stopped_at, 2)
        lost_at = probe.first(stopped_at, consuming=False, deadline_s=30)
        back_at = probe.first(stopped_at, consuming=True, deadline_s=90)
        assert back_at is not None, f"worker never consumed again: {probe.changes}"
        report["worker_noticed_s"] = round((lost_at or stopped_at) - stopped_at, 2)
        report["worker_recovered_s"] = round(back_at - stopped_at, 2)
        report["worker_sessions"] = running.worker.state.sessions
        report["worker_ports_after_failover"] = _worker_ports(cluster)
        report["leader_after_stop"] = rc.queue_leader(settings.command_queue, via=others[0])
        assert victim.amqp_port not in report["worker_ports_after_failover"]

        _wait_for(
            lambda: publisher.published >= 2 * COMMANDS // 3 or publisher.done.is_set(),
            60,
            "two thirds of the stream",
        )
        report["published_at_restart"] = publisher.published
        report["start_app_s"] = round(rc.start_app(victim), 2)
        publishing.join(120)
        assert publisher.done.is_set(), "publisher did not finish"
        assert publisher.published == COMMANDS, publisher.errors

        started = time.monotonic()
        events = _read_events(cluster[2], results_queue, ids, timeout=90)
        report["drain_s"] = round(time.monotonic() - started, 1)
    finally:
        probe.stop()
        running.stop()
    assert running.error is None, running.error

    event_ids: dict[str, set[str]] = defaultdict(set)
    statuses: dict[str, str] = {}
    for event in events:
        command_id = event["data"]["command_id"]
        event_ids[command_id].add(event["id"])
        statuses[command_id] = event["data"]["status"]
    sent = Counter(
        r["body"]["DADOS"]
        for r in recorded_requests(cluster_sim)[requests_before:]
        if str(r["body"].get("DADOS", "")).startswith(f"cl-{run}-")
    )
    report.update(
        {
            "sent": COMMANDS,
            "republished_by_producer": publisher.republished,
            "outcomes_by_status": dict(Counter(statuses.values())),
            "events_received": len(events),
            "duplicate_event_deliveries": len(events) - len(event_ids),
            "lost": len(ids - set(event_ids)),
            "commands_with_several_event_ids": sum(len(v) > 1 for v in event_ids.values()),
            "pabx_requests": sum(sent.values()),
            "surplus_pabx_requests": sum(n - 1 for n in sent.values()),
            "never_sent_to_pabx": len(ids - set(sent)),
            "queue_members": all_nodes,
            "worker_state_changes": [
                (round(t - stopped_at, 3), c, s, n) for t, c, s, n in probe.changes
            ],
        }
    )
    print(f"\n[cluster-report] {json.dumps(report)}")
    (tmp_path / "cluster-report.json").write_text(json.dumps(report, indent=2))

    assert report["lost"] == 0, report
    assert report["commands_with_several_event_ids"] == 0, report
    assert report["outcomes_by_status"] == {"accepted": COMMANDS}, report
    assert report["surplus_pabx_requests"] == 0, report
    assert report["never_sent_to_pabx"] == 0, report
    leftover = _connect(cluster[0])
    try:
        channel = leftover.channel()
        left = channel.queue_declare(settings.command_queue, passive=True).method.message_count
        parked = channel.queue_declare(settings.parked_queue, passive=True).method.message_count
    finally:
        leftover.close()
    assert (left, parked) == (0, 0)
