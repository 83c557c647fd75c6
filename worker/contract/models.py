"""The wire contract: redirect commands in, CloudEvents outcome events out.

These models are the single source of ``schemas/*.json``
(``pabx-worker schemas export``); producers in other languages validate
against those files, and a test keeps both in agreement.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)

__all__ = [
    "COMMAND_ID_PATTERN",
    "MAX_COMMAND_BYTES",
    "TRACEPARENT_PATTERN",
    "AmqpRef",
    "ErrorCode",
    "ErrorInfo",
    "OutcomeData",
    "OutcomeEvent",
    "PabxInfo",
    "RedirectBody",
    "RedirectCommand",
    "RedirectSummary",
    "Status",
]

#: Largest command body accepted, in bytes.
MAX_COMMAND_BYTES = 64 * 1024
#: What a command id may look like (SPEC §4).
COMMAND_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
#: Names of configured PABX targets.
TARGET_NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

_PRIORITY_PATTERN = r"^(?:[0-9]|1[0-9])$"
_DIGITS_PATTERN = r"^[0-9]{1,9}$"


def _whole_number(value: Any) -> Any:
    """JSON Schema counts 17.0 as an integer; so do we."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _number_as_string(value: Any) -> Any:
    """Accept a JSON integer where the vendor wants a digit string."""
    value = _whole_number(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _digits(pattern: str, minimum: int, maximum: int) -> Any:
    """A vendor numeric field: a digit string, or an integer turned into one."""
    return Annotated[
        StrictStr,
        BeforeValidator(_number_as_string),
        Field(pattern=pattern),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "integer", "minimum": minimum, "maximum": maximum},
                    {"type": "string", "pattern": pattern},
                ]
            }
        ),
    ]


Priority = _digits(_PRIORITY_PATTERN, 0, 19)
Digits = _digits(_DIGITS_PATTERN, 0, 999_999_999)
NonEmpty = Annotated[StrictStr, Field(min_length=1)]


#: RFC 3339 ``date-time`` (section 5.6), which is stricter than ISO 8601.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})")


def _require_rfc3339(value: Any) -> Any:
    """Only RFC 3339 strings: ``"30"`` must not become 1970-01-01T00:00:30Z."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 date-time string such as 2026-11-29T16:00:30Z")
    return value


Timestamp = Annotated[
    AwareDatetime,
    BeforeValidator(_require_rfc3339),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def _reject_bool(value: Any) -> Any:
    """``true`` is not the integer 1 in JSON, whatever Python thinks."""
    if isinstance(value, bool):
        raise ValueError("must be the integer 1")
    return value


class RedirectBody(BaseModel):
    """The vendor body of ``POST /requests/{channelID}/executa-desvio``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    DISPOSITIVO: NonEmpty
    SENHA_DISPOSITIVO: NonEmpty | None = Field(default=None, repr=False)
    DISPOSITIVO_DESTINO: NonEmpty
    ID_CHAMADA: NonEmpty
    PRIORIDADE: Priority  # type: ignore[valid-type]
    DADOS: Annotated[StrictStr, Field(max_length=100)]
    FONTE_MUSICA: Digits | None = None  # type: ignore[valid-type]
    TEMPO_FILA: Digits | None = None  # type: ignore[valid-type]
    DISPOSITIVO_DESTINO_APOS_FINALIZACAO_CHAMADA: NonEmpty | None = None
    TEMPO_POS_ATENDIMENTO: Digits | None = None  # type: ignore[valid-type]


class RedirectCommand(BaseModel):
    """A command asking the worker to redirect a call waiting in a DAC queue."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        title="RedirectCommand",
        json_schema_extra={"$id": "https://pabx-worker/schemas/redirect-command.v1.json"},
    )

    command_id: Annotated[StrictStr, Field(pattern=COMMAND_ID_PATTERN)] | None = None
    type: Literal["redirect"]
    version: Annotated[Literal[1], BeforeValidator(_reject_bool)]
    issued_at: Timestamp | None = Field(default=None, strict=False)
    expires_at: Timestamp | None = Field(default=None, strict=False)
    pabx: Annotated[StrictStr, Field(pattern=TARGET_NAME_PATTERN)] = "default"
    channel_id: (
        Annotated[StrictInt, Field(gt=0, le=2**63 - 1), BeforeValidator(_whole_number)] | None
    ) = None
    redirect: RedirectBody


class Status(StrEnum):
    """Terminal outcome of a command."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    FAILED = "failed"
    EXPIRED = "expired"


class ErrorCode(StrEnum):
    """Why a command did not end accepted: the error.code of its outcome event."""

    INVALID_COMMAND = "invalid_command"
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"
    SUPERSEDED = "superseded"
    PRODUCER_NOT_ALLOWED = "producer_not_allowed"
    PABX_BAD_REQUEST = "pabx_bad_request"
    PABX_UNAUTHORIZED = "pabx_unauthorized"
    PABX_FORBIDDEN = "pabx_forbidden"
    PABX_ERROR = "pabx_error"
    PABX_OUTCOME_UNKNOWN = "pabx_outcome_unknown"
    PABX_UNREACHABLE = "pabx_unreachable"
    POISON_MESSAGE = "poison_message"
    EXPIRED = "expired"


#: Outcome models: every field is present in what the worker emits.
_OUTCOME_CONFIG = ConfigDict(
    extra="forbid", frozen=True, json_schema_serialization_defaults_required=True
)


class ErrorInfo(BaseModel):
    """Why a command did not end ``accepted``."""

    model_config = _OUTCOME_CONFIG

    code: ErrorCode
    message: str


class PabxInfo(BaseModel):
    """Which PABX target handled the command and its last HTTP status."""

    model_config = _OUTCOME_CONFIG

    name: str
    status_code: int | None = None


class RedirectSummary(BaseModel):
    """The identifying part of the redirect: never the device password."""

    model_config = _OUTCOME_CONFIG

    DISPOSITIVO: str
    DISPOSITIVO_DESTINO: str
    ID_CHAMADA: str


class AmqpRef(BaseModel):
    """AMQP properties of a message whose command id could not be read."""

    model_config = _OUTCOME_CONFIG

    message_id: str | None = None
    correlation_id: str | None = None


class OutcomeData(BaseModel):
    """The ``data`` member of an outcome event."""

    model_config = _OUTCOME_CONFIG

    command_id: str | None
    status: Status
    attempts: Annotated[int, Field(ge=0)]
    duplicate: bool = False
    pabx: PabxInfo | None = None
    error: ErrorInfo | None = None
    redirect: RedirectSummary | None = None
    amqp: AmqpRef | None = None


#: W3C ``traceparent``: version, trace id, parent span id, flags.
TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


def _outcome_schema(schema: dict[str, Any]) -> None:
    """Attributes without a value are absent, never null (CloudEvents JSON): ``subject``
    when there is no command id, the ``traceparent`` extension when tracing is off."""
    schema["$id"] = "https://pabx-worker/schemas/redirect-outcome.v1.json"
    for name in ("subject", "traceparent"):
        if name in schema.get("required", ()):
            schema["required"].remove(name)
    schema["properties"]["subject"] = {"title": "Subject", "type": "string", "minLength": 1}
    schema["properties"]["traceparent"] = {
        "type": "string",
        "pattern": TRACEPARENT_PATTERN,
        "description": "W3C trace context of the command's span (CloudEvents distributed"
        " tracing extension); present only when tracing is on.",
    }


class OutcomeEvent(BaseModel):
    """A CloudEvents 1.0 event in structured mode reporting one command's outcome."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        json_schema_serialization_defaults_required=True,
        title="RedirectOutcome",
        json_schema_extra=_outcome_schema,
    )

    specversion: Literal["1.0"] = "1.0"
    id: Annotated[str, Field(min_length=1)]
    source: Annotated[str, Field(min_length=1)] = "pabx-worker"
    type: Literal[
        "pabx.redirect.accepted",
        "pabx.redirect.rejected",
        "pabx.redirect.failed",
        "pabx.redirect.expired",
    ]
    #: The command id; omitted when none could be read (the JSON format has no null attributes).
    subject: Annotated[str, Field(min_length=1)] | None = None
    time: datetime
    datacontenttype: Literal["application/json"] = "application/json"
    data: OutcomeData
    #: CloudEvents distributed-tracing extension: the W3C trace context of the command's
    #: span, present only when tracing is on.
    traceparent: Annotated[str, Field(pattern=TRACEPARENT_PATTERN)] | None = None
