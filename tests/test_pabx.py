"""HttpPabx against the simulator over real HTTP: answers mapped to our error tree."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
import requests

from worker.errors import (
    PabxBadRequest,
    PabxForbidden,
    PabxRejected,
    PabxServerError,
    PabxUnauthorized,
    PabxUnreachable,
)
from worker.pabx import HttpPabx
from worker.settings import PabxTarget
from worker.simulator import SimulatorThread

KEY = "unit-key"
BODY = {
    "DISPOSITIVO": "1125000",
    "SENHA_DISPOSITIVO": "4567",
    "DISPOSITIVO_DESTINO": "1132000",
    "ID_CHAMADA": "08/07/24 10:46:19 010A 0974/00",
    "PRIORIDADE": "0",
    "DADOS": "111222333-44;Fulano",
}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(api_key=KEY) as simulator:
        yield simulator


@pytest.fixture
def client(sim: SimulatorThread) -> Iterator[HttpPabx]:
    requests.put(f"{sim.url}/_sim/faults", json={}, timeout=5)
    requests.delete(f"{sim.url}/_sim/requests", timeout=5)
    pabx = HttpPabx(pool_size=4, connect_timeout_s=1, read_timeout_s=0.5)
    yield pabx
    pabx.close()


def target(url: str, key: str = KEY) -> PabxTarget:
    return PabxTarget(url=url, api_key=key, channel_id=17)


def test_accepted_request_carries_key_channel_and_body(
    client: HttpPabx, sim: SimulatorThread
) -> None:
    assert client.redirect(target(sim.url), 23, BODY) == 200
    [seen] = requests.get(f"{sim.url}/_sim/requests", timeout=5).json()["requests"]
    assert seen["channel_id"] == 23 and seen["body"] == BODY
    assert {k.lower(): v for k, v in seen["headers"].items()}["x-api-key"] == KEY


def test_wrong_key_is_forbidden(client: HttpPabx, sim: SimulatorThread) -> None:
    with pytest.raises(PabxForbidden) as info:
        client.redirect(target(sim.url, "other"), 17, BODY)
    assert info.value.status_code == 403 and "other" not in str(info.value)


def test_invalid_body_is_a_bad_request(client: HttpPabx, sim: SimulatorThread) -> None:
    with pytest.raises(PabxBadRequest):
        client.redirect(target(sim.url), 17, {**BODY, "PRIORIDADE": "20"})


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (401, PabxUnauthorized),
        (429, PabxServerError),
        (500, PabxServerError),
        (502, PabxServerError),
        (503, PabxServerError),
        (504, PabxServerError),
        (404, PabxRejected),
    ],
)
def test_statuses_map_to_errors(
    client: HttpPabx, sim: SimulatorThread, status: int, error: type[Exception]
) -> None:
    requests.put(f"{sim.url}/_sim/faults", json={"fail_next": 1, "fail_status": status}, timeout=5)
    with pytest.raises(error):
        client.redirect(target(sim.url), 17, BODY)


def test_hang_is_a_timeout(client: HttpPabx, sim: SimulatorThread) -> None:
    requests.put(f"{sim.url}/_sim/faults", json={"hang": True}, timeout=5)
    with pytest.raises(PabxUnreachable, match="timed out"):
        client.redirect(target(sim.url), 17, BODY)


def test_closed_port_is_unreachable(client: HttpPabx) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(PabxUnreachable, match="unreachable"):
        client.redirect(target(f"http://127.0.0.1:{port}"), 17, BODY)


def test_url_prefix_is_kept(client: HttpPabx, sim: SimulatorThread) -> None:
    with pytest.raises(PabxRejected) as info:
        client.redirect(target(f"{sim.url}/cti"), 17, BODY)
    assert info.value.status_code == 404
