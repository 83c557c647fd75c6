"""TLS to the PABX end to end: pika → RabbitMQ → worker → simulator over HTTPS → events.

The simulator serves HTTPS (and mutual TLS) with certificates made here; the worker's
``default`` target is a ``[pabx.default]`` table naming them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.certs import PabxPki as Pki
from tests.certs import pabx_pki
from tests.kit.events import Peer
from tests.kit.processes import RunningWorker
from tests.kit.samples import API_KEY, CHANNEL, VENDOR_EXAMPLE
from tests.kit.topology import private_settings
from worker.contract.settings import Settings
from worker.tools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

#: What a failure that no retry can fix may take, end to end.
PROMPT_S = 5.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return pabx_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https_sim(pki: Pki) -> Iterator[SimulatorThread]:
    with SimulatorThread(api_key=API_KEY, tls_cert=pki.server.cert, tls_key=pki.server.key) as sim:
        yield sim


@pytest.fixture(scope="module")
def mtls_sim(pki: Pki) -> Iterator[SimulatorThread]:
    with SimulatorThread(
        api_key=API_KEY, tls_cert=pki.server.cert, tls_key=pki.server.key, client_ca=pki.ca.cert
    ) as sim:
        yield sim


def pabx_table(case: str, pki: Pki, https_sim: SimulatorThread, mtls_sim: SimulatorThread) -> Any:
    """The ``[pabx.default]`` table of a test case: which simulator, which TLS files."""
    mine = {"cert_file": str(pki.client.cert), "key_file": str(pki.client.key)}
    match case:
        case "right CA":
            url, tls = https_sim.url, {"ca_file": str(pki.ca.cert)}
        case "wrong CA":
            url, tls = https_sim.url, {"ca_file": str(pki.other.cert)}
        case "mutual TLS":
            url, tls = mtls_sim.url, {"ca_file": str(pki.ca.cert), **mine}
        case "no client certificate":
            url, tls = mtls_sim.url, {"ca_file": str(pki.ca.cert)}
        case _:
            raise ValueError(case)
    return {"url": url, "api_key": API_KEY, "channel_id": CHANNEL, **tls}


@pytest.fixture
def settings(
    request: pytest.FixtureRequest,
    amqp_url: str,
    pki: Pki,
    https_sim: SimulatorThread,
    mtls_sim: SimulatorThread,
) -> Settings:
    """Overrides the harness's: the ``default`` target is the case's TLS table."""
    table = pabx_table(request.param, pki, https_sim, mtls_sim)
    return private_settings(amqp_url, table["url"], pabx={"default": table})


def admin(pki: Pki) -> dict[str, Any]:
    return {
        "verify": str(pki.ca.cert),
        "cert": (str(pki.client.cert), str(pki.client.key)),
        "timeout": 5,
    }


@pytest.fixture(autouse=True)
def fresh(pki: Pki, https_sim: SimulatorThread, mtls_sim: SimulatorThread) -> None:
    for sim in (https_sim, mtls_sim):
        requests.put(f"{sim.url}/_sim/faults", json={}, **admin(pki)).raise_for_status()
        requests.delete(f"{sim.url}/_sim/requests", **admin(pki)).raise_for_status()


def received(sim: SimulatorThread, pki: Pki) -> list[dict[str, Any]]:
    reply = requests.get(f"{sim.url}/_sim/requests", **admin(pki))
    reply.raise_for_status()
    return list(reply.json()["requests"])


def run_one(peer: Peer) -> tuple[dict[str, Any], dict[str, Any], float]:
    """Publish one command; its outcome event data, the command and the seconds it took."""
    cmd = {
        "command_id": f"tls-{uuid.uuid4().hex}",
        "type": "redirect",
        "version": 1,
        "redirect": {**VENDOR_EXAMPLE, "ID_CHAMADA": f"call-{uuid.uuid4().hex[:8]}"},
    }
    started = time.monotonic()
    peer.publish(cmd)
    events = peer.events(1, timeout=15)
    elapsed = time.monotonic() - started
    assert len(events) == 1, events
    return events[0][1]["data"], cmd, elapsed


@pytest.mark.parametrize("settings", ["right CA"], indirect=True)
def test_right_ca_is_accepted(
    worker: RunningWorker, peer: Peer, https_sim: SimulatorThread, pki: Pki
) -> None:
    data, cmd, _ = run_one(peer)
    assert (data["status"], data["command_id"]) == ("accepted", cmd["command_id"])
    [seen] = received(https_sim, pki)
    assert seen["status"] == 200 and seen["body"]["ID_CHAMADA"] == cmd["redirect"]["ID_CHAMADA"]


@pytest.mark.parametrize("settings", ["wrong CA"], indirect=True)
def test_wrong_ca_fails_promptly_with_nothing_sent(
    worker: RunningWorker, peer: Peer, https_sim: SimulatorThread, pki: Pki
) -> None:
    data, _, elapsed = run_one(peer)
    assert data["status"] == "failed"
    assert data["error"]["code"] == "pabx_unreachable"
    assert "TLS" in data["error"]["message"]
    assert "certificate verify failed" in data["error"]["message"]
    assert API_KEY not in data["error"]["message"]
    assert data["attempts"] == 1  # not retried
    assert elapsed < PROMPT_S
    assert received(https_sim, pki) == []


@pytest.mark.parametrize("settings", ["mutual TLS"], indirect=True)
def test_mutual_tls_with_a_client_certificate_is_accepted(
    worker: RunningWorker, peer: Peer, mtls_sim: SimulatorThread, pki: Pki
) -> None:
    data, _, _ = run_one(peer)
    assert data["status"] == "accepted"
    assert len(received(mtls_sim, pki)) == 1


@pytest.mark.parametrize("settings", ["no client certificate"], indirect=True)
def test_mutual_tls_without_a_client_certificate_fails_promptly(
    worker: RunningWorker, peer: Peer, mtls_sim: SimulatorThread, pki: Pki
) -> None:
    data, _, elapsed = run_one(peer)
    assert (data["status"], data["error"]["code"]) == ("failed", "pabx_unreachable")
    assert "TLS" in data["error"]["message"]
    assert "certificate required" in data["error"]["message"]
    assert elapsed < PROMPT_S
    assert received(mtls_sim, pki) == []
