"""Errors raised by pabx-worker.

Every exception the package raises derives from :class:`PabxWorkerError`.
Third-party exceptions (``requests``, ``kombu``, database drivers) are
mapped to these at the boundary that met them::

    PabxWorkerError
    ├── ConfigurationError          bad setting, topology mismatch (exit 2)
    ├── InvalidCommand              a command that can never succeed as sent
    ├── PabxError                   the PABX answered badly or not at all
    │   ├── PabxTransientError      may succeed later: retry
    │   │   ├── PabxUnreachable     connection refused/reset, timeout
    │   │   │   └── CircuitOpen     not sent: the circuit breaker is open
    │   │   └── PabxServerError     429, 500, 502, 503, 504
    │   └── PabxPermanentError      never retry
    │       ├── PabxBadRequest      400
    │       ├── PabxUnauthorized    401
    │       ├── PabxForbidden       403
    │       └── PabxRejected        any other non-200 answer
    ├── StoreError                  the idempotency store did not answer
    └── BrokerError                 the broker refused or dropped us
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "CircuitOpen",
    "ConfigurationError",
    "InvalidCommand",
    "PabxBadRequest",
    "PabxError",
    "PabxForbidden",
    "PabxPermanentError",
    "PabxRejected",
    "PabxServerError",
    "PabxTransientError",
    "PabxUnauthorized",
    "PabxUnreachable",
    "PabxWorkerError",
    "StoreError",
    "error_for_status",
]

#: HTTP statuses worth retrying: the PABX may answer 200 later.
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


class PabxWorkerError(Exception):
    """Base class of every error raised by pabx-worker."""


class ConfigurationError(PabxWorkerError):
    """A setting is missing or wrong; the message names it."""


class InvalidCommand(PabxWorkerError):
    """The message is not a valid redirect command."""

    code = "invalid_command"


class PabxError(PabxWorkerError):
    """The PABX did not accept the request."""

    code = "pabx_error"

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class PabxTransientError(PabxError):
    """A failure that may go away: worth retrying within the deadline."""


class PabxUnreachable(PabxTransientError):
    """No answer: connection failure or timeout."""

    code = "pabx_unreachable"


class CircuitOpen(PabxUnreachable):
    """Not sent: the PABX kept failing and the circuit breaker is open."""


class PabxServerError(PabxTransientError):
    """The PABX answered 429 or a 5xx that may clear."""


class PabxPermanentError(PabxError):
    """The PABX refused the request; sending it again cannot help."""


class PabxBadRequest(PabxPermanentError):
    """400: the PABX rejected the body."""

    code = "pabx_bad_request"


class PabxUnauthorized(PabxPermanentError):
    """401: no API key reached the PABX."""

    code = "pabx_unauthorized"


class PabxForbidden(PabxPermanentError):
    """403: the API key was refused."""

    code = "pabx_forbidden"


class PabxRejected(PabxPermanentError):
    """Any other non-200 answer (404, 405, 500-range not worth retrying …)."""


class StoreError(PabxWorkerError):
    """The idempotency store failed; the command is left for redelivery."""


class BrokerError(PabxWorkerError):
    """The broker refused an operation or the connection dropped."""


_BY_STATUS: dict[int, type[PabxError]] = {
    400: PabxBadRequest,
    401: PabxUnauthorized,
    403: PabxForbidden,
}


def error_for_status(status_code: int, detail: str = "") -> PabxError:
    """Return the error matching a non-200 PABX answer."""
    if status_code in RETRYABLE_STATUSES:
        cls: type[PabxError] = PabxServerError
    else:
        cls = _BY_STATUS.get(status_code, PabxRejected)
    message = f"PABX answered {status_code}"
    if detail:
        message = f"{message}: {detail[:200]}"
    return cls(message, status_code=status_code)
