"""The publisher's own framing of ``basic.publish`` (worker.adapters.confirms), read back by
pika, an AMQP client that shares no code with py-amqp."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import Any

import pika
import pytest
from kombu import Connection

from worker.adapters import confirms
from worker.adapters.confirms import ConfirmingPublisher, Publication

pytestmark = pytest.mark.integration

PROPERTIES: dict[str, Any] = {
    "content_type": "application/cloudevents+json",
    "content_encoding": "utf-8",
    "message_id": "m-1",
    "correlation_id": "c-1",
    "timestamp": 1_700_000_000,
    "type": "pabx.redirect.outcome",
    "priority": 3,
    "expiration": "60000",
    "application_headers": {"x-a": "á", "x-n": 7, "x-flag": True, "x-map": {"k": "v"}},
}
#: Empty, small, one body frame's worth, and more than ``frame_max`` (131072): py-amqp's.
SIZES = [0, 1, 1000, 130_000, 300_000]


def _body(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + b"x" * (size % 256)


@pytest.fixture
def queue(amqp_url: str) -> Iterator[tuple[str, str]]:
    """An exchange, and a queue bound to it with ``bound``."""
    exchange, name = f"t-frames-{uuid.uuid4().hex[:8]}", f"t-frames-{uuid.uuid4().hex[:8]}"
    with Connection(amqp_url) as connection:
        channel = connection.channel()
        channel.exchange_declare(exchange, "direct", auto_delete=True)
        channel.queue_declare(name, auto_delete=False)
        channel.queue_bind(name, exchange, "bound")
        yield exchange, name
        channel.queue_delete(name)
        channel.exchange_delete(exchange)


def _publish(amqp_url: str, exchange: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Publish one message of each size; the ways each was written."""
    ways: list[str] = []
    write_frames = confirms.write_publish

    def traced(*args: Any) -> bool:
        done = write_frames(*args)
        ways.append("own" if done else "py-amqp")
        return done

    monkeypatch.setattr(confirms, "write_publish", traced)
    with Connection(amqp_url) as connection:
        publisher = ConfirmingPublisher(connection.channel())
        confirmed: list[bool] = []
        for size in SIZES:
            publication = Publication(_body(size), exchange, "bound", PROPERTIES, mandatory=True)
            publisher.publish(publication, confirmed.append)
        for _ in range(100):
            if publisher.pending == 0:
                break
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=0.1)
        assert confirmed == [True] * len(SIZES)
    return ways


def test_every_size_arrives_whole_with_its_properties(
    amqp_url: str, queue: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    exchange, name = queue
    assert _publish(amqp_url, exchange, monkeypatch) == ["own"] * 4 + ["py-amqp"]
    params = pika.URLParameters(amqp_url)
    with contextlib.closing(pika.BlockingConnection(params)) as reader:
        channel = reader.channel()
        for size in SIZES:
            method, props, body = channel.basic_get(name, auto_ack=True)
            assert method is not None, f"the {size}-byte message is missing"
            assert body == _body(size)
            assert (props.content_type, props.content_encoding) == (
                PROPERTIES["content_type"],
                PROPERTIES["content_encoding"],
            )
            assert (props.message_id, props.correlation_id, props.type) == (
                "m-1",
                "c-1",
                ("pabx.redirect.outcome"),
            )
            assert (props.timestamp, props.priority, props.expiration) == (
                1_700_000_000,
                3,
                "60000",
            )
            assert props.delivery_mode == 2
            headers = dict(props.headers)
            assert headers.pop(confirms.hdr.PUBLISH_SEQ) == SIZES.index(size) + 1
            assert headers == {"x-a": "á", "x-n": 7, "x-flag": True, "x-map": {"k": "v"}}
