"""Sample commands: the vendor example body, commands built from it, and command ids."""

from __future__ import annotations

import uuid
from typing import Any

from worker.tools.example import VENDOR_EXAMPLE, redirect_command
from worker.tools.simulator import REQUIRED_FIELDS

__all__ = [
    "API_KEY",
    "CHANNEL",
    "COUNTED_BODY",
    "VENDOR_EXAMPLE",
    "VENDOR_REQUIRED",
    "command",
    "command_ids",
    "counted_command",
]

#: The API key every test simulator expects.
API_KEY = "it-key-5f2b"
#: The PABX channel id of the test settings.
CHANNEL = 17

#: The fields of the vendor example a command must have (and the device password).
VENDOR_REQUIRED: dict[str, str] = {key: VENDOR_EXAMPLE[key] for key in REQUIRED_FIELDS}

#: The vendor example without ``ID_CHAMADA`` and ``DADOS`` (a counted command sets both).
COUNTED_BODY: dict[str, str] = {
    key: VENDOR_EXAMPLE[key]
    for key in (
        "DISPOSITIVO",
        "SENHA_DISPOSITIVO",
        "DISPOSITIVO_DESTINO",
        "PRIORIDADE",
        "FONTE_MUSICA",
        "TEMPO_FILA",
    )
}


def command(command_id: str | None = None, **changes: Any) -> dict[str, Any]:
    """A valid command on the vendor example, with a fresh ``ID_CHAMADA``."""
    redirect = {
        **VENDOR_EXAMPLE,
        "ID_CHAMADA": f"call-{uuid.uuid4().hex[:8]}",
        **changes.pop("redirect", {}),
    }
    return redirect_command(
        command_id or f"c-{uuid.uuid4().hex}", redirect, issued=False, **changes
    )


def counted_command(command_id: str, **changes: Any) -> dict[str, Any]:
    """A valid command; its id is also its ``ID_CHAMADA`` and ``DADOS`` (to count requests)."""
    redirect = {
        **COUNTED_BODY,
        "ID_CHAMADA": command_id,
        "DADOS": command_id[:100],
        **changes.pop("redirect", {}),
    }
    return redirect_command(command_id, redirect, **changes)


def command_ids(scenario: str, count: int) -> list[str]:
    """``count`` ids unique to this run: ``<scenario>-<run>-<n>``."""
    run = uuid.uuid4().hex[:8]
    return [f"{scenario}-{run}-{i:05d}" for i in range(count)]
