"""AMQP 0-9-1 frames the connection thread writes itself, for the two it writes most:
``basic.publish`` (method, content header, body) and ``basic.ack``.

py-amqp writes every method through a generic path: its arguments encoded from a format
string each time, a promise built and resolved per call, and for content a shared buffer
under a lock. These write the same bytes as one buffer each, for a py-amqp channel whose
connection is written to by one thread at a time (the worker's connection thread; a
:class:`~worker.produce.producer.Producer` used from one thread). Anything else (another
kind of channel, a closed one, a body that needs more than one frame) answers False, and
the caller goes through py-amqp.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from amqp import Channel
from amqp.serialization import dumps
from amqp.spec import Basic

__all__ = ["PublishMethods", "write_acks", "write_publish"]

#: A frame's type, channel and size; the frame end octet.
_FRAME = struct.Struct(">BHI").pack
_END = b"\xce"
#: A content header's class, weight and body size.
_HEADER = struct.Struct(">HHQ").pack
_PUBLISH = struct.pack(">HH", *Basic.Publish)
#: ``basic.ack``: method id, delivery tag, ``multiple``; always 13 bytes.
_ACK = struct.Struct(">HHQ?")
_ACK_FRAME = struct.Struct(">BHI" + "HHQ?" + "B")


def _connection(channel: Any) -> Any:
    """The py-amqp connection to write to, or None."""
    if not isinstance(channel, Channel) or not channel.is_open:
        return None
    connection = channel.connection
    if connection is None or connection.transport is None:
        return None
    return connection


def _write(connection: Any, data: bytes) -> None:
    connection.transport.write(data)
    connection.bytes_sent += 1  # as py-amqp counts a write, for its heartbeats


class PublishMethods:
    """Encoded ``basic.publish`` arguments, kept per exchange, routing key and
    ``mandatory`` (they repeat: a few exchanges and keys)."""

    #: Kept at most; then started again.
    SIZE = 256

    def __init__(self) -> None:
        self._encoded: dict[tuple[str, str, bool], bytes] = {}

    def __call__(self, exchange: str, routing_key: str, mandatory: bool) -> bytes:
        key = (exchange, routing_key, mandatory)
        method = self._encoded.get(key)
        if method is None:
            method = _PUBLISH + dumps("Bssbb", (0, exchange, routing_key, mandatory, False))
            if len(self._encoded) >= self.SIZE:
                self._encoded.clear()
            self._encoded[key] = method
        return method


def write_publish(
    channel: Any,
    methods: PublishMethods,
    message: Any,
    exchange: str,
    routing_key: str,
    mandatory: bool,
) -> bool:
    """Write ``message`` (an ``amqp.Message``) as one buffer: the method frame, the content
    header (py-amqp encodes the properties) and the body frame, if the body is not empty.
    False: not written (see the module's docstring)."""
    connection = _connection(channel)
    body = message.body
    if connection is None or not isinstance(body, bytes):
        return False  # py-amqp encodes a str body, and says how
    method = methods(exchange, routing_key, mandatory)
    header = _HEADER(Basic.CLASS_ID, 0, len(body)) + message._serialize_properties()
    if len(method) + len(header) + len(body) + 24 > connection.frame_max:
        return False
    number = channel.channel_id
    frames = [_FRAME(1, number, len(method)), method, _END]
    frames += (_FRAME(2, number, len(header)), header, _END)
    if body:  # an empty body has no body frame
        frames += (_FRAME(3, number, len(body)), body, _END)
    _write(connection, b"".join(frames))
    return True


def write_acks(channel: Any, acks: Iterable[tuple[int, bool]]) -> bool:
    """Write ``basic.ack`` frames, ``(delivery_tag, multiple)`` each, as one buffer.
    False: not written (see the module's docstring)."""
    connection = _connection(channel)
    if connection is None:
        return False
    number = channel.channel_id
    data = b"".join(
        _ACK_FRAME.pack(1, number, _ACK.size, *Basic.Ack, tag, multiple, 0xCE)
        for tag, multiple in acks
    )
    if data:
        _write(connection, data)
    return True
