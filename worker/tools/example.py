"""The vendor's example body, verbatim from seed/api-pabx-digitro-redirecionar-fila-dac.txt.

The demo, the bench and the tests all start from it; this is its only copy.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

__all__ = ["VENDOR_EXAMPLE", "redirect_command"]

#: The ``redirect`` body of the vendor's example request (every value a string, as sent).
VENDOR_EXAMPLE: dict[str, str] = {
    "DISPOSITIVO": "1125000",
    "SENHA_DISPOSITIVO": "4567",
    "DISPOSITIVO_DESTINO": "1132000",
    "ID_CHAMADA": "08/07/24 10:46:19 010A 0974/00",
    "PRIORIDADE": "0",
    "DADOS": "111222333-44;Fulano",
    "FONTE_MUSICA": "1",
    "TEMPO_FILA": "23",
    "DISPOSITIVO_DESTINO_APOS_FINALIZACAO_CHAMADA": "1244000",
    "TEMPO_POS_ATENDIMENTO": "5",
}


def redirect_command(
    command_id: str, redirect: dict[str, Any], *, issued: bool = True, **changes: Any
) -> dict[str, Any]:
    """A redirect command (SPEC §3) with this ``redirect`` body, ``issued_at`` now unless
    ``issued`` is False; ``changes`` replace or add top-level fields."""
    command: dict[str, Any] = {"command_id": command_id, "type": "redirect", "version": 1}
    if issued:
        command["issued_at"] = datetime.now(UTC).isoformat()
    return {**command, "redirect": redirect, **changes}
