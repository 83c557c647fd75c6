"""The AMQP header names the worker reads and writes (SPEC §4, §6), in one place.

Producers may set none of the ``x-pabx-`` ones; the worker writes them on the copies it
publishes (retry, parked) and ``parked`` reads them back.
"""

from __future__ import annotations

__all__ = [
    "ATTEMPTS",
    "DELIVERY_COUNT",
    "DROPPED_HEADERS",
    "ERROR",
    "ERROR_CODE",
    "PARKED_AT",
    "PUBLISH_SEQ",
    "REPLAY",
    "RETRIES",
    "STATUS",
]

#: Set by RabbitMQ on a quorum queue's redeliveries; trusted only when ``redelivered`` is set.
DELIVERY_COUNT = "x-delivery-count"
#: A command's trips through the broker-held retry queues.
RETRIES = "x-pabx-retries"
#: Set by ``parked replay`` on the copies it sends back: the replay generation.
REPLAY = "x-pabx-replay"
#: PABX requests counted so far, on retry and parked copies.
ATTEMPTS = "x-pabx-attempts"
#: On a parked copy: the outcome's error code and message, its status and when it was parked.
ERROR_CODE = "x-pabx-error-code"
ERROR = "x-pabx-error"
STATUS = "x-pabx-status"
PARKED_AT = "x-pabx-parked-at"
#: On a copy: producer headers left out for size, comma-separated.
DROPPED_HEADERS = "x-pabx-dropped-headers"
#: The publisher's sequence number, matching a returned message to its confirm.
PUBLISH_SEQ = "x-pabx-publish-seq"
