"""Pipelined confirms: acks, and mandatory messages the broker could not route."""

from __future__ import annotations

import contextlib
import uuid

import pytest
from kombu import Connection

from worker.publisher import ConfirmingPublisher, Publication

pytestmark = pytest.mark.integration


def test_unroutable_mandatory_publication_is_reported_as_failed(amqp_url: str) -> None:
    exchange = f"t-pub-{uuid.uuid4().hex[:8]}"
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        channel.exchange_declare(exchange, "direct", auto_delete=True)
        queue, _, _ = channel.queue_declare("", exclusive=True)
        channel.queue_bind(queue, exchange, "bound")
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
        channel.exchange_delete(exchange)
    assert results == {"bound": True, "nowhere": False, "nowhere-ok": True, "bound-2": True}
