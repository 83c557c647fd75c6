"""worker.adapters.frames writes the bytes py-amqp's own frame writer writes."""

from __future__ import annotations

from typing import Any

import pytest
from amqp import Channel, Message
from amqp.method_framing import frame_writer
from amqp.serialization import dumps
from amqp.spec import Basic

from worker.adapters.frames import PublishMethods, write_acks, write_publish

FRAME_MAX = 131_072


class _Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))


class _Connection:
    def __init__(self) -> None:
        self.frame_max = FRAME_MAX
        self.transport = _Transport()
        self.bytes_sent = 0


def _channel(number: int = 3) -> Channel:
    channel = Channel.__new__(Channel)  # no broker: only what the writers read
    channel.is_open = True
    channel.connection = _Connection()
    channel.channel_id = number
    return channel


def _py_amqp(sig: tuple[int, int], fmt: str, args: tuple[Any, ...], content: Any = None) -> bytes:
    connection = _Connection()
    frame_writer(connection, connection.transport)(1, 3, sig, dumps(fmt, args), content)
    return b"".join(connection.transport.written)


PROPERTIES: dict[str, Any] = {
    "content_type": "application/cloudevents+json",
    "message_id": "m-1",
    "correlation_id": "c-1",
    "timestamp": 1_700_000_000,
    "priority": 3,
    "application_headers": {"x-a": "á", "x-n": 7, "x-flag": True, "x-map": {"k": "v"}},
}


@pytest.mark.parametrize("size", [0, 1, 4096, FRAME_MAX - 400])
@pytest.mark.parametrize("mandatory", [True, False])
def test_a_publication_is_the_frames_py_amqp_writes(size: int, mandatory: bool) -> None:
    body = bytes(range(256)) * (size // 256) + b"y" * (size % 256)
    channel = _channel()
    message = Message(body, delivery_mode=2, **PROPERTIES)
    assert write_publish(channel, PublishMethods(), message, "pabx.results", "k.1", mandatory)
    expected = _py_amqp(
        Basic.Publish,
        "Bssbb",
        (0, "pabx.results", "k.1", mandatory, False),
        Message(body, delivery_mode=2, **PROPERTIES),
    )
    assert channel.connection.transport.written == [expected]
    assert channel.connection.bytes_sent == 1


def test_a_publication_larger_than_a_frame_is_left_to_py_amqp() -> None:
    channel = _channel()
    message = Message(b"z" * FRAME_MAX, **PROPERTIES)
    assert not write_publish(channel, PublishMethods(), message, "x", "k", False)
    assert channel.connection.transport.written == []


def test_a_closed_channel_or_a_str_body_is_left_to_py_amqp() -> None:
    closed = _channel()
    closed.is_open = False
    assert not write_publish(closed, PublishMethods(), Message(b"x"), "x", "k", False)
    assert not write_acks(closed, [(1, False)])
    assert not write_publish(_channel(), PublishMethods(), Message("text"), "x", "k", False)
    assert not write_acks(object(), [(1, False)])


def test_acks_are_the_frames_py_amqp_writes_in_one_write() -> None:
    channel = _channel()
    acks = [(41, True), (43, False), (2**40, False)]
    assert write_acks(channel, acks)
    expected = b"".join(_py_amqp(Basic.Ack, "Lb", (tag, multiple)) for tag, multiple in acks)
    assert channel.connection.transport.written == [expected]


def test_publish_arguments_are_encoded_once_per_exchange_and_key() -> None:
    methods = PublishMethods()
    first = methods("ex", "a", True)
    assert methods("ex", "a", True) is first
    assert methods("ex", "a", False) != first
    for n in range(PublishMethods.SIZE + 1):  # bounded: started again when full
        methods("ex", f"k{n}", False)
    assert len(methods._encoded) <= PublishMethods.SIZE
