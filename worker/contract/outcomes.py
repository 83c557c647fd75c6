"""Outcome events: CloudEvents 1.0, structured mode, one per consumed command."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from worker.contract.messages import Delivery
from worker.contract.models import (
    AmqpRef,
    ErrorInfo,
    OutcomeData,
    OutcomeEvent,
    PabxInfo,
    RedirectCommand,
    RedirectSummary,
    Status,
)

__all__ = ["CONTENT_TYPE", "as_duplicate", "build_event", "encode", "routing_key_for"]

#: AMQP content type of outcome events.
CONTENT_TYPE = "application/cloudevents+json"
#: Default CloudEvents ``source``: the deployment; the target's name is appended when known.
SOURCE = "pabx-worker"


def build_event(
    *,
    event_id: str,
    status: Status,
    command_id: str | None,
    attempts: int,
    command: RedirectCommand | None = None,
    pabx: PabxInfo | None = None,
    error: ErrorInfo | None = None,
    delivery: Delivery | None = None,
    source: str = SOURCE,
    traceparent: str | None = None,
) -> OutcomeEvent:
    """The outcome event of one command; ``delivery`` is quoted when no id could be read.

    ``source`` names the deployment; a command's target is appended (``<source>/<target>``), so
    ``source`` + ``id`` stays unique across sites that see the same command id.
    """
    amqp = None
    if command_id is None and delivery is not None:
        amqp = AmqpRef(message_id=delivery.message_id, correlation_id=delivery.correlation_id)
    redirect = None
    if command is not None:
        body = command.redirect
        redirect = RedirectSummary(
            DISPOSITIVO=body.DISPOSITIVO,
            DISPOSITIVO_DESTINO=body.DISPOSITIVO_DESTINO,
            ID_CHAMADA=body.ID_CHAMADA,
        )
    data = OutcomeData(
        command_id=command_id,
        status=status,
        attempts=attempts,
        pabx=pabx,
        error=error,
        redirect=redirect,
        amqp=amqp,
    )
    return OutcomeEvent(
        id=event_id,
        source=source if command is None else f"{source}/{command.pabx}",
        type=f"pabx.redirect.{status.value}",  # type: ignore[arg-type]
        subject=command_id,
        time=datetime.now(UTC),
        data=data,
        traceparent=traceparent,
    )


def encode(event: OutcomeEvent) -> bytes:
    """The wire form of an event: attributes without a value (``subject`` when there is no
    command id, ``traceparent`` when the command was not traced) are left out, not null."""
    absent = {name for name in ("subject", "traceparent") if getattr(event, name) is None}
    return event.model_dump_json(exclude=absent or None).encode()


def as_duplicate(stored: bytes) -> bytes:
    """A stored event re-published for a repeated command: same id, ``duplicate: true``."""
    event = json.loads(stored)
    event["data"]["duplicate"] = True
    return json.dumps(event, separators=(",", ":")).encode()


def routing_key_for(status: Status | str) -> str:
    """Routing key of an outcome on the results exchange."""
    return f"redirect.{Status(status).value}"
