"""Parked messages as JSON Lines: what ``parked export`` prints and ``parked discard`` keeps.

One JSON object a line, enough to look at the message and to publish it again byte for
byte: the parked reason (as ``parked list --json``), the AMQP properties and headers, and
the body, as text when it is UTF-8 (``body``), else base64 (``body_base64``). Bodies are not
masked: an archive is a copy of the queue, device passwords included, and is created 0600.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.produce.parked import ParkedMessage

__all__ = ["ArchiveWriter", "archive_record", "open_archive"]


def _plain(value: Any) -> Any:
    """An AMQP property or header value as JSON can hold it."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def archive_record(message: ParkedMessage, now: datetime) -> dict[str, Any]:
    """One line of the archive (see the module doc)."""
    record = message.summary(now)
    record.pop("position")
    record["archived_at"] = now.isoformat(timespec="milliseconds")
    props = {k: v for k, v in message.properties.items() if k != "application_headers"}
    record["properties"] = _plain(props)
    record["headers"] = _plain(message.headers)
    try:
        record["body"] = message.body.decode("utf-8")
    except UnicodeDecodeError:
        record["body_base64"] = base64.b64encode(message.body).decode("ascii")
    return record


def open_archive(path: Path, *, append: bool) -> IO[str]:
    """``path`` for writing, created 0600; ``append`` keeps what an earlier run wrote."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    try:
        return os.fdopen(fd, "w", encoding="utf-8", newline="\n")
    except BaseException:
        os.close(fd)
        raise


class ArchiveWriter:
    """Writes records one line each; :meth:`sync` makes them durable before any ack."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def write(self, record: Mapping[str, Any]) -> None:
        self._out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")

    def sync(self) -> None:
        """Flush and, for a file, fsync: a crash after this loses no written line."""
        self._out.flush()
        with contextlib.suppress(OSError, ValueError):  # a pipe or a terminal: flushed is all
            os.fsync(self._out.fileno())
