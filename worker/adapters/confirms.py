"""Publishing with pipelined publisher confirms on one py-amqp channel.

Each publish returns at once; the callback runs when the broker acks (``True``)
or nacks (``False``) it. Callbacks run on the connection's thread, from
``drain_events``: they must not block.

On a py-amqp channel a publication that fits one frame is written by
:func:`~worker.adapters.frames.write_publish` (one buffer, the method's arguments encoded
once per exchange and key), a larger one by py-amqp's ``basic_publish``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from amqp import Message

from worker.adapters.channel import AmqpChannel
from worker.adapters.frames import PublishMethods, write_publish
from worker.contract import headers as hdr

__all__ = ["ConfirmingPublisher", "Publication"]

log = logging.getLogger("pabx_worker.publisher")

OnConfirm = Callable[[bool], None]


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
        self._methods = PublishMethods()
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
        exchange, key, mandatory = (
            publication.exchange,
            publication.routing_key,
            publication.mandatory,
        )
        if not write_publish(self._channel, self._methods, message, exchange, key, mandatory):
            self._channel.basic_publish(
                message, exchange=exchange, routing_key=key, mandatory=mandatory
            )
        self._seq = seq
        self._pending[seq] = on_confirm

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
