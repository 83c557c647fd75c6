"""A producer in another language: Node.js with amqplib, against a running worker.

It publishes with confirms and ``mandatory`` and reads the outcome from an exclusive
``reply_to`` queue, as ``schemas/asyncapi.yaml`` says a producer should. Skipped
locally when node or npm are missing; a failure under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.interop.node import HERE as INTEROP
from tests.interop.node import node_with
from tests.kit.events import Peer
from tests.kit.processes import RunningWorker, sim_requests
from tests.kit.samples import command
from worker.contract.settings import Settings
from worker.tools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

OUTCOME_SCHEMA = Path(__file__).resolve().parents[2] / "schemas" / "redirect-outcome.v1.json"


def node_producer(settings: Settings, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    node = node_with("amqplib")
    env = {
        **os.environ,
        "AMQP_URL": settings.amqp_url,
        "EXCHANGE": settings.commands_exchange,
        "ROUTING_KEY": settings.routing_key,
        "COMMAND": json.dumps(body),
        "TIMEOUT_MS": "30000",
    }
    return subprocess.run(
        [node, str(INTEROP / "producer.mjs")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.timeout(300)
def test_a_node_producer_gets_its_outcome_through_reply_to(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread
) -> None:
    cmd = command()
    done = node_producer(settings, cmd)
    assert done.returncode == 0, done.stderr
    reply = json.loads(done.stdout)
    event = reply["event"]
    jsonschema.Draft202012Validator(json.loads(OUTCOME_SCHEMA.read_text())).validate(event)
    assert event["data"]["command_id"] == cmd["command_id"]
    assert event["data"]["status"] == "accepted"
    assert reply["properties"] == {
        "contentType": "application/cloudevents+json",
        "correlationId": f"node-{cmd['command_id']}",
        "messageId": event["id"],
    }
    assert len(sim_requests(sim)) == 1


@pytest.mark.timeout(300)
def test_a_node_producer_sees_a_rejection(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread
) -> None:
    cmd = command(redirect={"PRIORIDADE": "20"})
    done = node_producer(settings, cmd)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)["event"]["data"]
    assert (data["status"], data["error"]["code"]) == ("rejected", "invalid_command")
    assert sim_requests(sim) == []
