"""Pipelined confirms: acks, and mandatory messages the broker could not route.

Runs on RabbitMQ and on the in-memory broker, which must return and confirm alike.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import pytest
from kombu import Connection

from tests.integration.conftest import ON_BOTH_BROKERS
from worker.adapters.channel import AmqpConnection
from worker.adapters.confirms import ConfirmingPublisher, Publication
from worker.tools.memory_broker import MemoryBroker

pytestmark = ON_BOTH_BROKERS


@pytest.fixture
def bound(backend: str, request: pytest.FixtureRequest) -> Iterator[tuple[AmqpConnection, str]]:
    """A connection, and a direct exchange with one queue bound by ``bound``."""
    exchange = f"t-pub-{uuid.uuid4().hex[:8]}"
    if backend == "memory":
        broker = MemoryBroker()
        broker.declare_exchange(exchange, "direct")
        broker.bind(broker.declare_queue(""), exchange, "bound")
        yield broker.connect(), exchange
        return
    with Connection(request.getfixturevalue("amqp_url")) as connection:
        channel = connection.channel()
        channel.exchange_declare(exchange, "direct", auto_delete=True)
        queue, _, _ = channel.queue_declare("", exclusive=True)
        channel.queue_bind(queue, exchange, "bound")
        yield connection, exchange
        channel.exchange_delete(exchange)


def test_unroutable_mandatory_publication_is_reported_as_failed(
    bound: tuple[AmqpConnection, str],
) -> None:
    connection, exchange = bound
    publisher = ConfirmingPublisher(connection.channel())
    results: dict[str, bool] = {}
    for key, mandatory in [
        ("bound", True),
        ("nowhere", True),
        ("nowhere-ok", False),
        ("bound-2", True),
    ]:
        routing = "bound" if key.startswith("bound") else "nowhere"
        publisher.publish(
            Publication(b"{}", exchange, routing, {"message_id": key}, mandatory=mandatory),
            lambda ok, key=key: results.__setitem__(key, ok),
        )
    for _ in range(100):
        if publisher.pending == 0:
            break
        with contextlib.suppress(TimeoutError):
            connection.drain_events(timeout=0.1)
    assert results == {"bound": True, "nowhere": False, "nowhere-ok": True, "bound-2": True}
