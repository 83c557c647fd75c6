"""A delivery as py-amqp hands it over, read into the pipeline's :class:`Delivery`."""

from __future__ import annotations

import contextlib
import logging
import threading
from datetime import UTC, datetime
from typing import Any

from worker.adapters.channel import InboundMessage
from worker.contract import headers as hdr
from worker.contract.messages import Delivery, header_count

__all__ = ["to_delivery", "tolerate_non_utf8_properties"]

log = logging.getLogger("pabx_worker.consumer")


_LENIENT_LOCK = threading.Lock()


def tolerate_non_utf8_properties() -> None:
    """Let py-amqp read message properties that are not UTF-8 (idempotent).

    py-amqp decodes short strings (content_type, correlation_id, message_id, header
    names ...) as strict UTF-8 while it reads the frame, before any callback: one such
    message from any producer raised out of ``drain_events`` and stopped the worker.
    When the strict decoding fails, the properties are decoded again with U+FFFD for
    the bad bytes; the message is then handled like any other (and rejected when its
    content type or id is unusable).
    """
    from amqp import serialization
    from amqp.spec import Basic

    strict = serialization.PROPERTY_CLASSES[Basic.CLASS_ID]
    if getattr(strict, "lenient", False):
        return

    def lenient_str(value: Any) -> Any:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    def decode(buf: Any, offset: int) -> Any:
        try:
            return strict(buf, offset)
        except UnicodeDecodeError:
            with _LENIENT_LOCK:
                saved = serialization.pstr_t
                serialization.pstr_t = lenient_str
                try:
                    return strict(buf, offset)
                finally:
                    serialization.pstr_t = saved

    decode.lenient = True  # type: ignore[attr-defined]
    serialization.PROPERTY_CLASSES[Basic.CLASS_ID] = decode


def to_delivery(message: InboundMessage) -> Delivery:
    """The message as the pipeline sees it; never raises.

    Properties that cannot be read (a bug, not bad input: each one is handled below) give
    a delivery with the body only, which then ends ``rejected`` like any unusable command.
    """
    try:
        return _read_delivery(message)
    except Exception:
        log.exception("could not read a message's properties")
        body = message.body if isinstance(message.body, bytes | bytearray) else b""
        return Delivery(body=bytes(body))


def _read_delivery(message: InboundMessage) -> Delivery:
    props = message.properties
    headers = props.get("application_headers") or {}
    stamp = props.get("timestamp")
    timestamp = None
    if isinstance(stamp, int | float):
        with contextlib.suppress(OverflowError, OSError, ValueError):  # year 10^11
            timestamp = datetime.fromtimestamp(stamp, UTC)
    elif isinstance(stamp, datetime):
        timestamp = stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp
    body = _body_bytes(message.body, props.get("content_encoding"))
    redelivered = bool(message.delivery_info.get("redelivered"))
    return Delivery(
        body=body,
        content_type=props.get("content_type"),
        content_encoding=props.get("content_encoding"),
        message_id=props.get("message_id"),
        correlation_id=props.get("correlation_id"),
        reply_to=props.get("reply_to"),
        user_id=props.get("user_id"),
        timestamp=timestamp,
        headers=headers,
        redelivered=redelivered,
        # Only the broker's count is trusted: a producer may set the header itself.
        delivery_count=header_count(headers, hdr.DELIVERY_COUNT) if redelivered else 0,
    )


def _body_bytes(body: Any, encoding: str | None) -> bytes:
    """The body as bytes: py-amqp gives ``""`` (str) for an empty body."""
    if isinstance(body, str):
        try:
            return body.encode(encoding or "utf-8", "surrogateescape")
        except (LookupError, ValueError):  # unknown codec; a name with a NUL is a ValueError
            return body.encode("utf-8", "surrogatepass")
    return bytes(body)
