"""Errors raised by pabx-worker.

Every exception the package raises derives from :class:`PabxWorkerError`.
Third-party exceptions (``requests``, ``kombu``, database drivers) are
mapped to these at the boundary that met them::

    PabxWorkerError
    ├── ConfigurationError          bad setting, topology mismatch (exit 2)
    ├── InvalidCommand              a command that can never succeed as sent
    ├── BatchFileError              a batch file unusable as a whole (exit 2)
    ├── PabxError                   the PABX answered badly or not at all
    │   ├── PabxTransientError      may succeed later
    │   │   ├── PabxUnreachable     not sent: refused, DNS, TLS handshake cut short, connect
    │   │   │                       timeout
    │   │   │   ├── CircuitOpen     not sent: the target's circuit breaker is open
    │   │   │   └── PabxUnavailable answered 429 or 503: it did not act, retry
    │   │   └── PabxOutcomeUnknown  ambiguous: sent, then no answer (read timeout, reset,
    │   │                           answer past its time bound) or 500, 502, 504
    │   └── PabxPermanentError      never retry
    │       ├── PabxBadRequest      400
    │       ├── PabxUnauthorized    401
    │       ├── PabxForbidden       403
    │       ├── PabxRejected        any other non-200 answer
    │       └── PabxTlsError        not sent: TLS handshake refused (certificate not trusted,
    │                               wrong host name, expired; client certificate missing)
    ├── StoreError                  the idempotency store did not answer
    └── BrokerError                 the broker refused or dropped us
"""

from __future__ import annotations

from worker.contract.models import ErrorCode

__all__ = [
    "BatchFileError",
    "BrokerError",
    "CircuitOpen",
    "ConfigurationError",
    "InvalidCommand",
    "PabxBadRequest",
    "PabxError",
    "PabxForbidden",
    "PabxOutcomeUnknown",
    "PabxPermanentError",
    "PabxRejected",
    "PabxTlsError",
    "PabxTransientError",
    "PabxUnauthorized",
    "PabxUnavailable",
    "PabxUnreachable",
    "PabxWorkerError",
    "StoreError",
    "error_for_status",
]

#: Answers that say the PABX did not act on the request: safe to send again.
NOT_SENT_STATUSES = frozenset({429, 503})
#: Answers after which the PABX may or may not have acted (SPEC §5: ambiguous).
AMBIGUOUS_STATUSES = frozenset({500, 502, 504})


class PabxWorkerError(Exception):
    """Base class of every error raised by pabx-worker."""


class ConfigurationError(PabxWorkerError):
    """A setting is missing or wrong; the message names it."""


class InvalidCommand(PabxWorkerError):
    """The message is not a valid redirect command."""

    code: ErrorCode = ErrorCode.INVALID_COMMAND


class BatchFileError(PabxWorkerError):
    """A batch file as a whole cannot be used (unreadable, unknown format, bad CSV header)."""


class PabxError(PabxWorkerError):
    """The PABX did not accept the request."""

    #: The outcome's ``error.code`` when this error ends a command.
    code: ErrorCode = ErrorCode.PABX_ERROR

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class PabxTransientError(PabxError):
    """A failure that may go away; whether it may be resent depends on the subclass."""


class PabxUnreachable(PabxTransientError):
    """Not sent: the request never reached the PABX (refused, DNS, TLS, connect timeout).

    A TLS handshake that can never succeed with these settings is :class:`PabxTlsError`.
    """

    code = ErrorCode.PABX_UNREACHABLE


class CircuitOpen(PabxUnreachable):
    """Not sent: the target kept failing and its circuit breaker is open."""


class PabxUnavailable(PabxUnreachable):
    """The PABX answered 429 or 503: it did not act on the request; retry later."""


class PabxOutcomeUnknown(PabxTransientError):
    """Ambiguous: the request was written but no usable answer came, or 500/502/504.

    The PABX may have carried the redirect out, so it is resent only when
    ``RETRY_AMBIGUOUS`` says a repeated redirect is harmless.
    """

    code = ErrorCode.PABX_OUTCOME_UNKNOWN


class PabxPermanentError(PabxError):
    """The PABX refused the request; sending it again cannot help."""


class PabxBadRequest(PabxPermanentError):
    """400: the PABX rejected the body."""

    code = ErrorCode.PABX_BAD_REQUEST


class PabxUnauthorized(PabxPermanentError):
    """401: no API key reached the PABX."""

    code = ErrorCode.PABX_UNAUTHORIZED


class PabxForbidden(PabxPermanentError):
    """403: the API key was refused."""

    code = ErrorCode.PABX_FORBIDDEN


class PabxRejected(PabxPermanentError):
    """Any other non-200 answer (404, 405, 501 …)."""


class PabxTlsError(PabxPermanentError):
    """Not sent: the TLS handshake failed for a reason retrying cannot fix.

    The PABX's certificate did not verify (unknown CA, wrong host name, expired), or the
    PABX refused ours (missing, unknown, expired). Its code is that of a PABX not reached.
    """

    code = ErrorCode.PABX_UNREACHABLE


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
    if status_code in NOT_SENT_STATUSES:
        cls: type[PabxError] = PabxUnavailable
    elif status_code in AMBIGUOUS_STATUSES:
        cls = PabxOutcomeUnknown
    else:
        cls = _BY_STATUS.get(status_code, PabxRejected)
    message = f"PABX answered {status_code}"
    if detail:
        message = f"{message}: {detail[:200]}"
    return cls(message, status_code=status_code)
