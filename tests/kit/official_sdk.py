"""Outcome events as the official CloudEvents SDK (``cloudevents``) reads them off RabbitMQ.

Every outcome the peers of the test kit receive goes through :func:`read_outcome`, so each live
event of the integration suite is parsed by the SDK's RabbitMQ binding, the way a consumer
built on it would, as well as by :func:`json.loads`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings.rabbitmq import RabbitMQMessage, from_rabbitmq
from cloudevents.core.formats.json import JSONFormat

__all__ = ["parse", "read_outcome"]


def parse(
    body: bytes, content_type: str | None, headers: Mapping[str, Any] | None = None
) -> BaseCloudEvent:
    """The SDK's event of one RabbitMQ message; the SDK's error when it cannot read it."""
    message = RabbitMQMessage(
        headers={str(k): str(v) for k, v in (headers or {}).items()},
        content_type=content_type,
        body=body,
    )
    return from_rabbitmq(message, JSONFormat())


def read_outcome(
    body: bytes, content_type: str | None, headers: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The event as JSON, once the SDK has read the same bytes to the same attributes and data."""
    event: dict[str, Any] = json.loads(body)
    sdk = parse(body, content_type, headers)
    attributes = sdk.get_attributes()
    for name in ("specversion", "id", "source", "type", "subject", "datacontenttype"):
        if attributes.get(name) != event.get(name):
            raise AssertionError(f"the CloudEvents SDK reads {name}={attributes.get(name)!r}")
    if sdk.get_data() != event.get("data"):
        raise AssertionError("the CloudEvents SDK reads other data")
    return event
