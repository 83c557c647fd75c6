"""Publishing with pipelined publisher confirms on one py-amqp channel.

Each publish returns at once; the callback runs when the broker acks (``True``)
or nacks (``False``) it. Callbacks run on the connection's thread, from
``drain_events``: they must not block.

On a py-amqp channel a publication whose frames fit in one ``frame_max`` is written as
one buffer built here: the ``basic.publish`` method frame (its arguments encoded once per
exchange, routing key and ``mandatory``), the content header (py-amqp encodes the
properties) and the body frame, if the body is not empty. That is what py-amqp's
``basic_publish`` writes, less its per-call promise and the encoding of the same
arguments again. A larger one goes through ``basic_publish``. Either way the channel's
connection must be written to by one thread at a time, as the worker's connection
thread does.
"""

from __future__ import annotations

import logging
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from amqp import Channel, Message
from amqp.serialization import dumps
from amqp.spec import Basic

from worker.adapters.channel import AmqpChannel
from worker.contract import headers as hdr

__all__ = ["ConfirmingPublisher", "Publication"]

log = logging.getLogger("pabx_worker.publisher")

OnConfirm = Callable[[bool], None]

#: A frame's type, channel and size; the frame end octet; a content header's class,
#: weight and body size; the method id of ``basic.publish``.
_FRAME = struct.Struct(">BHI").pack
_END = b"\xce"
_HEADER = struct.Struct(">HHQ").pack
_METHOD_ID = struct.pack(">HH", *Basic.Publish)
#: Encoded ``basic.publish`` arguments kept (they repeat: a few exchanges and keys).
_METHOD_CACHE = 256


class Publication:
    """One message to publish."""

    __slots__ = ("body", "exchange", "mandatory", "properties", "routing_key")

    def __init__(
        self,
        body: bytes,
        exchange: str,
        routing_key: str,
        properties: Mapping[str, Any],
        *,
        mandatory: bool = False,
    ) -> None:
        self.body = body
        self.exchange = exchange
        self.routing_key = routing_key
        self.properties = properties
        self.mandatory = mandatory


class ConfirmingPublisher:
    """Publishes on a channel in confirm mode and reports each confirm to a callback."""

    def __init__(self, channel: AmqpChannel) -> None:
        self._channel = channel
        self._returned: set[int] = set()
        self._pending: OrderedDict[int, OnConfirm] = OrderedDict()
        self._seq = 0
        self._methods: dict[tuple[str, str, bool], bytes] = {}
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        channel.confirm_select()

    @property
    def pending(self) -> int:
        """Publications not yet confirmed."""
        return len(self._pending)

    def publish(self, publication: Publication, on_confirm: OnConfirm) -> None:
        """Publish; ``on_confirm(False)`` if the broker nacks it or returns it unroutable."""
        seq = self._seq + 1
        properties = publication.properties
        if publication.mandatory:  # tag it, so a basic.return can name its publication
            headers = {**(properties.get("application_headers") or {}), hdr.PUBLISH_SEQ: seq}
            properties = {**properties, "application_headers": headers}
        message = Message(publication.body, delivery_mode=2, **properties)
        if not self._write_frames(message, publication):
            self._channel.basic_publish(
                message,
                exchange=publication.exchange,
                routing_key=publication.routing_key,
                mandatory=publication.mandatory,
            )
        self._seq = seq
        self._pending[seq] = on_confirm

    def _write_frames(self, message: Message, publication: Publication) -> bool:
        """Write the publication's three frames as one buffer; False: not done (not a
        py-amqp channel, or it needs more than one body frame)."""
        channel = self._channel
        if not isinstance(channel, Channel) or not channel.is_open:
            return False
        connection = channel.connection
        if connection is None or connection.transport is None:
            return False
        key = (publication.exchange, publication.routing_key, publication.mandatory)
        method = self._methods.get(key)
        if method is None:
            args = (0, publication.exchange, publication.routing_key, publication.mandatory, 0)
            method = _METHOD_ID + dumps("Bssbb", args)
            if len(self._methods) >= _METHOD_CACHE:
                self._methods.clear()
            self._methods[key] = method
        body = message.body
        if not isinstance(body, bytes):
            return False  # py-amqp encodes a str body, and says how
        header = _HEADER(Basic.CLASS_ID, 0, len(body)) + message._serialize_properties()
        if len(method) + len(header) + len(body) + 24 > connection.frame_max:
            return False
        number = channel.channel_id
        frames = [_FRAME(1, number, len(method)), method, _END]
        frames += (_FRAME(2, number, len(header)), header, _END)
        if body:  # an empty body has no body frame
            frames += (_FRAME(3, number, len(body)), body, _END)
        connection.transport.write(b"".join(frames))
        connection.bytes_sent += 1  # as py-amqp counts a write, for its heartbeats
        return True

    def _settle(self, tag: int, multiple: bool, ok: bool) -> None:
        if not multiple:
            callback = self._pending.pop(tag, None)
            if callback is not None:
                callback(ok and not self._was_returned(tag))
            return
        while self._pending:
            first = next(iter(self._pending))
            if first > tag:
                break
            self._pending.pop(first)(ok and not self._was_returned(first))

    def _was_returned(self, seq: int) -> bool:
        if seq in self._returned:
            self._returned.discard(seq)
            return True
        return False

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._settle(tag, multiple, True)

    def _on_nack(self, tag: int, multiple: bool) -> None:
        log.warning("broker nacked a publication", extra={"delivery_tag": tag})
        self._settle(tag, multiple, False)

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        """An unroutable mandatory message: its confirm (which follows) reports failure."""
        log.warning(
            "broker returned an unroutable message",
            extra={"exchange": exchange, "routing_key": routing_key, "reason": str(exc)},
        )
        seq = (message.properties.get("application_headers") or {}).get(hdr.PUBLISH_SEQ)
        if isinstance(seq, int) and seq in self._pending:
            self._returned.add(seq)
