"""The in-memory broker routes, confirms, returns, expires and redelivers as RabbitMQ does.

The worker's behaviour on it is tested by the tests marked ON_BOTH_BROKERS; these check the
broker's own rules, each one the worker relies on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from amqp.exceptions import PreconditionFailed, RecoverableConnectionError

from tests.integration.conftest import private_settings
from worker.adapters.channel import InboundMessage
from worker.adapters.confirms import ConfirmingPublisher, Publication
from worker.contract.errors import ConfigurationError
from worker.contract.topology import Topology
from worker.tools.memory_broker import MemoryBroker, MemoryChannel, MemoryConnection


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drain(connection: MemoryConnection, rounds: int = 3) -> None:
    for _ in range(rounds):
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=0.01)


def consume(channel: MemoryChannel, queue: str) -> list[InboundMessage]:
    got: list[InboundMessage] = []
    channel.basic_consume(queue, callback=got.append)
    return got


@pytest.mark.parametrize(
    ("kind", "binding", "key", "routed"),
    [
        ("topic", "a.*", "a.b", True),
        ("topic", "a.*", "a.b.c", False),
        ("topic", "a.#", "a", True),
        ("topic", "a.#", "a.b.c", True),
        ("topic", "#", "", True),
        ("topic", "#.c", "a.b.c", True),
        ("topic", "a.*.c", "a.b.d", False),
        ("direct", "a", "a", True),
        ("direct", "a", "b", False),
        ("fanout", "", "anything", True),
    ],
)
def test_exchanges_route_by_type(kind: str, binding: str, key: str, routed: bool) -> None:
    broker = MemoryBroker()
    broker.declare_exchange("x", kind)
    broker.bind(broker.declare_queue("q"), "x", binding)
    assert broker.publish("x", key, b"m") is routed
    assert broker.queue_length("q") == int(routed)


def test_default_exchange_and_alternate_exchange() -> None:
    broker = MemoryBroker()
    broker.declare_queue("direct-to-me")
    assert broker.publish("", "direct-to-me", b"1")
    broker.declare_exchange("unrouted", "fanout")
    broker.bind(broker.declare_queue("unrouted"), "unrouted", "")
    broker.declare_exchange("results", "topic", {"alternate-exchange": "unrouted"})
    assert broker.publish("results", "nobody.listens", b"2")
    assert [m.body for m in broker.drain("unrouted")] == [b"2"]


def test_declaring_other_arguments_is_refused_and_a_configuration_error_for_the_worker() -> None:
    broker = MemoryBroker()
    settings = private_settings("amqp://memory.invalid:1/%2F", "http://pabx.invalid")
    broker.declare_queue(settings.command_queue, {"x-queue-type": "classic"})
    with pytest.raises(PreconditionFailed):
        broker.declare_queue(settings.command_queue, {"x-queue-type": "quorum"})
    channel = broker.connect().channel()
    with pytest.raises(ConfigurationError, match="already exists with other arguments"):
        Topology.from_settings(settings).declare(channel)


def test_retry_queue_dead_letters_to_the_command_queue_after_its_ttl() -> None:
    clock = Clock()
    broker = MemoryBroker(clock=clock)
    broker.declare_queue("commands", {"x-queue-type": "quorum"})
    dead_letter = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "commands"}
    broker.declare_queue("retry.1s", {"x-message-ttl": 1000, **dead_letter})
    broker.publish("", "retry.1s", b"again", {"application_headers": {"x-pabx-retries": 1}})
    clock.now += 0.9
    assert (broker.queue_length("retry.1s"), broker.queue_length("commands")) == (1, 0)
    clock.now += 0.2
    assert (broker.queue_length("retry.1s"), broker.queue_length("commands")) == (0, 1)
    message = broker.get("commands")
    assert message is not None and message.headers == {"x-pabx-retries": 1}
    assert not message.redelivered


def test_confirms_and_returns_reach_the_publisher_in_order() -> None:
    broker = MemoryBroker()
    broker.declare_exchange("x", "direct")
    broker.bind(broker.declare_queue("q"), "x", "bound")
    connection = broker.connect()
    publisher = ConfirmingPublisher(connection.channel())
    results: dict[str, bool] = {}

    def record(key: str) -> Callable[[bool], None]:
        return lambda ok: results.__setitem__(key, ok)

    publisher.publish(Publication(b"1", "x", "bound", {}, mandatory=True), record("bound"))
    publisher.publish(Publication(b"2", "x", "nowhere", {}, mandatory=True), record("lost"))
    publisher.publish(Publication(b"3", "x", "nowhere", {}), record("not-mandatory"))
    drain(connection)
    assert results == {"bound": True, "lost": False, "not-mandatory": True}
    assert publisher.pending == 0


def test_a_requeued_message_comes_back_redelivered_with_its_count() -> None:
    broker = MemoryBroker()
    broker.declare_queue("quorum", {"x-queue-type": "quorum"})
    broker.declare_queue("classic", {"x-queue-type": "classic"})
    for name in ("quorum", "classic"):
        broker.publish("", name, b"first", {"application_headers": {"x-delivery-count": 9}})
        broker.publish("", name, b"second")
    connection = broker.connect()
    channel = connection.channel()
    channel.basic_qos(0, 1, False)
    got = {name: consume(channel, name) for name in ("quorum", "classic")}
    drain(connection)
    assert [m.body for m in got["quorum"]] == [b"first"]  # prefetch 1: one at a time
    assert got["quorum"][0].properties["application_headers"] == {"x-delivery-count": 0}
    for name in ("quorum", "classic"):
        channel.basic_reject(got[name][0].delivery_tag, requeue=True)
        drain(connection)
        channel.basic_ack(got[name][1].delivery_tag)
        drain(connection)
    # RabbitMQ 3.10: a quorum queue requeues at the back, a classic one where it was.
    assert [m.body for m in got["quorum"]] == [b"first", b"second", b"first"]
    assert [m.body for m in got["classic"]] == [b"first", b"first", b"second"]
    again = got["quorum"][2]
    assert again.delivery_info["redelivered"]
    assert again.properties["application_headers"] == {"x-delivery-count": 1}
    assert got["classic"][1].delivery_info["redelivered"]
    assert "application_headers" not in got["classic"][2].properties


def test_past_the_delivery_limit_a_quorum_queue_dead_letters() -> None:
    broker = MemoryBroker()
    broker.declare_exchange("dead", "topic")
    broker.bind(broker.declare_queue("parked"), "dead", "#")
    broker.declare_queue(
        "q", {"x-queue-type": "quorum", "x-delivery-limit": 2, "x-dead-letter-exchange": "dead"}
    )
    broker.publish("", "q", b"poison")
    connection = broker.connect()
    channel = connection.channel()
    got = consume(channel, "q")
    for _ in range(3):
        drain(connection)
        channel.basic_reject(got[-1].delivery_tag, requeue=True)
    assert len(got) == 3
    assert [m.body for m in broker.drain("parked")] == [b"poison"]


def test_unacked_messages_return_when_the_connection_goes() -> None:
    broker = MemoryBroker()
    broker.declare_queue("q")
    broker.publish("", "q", b"m")
    connection = broker.connect()
    got = consume(connection.channel(), "q")
    drain(connection)
    assert len(got) == 1 and broker.queue_length("q") == 0
    broker.close_connections()
    with pytest.raises(RecoverableConnectionError):
        connection.drain_events(timeout=0.01)
    message = broker.get("q")
    assert message is not None and message.redelivered


def test_the_worker_reconnects_and_the_command_is_handled_once() -> None:
    from tests.kit.events import memory_peer
    from tests.kit.processes import RunningWorker
    from tests.kit.samples import API_KEY
    from worker.tools.simulator import SimulatorThread

    with SimulatorThread(api_key=API_KEY) as sim:
        settings = private_settings("amqp://memory.invalid:1/%2F", sim.url)
        peer = memory_peer(settings, MemoryBroker())
        running = RunningWorker(settings, peer.connect)
        try:
            peer.publish(command_for("before"))
            assert len(peer.events(1)) == 1
            peer.broker.close_connections()
            assert peer.broker.wait_for(lambda: running.worker.state.sessions == 2, 10)
            assert running.worker.ready.wait(10)
            peer.publish(command_for("after"))
            events = peer.events(2)
        finally:
            running.stop()
    assert [e["data"]["status"] for _, e in events] == ["accepted", "accepted"]
    assert running.error is None


def test_a_worker_whose_connection_drops_while_stopping_records_its_sent_commands() -> None:
    """Stopping, the worker waits for a command whose request is out even when its
    connection goes: returning earlier closes the store before the outcome is recorded,
    and whoever takes the command over sends it again."""
    import json
    import time

    from tests.kit.events import memory_peer
    from tests.kit.processes import RunningWorker, sim_requests, wait_until
    from tests.kit.samples import API_KEY
    from worker.adapters.store.base import ClaimState
    from worker.consume.pipeline import Valid
    from worker.contract.messages import Delivery
    from worker.tools.simulator import SimulatorThread

    with SimulatorThread(api_key=API_KEY, latency_ms=600) as sim:
        settings = private_settings("amqp://memory.invalid:1/%2F", sim.url)
        peer = memory_peer(settings, MemoryBroker())
        running = RunningWorker(settings, peer.connect)
        try:
            command = command_for("stopping")
            peer.publish(command)
            assert wait_until(lambda: sim_requests(sim), 10)  # the request is out, unanswered
            running.worker.stop()
            peer.broker.close_connections()
            running.thread.join(30)
            assert not running.thread.is_alive() and running.error is None
            assert running.worker.state.in_flight == 0
            # The store (still open) holds the outcome: a redelivery is answered from it.
            prepared = running.processor.prepare(Delivery(body=json.dumps(command).encode()))
            assert isinstance(prepared, Valid)
            claim = running.processor._store.claim(
                "mem-stopping", prepared.fingerprint, now=time.time(), lease_s=30
            )
            assert claim.state is ClaimState.DONE and claim.outcome is not None
            assert len(sim_requests(sim)) == 1
        finally:
            running.stop()


def command_for(tag: str) -> dict[str, Any]:
    return {
        "command_id": f"mem-{tag}",
        "type": "redirect",
        "version": 1,
        "redirect": {
            "DISPOSITIVO": "1125000",
            "SENHA_DISPOSITIVO": "4567",
            "DISPOSITIVO_DESTINO": "1132000",
            "ID_CHAMADA": f"call-{tag}",
            "PRIORIDADE": "0",
            "DADOS": "111222333-44;Fulano",
        },
    }
