"""The commands the bench publishes, and the outcome events the peers publish.

Every command is valid (the simulator answers ``200``), has its own ``command_id`` and its
own ``ID_CHAMADA`` (the worker serialises commands sharing an ``ID_CHAMADA``; the bench
wants them to run in parallel, and the simulator records only the vendor body, so the
``ID_CHAMADA`` is how a PABX request is matched to its command), and carries its publish
time in ``issued_at`` (microseconds).
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from worker.tools.example import VENDOR_EXAMPLE

API_KEY = "bench-key-7c1e"
CHANNEL_ID = 17
#: CloudEvents structured content type (what the worker uses for its outcome events).
EVENT_CONTENT_TYPE = "application/cloudevents+json"


def rfc3339(ts: float) -> str:
    """``2026-11-29T16:00:00.123456Z`` for a Unix time."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """Unix time of an RFC 3339 timestamp (``Z`` or an offset)."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def command_id(prefix: str, index: int) -> str:
    return f"{prefix}-{index}"


def call_id(prefix: str, index: int) -> str:
    """A unique ``ID_CHAMADA`` per command (the worker orders commands per ID_CHAMADA)."""
    return f"{prefix} {index:06d}"


def command_body(prefix: str, index: int, issued_at: float) -> bytes:
    """One valid redirect command, published at ``issued_at``."""
    redirect = {**VENDOR_EXAMPLE, "ID_CHAMADA": call_id(prefix, index)}
    command = {
        "command_id": command_id(prefix, index),
        "type": "redirect",
        "version": 1,
        "issued_at": rfc3339(issued_at),
        "channel_id": CHANNEL_ID,
        "redirect": redirect,
    }
    return json.dumps(command, separators=(",", ":")).encode()


def index_of_call(prefix: str, id_chamada: str) -> int | None:
    """Inverse of :func:`call_id`; None for a request of another scenario."""
    head, _, tail = id_chamada.rpartition(" ")
    if head != prefix or not tail.isdigit():
        return None
    return int(tail)


def index_of_command(prefix: str, cid: str | None) -> int | None:
    """Inverse of :func:`command_id`; None for an id of another scenario."""
    if not cid:
        return None
    head, _, tail = cid.rpartition("-")
    if head != prefix or not tail.isdigit():
        return None
    return int(tail)


def peer_event(command: dict[str, Any], status: str, status_code: int | None) -> bytes:
    """The outcome event a peer publishes: CloudEvents JSON, like the worker's."""
    cid = command.get("command_id")
    redirect = command.get("redirect") or {}
    error = None
    if status != "accepted":
        error = {"code": "pabx_error", "message": f"PABX answered {status_code}"}
    event = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": "bench-peer",
        "type": f"pabx.redirect.{status}",
        "subject": cid,
        "time": rfc3339(time.time()),
        "datacontenttype": "application/json",
        "data": {
            "command_id": cid,
            "status": status,
            "attempts": 1,
            "duplicate": False,
            "pabx": {"name": "default", "status_code": status_code},
            "error": error,
            "redirect": {
                "DISPOSITIVO": redirect.get("DISPOSITIVO"),
                "DISPOSITIVO_DESTINO": redirect.get("DISPOSITIVO_DESTINO"),
                "ID_CHAMADA": redirect.get("ID_CHAMADA"),
            },
        },
    }
    return json.dumps(event, separators=(",", ":")).encode()


def vendor_request(command: dict[str, Any], pabx_url: str) -> tuple[str, dict[str, str]]:
    """The URL and JSON body a peer POSTs for a command (numbers as strings, as the PABX wants)."""
    channel = command.get("channel_id") or CHANNEL_ID
    body = {k: str(v) for k, v in (command.get("redirect") or {}).items()}
    return f"{pabx_url}/requests/{channel}/executa-desvio", body
