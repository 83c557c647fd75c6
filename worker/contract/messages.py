"""Decoding AMQP messages into commands, and the identities derived from them.

Pure functions: nothing here performs I/O.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from worker.contract import headers as hdr
from worker.contract.errors import InvalidCommand
from worker.contract.models import MAX_COMMAND_BYTES, RedirectCommand

__all__ = [
    "Delivery",
    "decode_command",
    "event_id_for",
    "fingerprint",
    "header_count",
    "raw_event_id",
    "replay_generation",
]

#: Namespace of the deterministic outcome event ids (uuid5).
EVENT_NAMESPACE = uuid.UUID("8f6a7c52-4b0e-5d2c-9a51-3c1f6e0b7d24")
_ACCEPTED_CONTENT_TYPES = frozenset({"", "application/json"})
_ACCEPTED_ENCODINGS = frozenset({"", "utf-8", "utf8"})
#: Characters of COMMAND_ID_PATTERN.
_COMMAND_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


@dataclass(frozen=True)
class Delivery:
    """One message as the broker delivered it, independent of the AMQP library."""

    body: bytes
    content_type: str | None = None
    content_encoding: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    #: The publisher's AMQP user, as RabbitMQ validated it (``user_id`` property).
    user_id: str | None = None
    timestamp: datetime | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    redelivered: bool = False
    #: Earlier deliveries of this message (quorum queue ``x-delivery-count``).
    delivery_count: int = 0


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InvalidCommand(f"duplicate JSON key {key!r}")
        result[key] = value
    return result


def _check_envelope(delivery: Delivery) -> None:
    media_type, *params = (delivery.content_type or "").lower().split(";")
    media_type = media_type.strip()
    if media_type not in _ACCEPTED_CONTENT_TYPES:
        raise InvalidCommand(f"content type {media_type!r} is not application/json")
    for param in params:
        name, _, value = param.partition("=")
        if name.strip() == "charset" and value.strip().strip('"') not in _ACCEPTED_ENCODINGS:
            raise InvalidCommand(f"charset {value.strip()!r} is not UTF-8")
    encoding = (delivery.content_encoding or "").strip().lower()
    if encoding not in _ACCEPTED_ENCODINGS:
        raise InvalidCommand(f"content encoding {encoding!r} is not UTF-8")
    if len(delivery.body) > MAX_COMMAND_BYTES:
        raise InvalidCommand(f"body of {len(delivery.body)} bytes exceeds {MAX_COMMAND_BYTES}")


def parse_json(body: bytes) -> Any:
    """Parse UTF-8 JSON, refusing duplicate keys, NaN and runaway nesting."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidCommand(f"body is not UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(
            text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant
        )
    except json.JSONDecodeError as exc:
        raise InvalidCommand(f"body is not JSON: {exc.msg} at line {exc.lineno}") from None
    except ValueError as exc:  # e.g. an integer literal past Python's digit limit
        raise InvalidCommand(f"body is not usable JSON: {exc}"[:200]) from None
    except RecursionError:
        raise InvalidCommand("body is nested too deeply") from None


def _reject_constant(name: str) -> Any:
    raise InvalidCommand(f"{name} is not valid JSON")


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False, include_input=False)[:5]:
        loc = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{loc}: {error['msg']}")
    return "; ".join(parts)


def decode_command(delivery: Delivery) -> RedirectCommand:
    """Turn a delivery into a valid command with a command id, or raise InvalidCommand."""
    _check_envelope(delivery)
    data = parse_json(delivery.body)
    if not isinstance(data, dict):
        raise InvalidCommand(f"body is a JSON {type(data).__name__}, not an object")
    try:
        command = RedirectCommand.model_validate(data)
    except ValidationError as exc:
        raise InvalidCommand(_describe(exc)) from None
    if command.command_id is None:
        if not is_command_id(delivery.message_id):
            raise InvalidCommand("command_id: missing, and no usable AMQP message_id")
        command = command.model_copy(update={"command_id": delivery.message_id})
    return command


def is_command_id(value: object) -> bool:
    """Whether a value is a usable command id (SPEC §4)."""
    return isinstance(value, str) and 0 < len(value) <= 128 and set(value) <= _COMMAND_ID_CHARS


def readable_command_id(delivery: Delivery) -> str | None:
    """Best effort: the command id of a message that failed validation, if one can be read."""
    data = None
    if len(delivery.body) <= MAX_COMMAND_BYTES:
        with contextlib.suppress(ValueError, RecursionError):
            data = json.loads(delivery.body)
    candidate = data.get("command_id") if isinstance(data, dict) else None
    if is_command_id(candidate):
        return str(candidate)
    return delivery.message_id if is_command_id(delivery.message_id) else None


#: One encoder: ``json.dumps`` with options builds a new one each call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(command: RedirectCommand) -> str:
    """Hash of what the command asks for, normalised; timestamps and password left out.

    The device password is left out so the hash (and the event id built on it) cannot
    be used to guess it; re-sending a command with a new password is a duplicate.
    """
    normal = {
        "type": command.type,
        "version": command.version,
        "pabx": command.pabx,
        "channel_id": command.channel_id,
        "redirect": command.redirect.model_dump(exclude_none=True, exclude={"SENHA_DISPOSITIVO"}),
    }
    return hashlib.sha256(_CANONICAL.encode(normal).encode()).hexdigest()


def event_id_for(command_id: str, body_fingerprint: str, replay: int = 0) -> str:
    """Deterministic id of a command's outcome event; each operator replay gets its own."""
    suffix = f"\nreplay {replay}" if replay else ""
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{command_id}\n{body_fingerprint}{suffix}"))


def header_count(headers: Mapping[str, Any], name: str) -> int:
    """A counter header as a non-negative int; a producer may have put anything there."""
    value = headers.get(name)
    if isinstance(value, bool):
        return 0
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError, OverflowError):
        return 0


def replay_generation(headers: Mapping[str, Any]) -> int:
    """How many times an operator replayed a command from the parked queue (0: never)."""
    return header_count(headers, hdr.REPLAY)


def raw_event_id(body: bytes, command_id: str | None = None) -> str:
    """Deterministic event id for a message that could not be parsed into a command."""
    digest = hashlib.sha256(body).hexdigest()
    return str(uuid.uuid5(EVENT_NAMESPACE, f"raw\n{command_id or ''}\n{digest}"))
