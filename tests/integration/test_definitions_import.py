"""deploy/rabbitmq/definitions.json imports into the real broker and matches the worker's topology.

The file is re-targeted to a fresh virtual host, imported with ``rabbitmqctl
import_definitions`` (no management plugin needed), then checked over AMQP with pika: every
queue and exchange re-declared with the worker's own arguments must succeed (a difference
would be PRECONDITION_FAILED), and messages must route the way the bindings say. The broker
itself is never stopped or reconfigured; the virtual host (and user) are deleted afterwards.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pika
import pika.exceptions
import pytest

from tests.conftest import require_service
from worker.contract.settings import Settings
from worker.contract.topology import Topology

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"
ACCESS_SCRIPT = ROOT / "deploy" / "docker" / "rabbitmq" / "access.sh"
#: The import is asynchronous: how long to wait for its queues to appear.
IMPORT_TIMEOUT_S = 20.0


def rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=45,
        check=False,
    )
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)}: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def ctl(amqp_url: str) -> None:
    """rabbitmqctl on PATH, talking to the node the tests connect to (the local one)."""
    require_service("rabbitmqctl (on PATH)", lambda: shutil.which("rabbitmqctl") is not None)
    host = urlsplit(amqp_url).hostname
    require_service(
        f"rabbitmqctl for {host} (local nodes only)",
        lambda: host in ("localhost", "127.0.0.1", "::1"),
    )


@pytest.fixture
def vhost(ctl: None) -> Iterator[str]:
    name = f"pabx-deploy-{uuid.uuid4().hex[:12]}"
    rabbitmqctl("add_vhost", name)
    try:
        yield name
    finally:
        rabbitmqctl("delete_vhost", name)


def retarget(document: dict[str, Any], vhost: str) -> dict[str, Any]:
    """The same definitions with every ``"vhost": "/"`` (and the vhost list) moved to ``vhost``."""

    def move(item: Any) -> Any:
        if isinstance(item, dict):
            moved = {key: move(value) for key, value in item.items()}
            if moved.get("vhost") == "/":
                moved["vhost"] = vhost
            return moved
        if isinstance(item, list):
            return [move(value) for value in item]
        return item

    moved = move(document)
    if "vhosts" in moved:
        moved["vhosts"] = [{**v, "name": vhost} for v in moved["vhosts"] if v["name"] == "/"]
    return dict(moved)


def import_definitions(document: dict[str, Any]) -> None:
    # Through stdin, as the rabbitmqctl wrapper runs as the rabbitmq user, which cannot read
    # pytest's private tmp_path. No path at all: 3.10 takes "-" for a file name.
    rabbitmqctl("import_definitions", "--format", "json", stdin=json.dumps(document))


def connect(amqp_url: str, vhost: str, credentials: tuple[str, str] | None = None) -> Any:
    """A connection to ``vhost``; retried while an imported user may not exist yet."""
    params = pika.URLParameters(amqp_url)
    params.virtual_host = vhost
    if credentials is not None:
        params.credentials = pika.PlainCredentials(*credentials)
    deadline = time.monotonic() + IMPORT_TIMEOUT_S
    while True:
        try:
            return pika.BlockingConnection(params)
        except pika.exceptions.ProbableAccessDeniedError:
            if time.monotonic() > deadline:
                raise
        except pika.exceptions.ProbableAuthenticationError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)  # the import runs in the background; AMQP offers nothing to await


def wait_for_queues(connection: Any, names: list[str]) -> None:
    """Until every queue exists (passive declare); the import runs in the background."""
    deadline = time.monotonic() + IMPORT_TIMEOUT_S
    pending = list(names)
    while pending:
        channel = connection.channel()
        try:
            channel.queue_declare(pending[0], passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            assert exc.reply_code == 404, exc
            assert time.monotonic() < deadline, f"queue {pending[0]} never appeared"
            connection.sleep(0.1)  # an import has no event to await over AMQP
            continue
        pending.pop(0)
        channel.close()


def assert_topology(connection: Any, topology: Topology) -> None:
    wait_for_queues(connection, [q.name for q in topology.queues])
    channel = connection.channel()
    for exchange in topology.exchanges:
        channel.exchange_declare(
            exchange.name,
            exchange.type,
            durable=True,
            auto_delete=False,
            arguments=exchange.arguments,
        )
    for queue in topology.queues:
        # Raises PRECONDITION_FAILED (406) if any argument differs from the imported queue.
        channel.queue_declare(
            queue.name, durable=True, auto_delete=False, arguments=queue.arguments
        )
    channel.close()


def routes_to(channel: Any, exchange: str, routing_key: str, queue: str) -> bool:
    body = uuid.uuid4().bytes
    channel.basic_publish(exchange, routing_key, body)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        method, _, got = channel.basic_get(queue, auto_ack=True)
        if method is not None:
            return bool(got == body)
        channel.connection.sleep(0.05)
    return False


def test_definitions_import_into_a_fresh_vhost(amqp_url: str, vhost: str) -> None:
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    import_definitions(retarget(json.loads(DEFINITIONS.read_text()), vhost))
    topology = Topology.from_settings(Settings())
    connection = connect(amqp_url, vhost)
    try:
        assert_topology(connection, topology)
        channel = connection.channel()
        channel.confirm_delivery()
        s = Settings()
        assert routes_to(channel, s.commands_exchange, s.routing_key, s.command_queue)
        # Unbound outcome events fall through the alternate exchange into pabx.unrouted.
        assert routes_to(channel, s.results_exchange, "redirect.nobody", s.unrouted_exchange)
        assert routes_to(channel, s.dead_exchange, "redirect.invalid_command", s.parked_queue)
    finally:
        connection.close()


def test_a_mismatched_import_is_detected(amqp_url: str, vhost: str) -> None:
    """The check above can fail: a queue imported with other arguments is refused."""
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    document = retarget(json.loads(DEFINITIONS.read_text()), vhost)
    for queue in document["queues"]:
        if queue["arguments"].get("x-delivery-limit"):
            queue["arguments"]["x-delivery-limit"] += 1
    import_definitions(document)
    connection = connect(amqp_url, vhost)
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as caught:
            assert_topology(connection, Topology.from_settings(Settings()))
        assert caught.value.reply_code == 406
    finally:
        if connection.is_open:
            connection.close()


def test_compose_boot_definitions_give_a_working_user(
    amqp_url: str, vhost: str, tmp_path: Path
) -> None:
    """What the compose RabbitMQ imports at boot: access.sh's user and vhost, then the topology."""
    user, password = f"pabx-{uuid.uuid4().hex[:8]}", "CHANGE-ME-test"
    rendered = tmp_path / "rendered"
    env = {"RABBITMQ_USER": user, "RABBITMQ_PASSWORD": password, "DEFINITIONS_DIR": str(rendered)}
    subprocess.run(["sh", str(ACCESS_SCRIPT)], env=env, check=True, timeout=30)
    access = retarget(json.loads((rendered / "00-access.json").read_text()), vhost)
    try:
        import_definitions(access)
        import_definitions(retarget(json.loads(DEFINITIONS.read_text()), vhost))
        connection = connect(amqp_url, vhost, (user, password))
        try:
            assert_topology(connection, Topology.from_settings(Settings()))
        finally:
            connection.close()
    finally:
        # The import may still be creating the user when a check fails: wait for it first.
        deadline = time.monotonic() + IMPORT_TIMEOUT_S
        while user not in rabbitmqctl("list_users") and time.monotonic() < deadline:
            time.sleep(0.2)
        if user in rabbitmqctl("list_users"):
            rabbitmqctl("delete_user", user)
