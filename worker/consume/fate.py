"""What becomes of a delivery once decided: the publications that carry its decision out.

:func:`fate_of` is the one place that says so, from the :data:`~worker.consume.pipeline.Decision`:
the outcome event (and a reply, and a parked copy of a failure) for a ``Finish``, a copy
in a retry queue for a ``Retry``, the delivery given back for a ``Requeue``. Pure: the
consumer publishes them and acks once all are confirmed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.adapters.confirms import Publication
from worker.consume.pipeline import Decision, Finish, Prepared, Requeue, Retry
from worker.contract import headers as hdr
from worker.contract.messages import Delivery, header_count
from worker.contract.models import ErrorInfo
from worker.contract.outcomes import CONTENT_TYPE, routing_key_for
from worker.contract.settings import Settings
from worker.contract.topology import Topology

__all__ = ["MAX_COPIED_HEADER_BYTES", "MAX_REASON_CHARS", "Fate", "fate_of", "parks"]

log = logging.getLogger("pabx_worker.consumer")

#: Largest ``x-pabx-error`` header on a parked copy.
MAX_REASON_CHARS = 512
#: Largest encoded size of the producer's headers kept on a parked or retry copy.
MAX_COPIED_HEADER_BYTES = 16 * 1024


@dataclass(frozen=True)
class Fate:
    """What the connection thread does with a delivery once it is decided.

    Every publication is published with confirms; the delivery is acked once all are
    confirmed, and given back to the broker if one is not. With ``requeue``, it is given
    back at once.
    """

    publications: tuple[Publication, ...] = ()
    requeue: bool = False


def fate_of(settings: Settings, topology: Topology, prepared: Prepared, decision: Decision) -> Fate:
    """What becomes of a delivery, from its decision: the one place that says so."""
    delivery = prepared.delivery
    match decision:
        case Requeue():
            return Fate(requeue=True)
        case Retry() as retry:
            return Fate((_retry_copy(topology, delivery, retry),))
        case Finish() as finish:
            return Fate(tuple(_outcome_publications(settings, topology, prepared, finish)))
    raise TypeError(f"not a decision: {decision!r}")  # pragma: no cover


def _outcome_publications(
    settings: Settings, topology: Topology, prepared: Prepared, finish: Finish
) -> list[Publication]:
    """The outcome event, a reply if asked for, and the parked copy of a failure."""
    delivery = prepared.delivery
    given = {
        "content_type": CONTENT_TYPE,
        "message_id": prepared.event_id,
        "correlation_id": delivery.correlation_id or prepared.command_id,
        "timestamp": int(time.time()),
    }
    props: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if finish.trace:  # W3C trace context of the command's span (SPEC §8)
        props["application_headers"] = dict(finish.trace)
    result = [
        Publication(
            finish.event,
            settings.results_exchange,
            routing_key_for(finish.status),
            props,
            mandatory=True,
        )
    ]
    if delivery.reply_to and _may_reply_to(settings, topology, delivery.reply_to):
        result.append(Publication(finish.event, "", delivery.reply_to, props))
    if parks(finish) and finish.error is not None:
        result.append(_parked_copy(settings, delivery, finish, finish.error))
    return result


def parks(finish: Finish) -> bool:
    """Whether this finish copies the command to the parked queue (a first failure)."""
    return finish.park and finish.error is not None and not finish.duplicate


def _may_reply_to(settings: Settings, topology: Topology, queue: str) -> bool:
    """Never reply into the topology: an outcome there would be consumed as a command."""
    own = {
        settings.command_queue,
        settings.parked_queue,
        settings.unrouted_exchange,
        *topology.retry_queues.values(),
    }
    if queue in own or queue.startswith("pabx."):
        log.warning("reply_to names a topology queue: not replied to", extra={"queue": queue})
        return False
    return True


def _original_properties(delivery: Delivery, headers: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = {
        "content_type": delivery.content_type,
        "content_encoding": delivery.content_encoding,
        "message_id": delivery.message_id,
        "correlation_id": delivery.correlation_id,
        "reply_to": delivery.reply_to,
        "application_headers": headers,
    }
    if delivery.timestamp is not None:
        props["timestamp"] = int(delivery.timestamp.timestamp())
    return {k: v for k, v in props.items() if v is not None}


def _retry_copy(topology: Topology, delivery: Delivery, decision: Retry) -> Publication:
    steps = sorted(topology.retry_queues)
    delay = next((s for s in steps if s >= decision.delay_s), steps[-1])
    headers = _copied_headers(delivery)
    headers[hdr.RETRIES] = header_count(headers, hdr.RETRIES) + 1
    headers[hdr.ATTEMPTS] = decision.attempts
    return Publication(
        delivery.body,
        "",
        topology.retry_queues[delay],
        _original_properties(delivery, headers),
        mandatory=True,  # a retry queue that is gone must not swallow the command
    )


def _parked_copy(
    settings: Settings, delivery: Delivery, decision: Finish, error: ErrorInfo
) -> Publication:
    headers = _copied_headers(delivery)
    headers.update(
        {
            hdr.ERROR_CODE: error.code.value,
            hdr.ERROR: error.message[:MAX_REASON_CHARS],
            hdr.ATTEMPTS: decision.attempts,
            hdr.STATUS: decision.status.value,
            hdr.PARKED_AT: datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
    )
    return Publication(
        delivery.body,
        settings.dead_exchange,
        f"{settings.routing_key}.{error.code.value}",
        _original_properties(delivery, headers),
        mandatory=True,
    )


def _copied_headers(delivery: Delivery) -> dict[str, Any]:
    """The producer's headers for a copy, within :data:`MAX_COPIED_HEADER_BYTES`.

    A copy adds headers of its own; producer headers close to the broker's frame size
    would make it unpublishable (FRAME_ERROR closes the connection, the message comes
    back, again and again). Headers past the budget are left out and named.
    """
    from amqp.serialization import dumps

    kept: dict[str, Any] = {}
    dropped: list[str] = []
    budget = MAX_COPIED_HEADER_BYTES
    for name, value in delivery.headers.items():
        if name == hdr.DELIVERY_COUNT:
            continue
        try:
            cost = len(dumps("F", [{name: value}]))
        except Exception:  # not encodable again: leave it out
            cost = budget + 1
        if cost > budget:
            dropped.append(str(name))
            continue
        budget -= cost
        kept[name] = value
    if dropped:
        kept[hdr.DROPPED_HEADERS] = ",".join(dropped)[:MAX_REASON_CHARS]
    return kept
