"""The vendor's example body, verbatim from seed/api-pabx-digitro-redirecionar-fila-dac.txt.

The demo, the bench and the tests all start from it; this is its only copy.
"""

from __future__ import annotations

__all__ = ["VENDOR_EXAMPLE"]

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
