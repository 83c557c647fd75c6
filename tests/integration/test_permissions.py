"""Who may command which PABX (SPEC §9), with real RabbitMQ users in a vhost of the test's own."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pika
import pika.exceptions
import pytest

from tests.conftest import require_service
from tests.kit.events import Peer
from tests.kit.processes import CLI, RunningWorker, env_for, sim_requests
from tests.kit.samples import API_KEY, CHANNEL, command
from tests.kit.topology import private_settings
from worker.contract.settings import Settings
from worker.tools.simulator import SimulatorThread

pytestmark = pytest.mark.integration


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Vhost:
    """A vhost with the users of deploy/rabbitmq/permissions.md: worker, producers, operator."""

    name: str
    worker: str
    crm: str
    rogue: str
    operator: str
    password: str

    def url(self, user: str) -> str:
        return f"amqp://{user}:{self.password}@127.0.0.1:5672/{quote(self.name, safe='')}"


@pytest.fixture(scope="module")
def vhost(amqp_url: str) -> Iterator[Vhost]:
    require_service("rabbitmqctl", lambda: shutil.which("rabbitmqctl") is not None)
    tag = uuid.uuid4().hex[:8]
    made = Vhost(
        f"pabx-perm-{tag}",
        f"worker-{tag}",
        f"crm-{tag}",
        f"rogue-{tag}",
        f"operator-{tag}",
        uuid.uuid4().hex,
    )
    # The test topology is t<hex>.*, so the expressions match on the suffix.
    permissions = {
        made.worker: (".*", ".*", ".*"),
        made.crm: (r"^amq\.gen-", r"\.commands$", r"^amq\.gen-"),
        made.rogue: (r"^amq\.gen-", r"\.commands$", r"^amq\.gen-"),
        made.operator: (r"^amq\.gen-", r"\.commands$", r"\.parked$"),
    }
    rabbitmqctl("add_vhost", made.name)
    try:
        for user, (configure, write, read) in permissions.items():
            rabbitmqctl("add_user", user, made.password)
            rabbitmqctl("set_permissions", "-p", made.name, user, configure, write, read)
        yield made
    finally:
        for user in permissions:
            subprocess.run(["rabbitmqctl", "-q", "delete_user", user], capture_output=True)
        rabbitmqctl("delete_vhost", made.name)


@pytest.fixture
def settings(vhost: Vhost, sim: SimulatorThread) -> Settings:
    """Settings of a worker whose default target accepts commands from ``crm`` only."""
    table = {"url": sim.url, "api_key": API_KEY, "channel_id": CHANNEL}
    # private_settings names the topology t<hex>.*; the producers may write to *.commands.
    return private_settings(
        vhost.url(vhost.worker),
        sim.url,
        pabx={"default": {**table, "allowed_producers": [vhost.crm]}},
    )


def publish_as(
    vhost: Vhost, user: str, settings: Settings, body: dict[str, Any], **props: Any
) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(vhost.url(user)))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            settings.commands_exchange,
            settings.routing_key,
            json.dumps(body).encode(),
            pika.BasicProperties(content_type="application/json", **props),
        )
    finally:
        if connection.is_open:
            connection.close()


def test_only_listed_producers_command_the_target_and_user_id_cannot_be_forged(
    vhost: Vhost, settings: Settings, peer: Peer, sim: SimulatorThread
) -> None:
    running = RunningWorker(settings)
    try:
        allowed, anonymous, refused = command(), command(), command()
        publish_as(vhost, vhost.crm, settings, allowed, user_id=vhost.crm)
        publish_as(vhost, vhost.crm, settings, anonymous)  # no user_id at all
        publish_as(vhost, vhost.rogue, settings, refused, user_id=vhost.rogue)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as forged:
            publish_as(vhost, vhost.rogue, settings, command(), user_id=vhost.crm)
        events = {e["data"]["command_id"]: e["data"] for _, e in peer.events(3)}
    finally:
        running.stop()
    assert forged.value.reply_code == 406  # RabbitMQ checks user_id against the login
    assert events[allowed["command_id"]]["status"] == "accepted"
    for cmd in (anonymous, refused):
        data = events[cmd["command_id"]]
        assert (data["status"], data["error"]["code"]) == ("rejected", "producer_not_allowed")
        assert data["attempts"] == 0
    assert [r["body"]["ID_CHAMADA"] for r in sim_requests(sim)] == [
        allowed["redirect"]["ID_CHAMADA"]
    ]
    assert peer.queue_length(settings.parked_queue) == 2


def cli_as(vhost: Vhost, user: str, settings: Settings, *args: str, stdin: str = "") -> Any:
    env = env_for(settings, PABX_WORKER_AMQP_URL=vhost.url(user))
    return subprocess.run(
        [*CLI, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60
    )


def test_producer_commands_work_with_write_only_permissions_and_no_declare(
    vhost: Vhost, settings: Settings, peer: Peer, sim: SimulatorThread, tmp_path: Path
) -> None:
    running = RunningWorker(settings)
    try:
        one = command()
        sent = cli_as(vhost, vhost.crm, settings, "send", "--no-declare", stdin=json.dumps(one))
        assert sent.returncode == 0, sent.stderr
        waited = cli_as(
            vhost, vhost.crm, settings, "send", "--no-declare", "--wait", "20",
            stdin=json.dumps(command()),
        )  # fmt: skip
        batch = tmp_path / "batch.jsonl"
        batch.write_text("\n".join(json.dumps(command()) for _ in range(3)) + "\n")
        batched = cli_as(vhost, vhost.crm, settings, "batch", "--no-declare", str(batch))
        assert batched.returncode == 0, batched.stderr
        events = peer.events(5, timeout=30)
        listed = cli_as(vhost, vhost.operator, settings, "parked", "list", "--no-declare", "--json")
        declaring = cli_as(vhost, vhost.crm, settings, "send", stdin=json.dumps(command()))
    finally:
        running.stop()
    # No user_id on these commands: the target lists producers, so they are refused, parked.
    assert waited.returncode == 1 and '"producer_not_allowed"' in waited.stdout, waited.stderr
    assert len(events) == 5
    assert listed.returncode == 0, listed.stderr
    assert {m["command_id"] for m in json.loads(listed.stdout)} >= {one["command_id"]}
    assert declaring.returncode == 2 and "Traceback" not in declaring.stderr
    assert "--no-declare" in declaring.stderr and len(declaring.stderr.splitlines()) == 1


def test_no_declare_names_what_an_operator_must_declare_first(
    vhost: Vhost, settings: Settings
) -> None:
    done = cli_as(vhost, vhost.crm, settings, "send", "--no-declare", stdin=json.dumps(command()))
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert settings.commands_exchange in done.stderr and "topology declare" in done.stderr
