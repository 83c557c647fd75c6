"""A consumer built on the official CloudEvents SDK reads every kind of outcome the worker emits.

The consumer is pika plus ``cloudevents.core.bindings.rabbitmq.from_rabbitmq`` with the JSON
format, as the SDK's documentation builds one, on its own queue bound to the results exchange.
(Every other outcome the integration suite reads goes through the same SDK in the test kit's
peers, :mod:`tests.kit.official_sdk`.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.kit.events import Peer, pika_peer
from tests.kit.official_sdk import parse
from tests.kit.processes import RunningWorker, set_faults
from tests.kit.samples import command
from tests.kit.topology import private_settings
from worker.contract.settings import Settings
from worker.tools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

SITE = "urn:example:pabx-worker:site-a"
#: A ``message_id`` that is no command id either: the outcome has no command id, so no subject.
NOT_AN_ID = "pedido 991/2026"


@pytest.fixture
def site(amqp_url: str, sim: SimulatorThread) -> Settings:
    return private_settings(amqp_url, sim.url, event_source=SITE)


@pytest.fixture
def site_peer(site: Settings) -> Iterator[Peer]:
    yield from pika_peer(site)


def sdk_consumer(peer: Peer) -> str:
    """A queue of our own on the results exchange, read raw (not through the kit)."""
    queue = peer.temporary_queue()
    peer.channel.queue_bind(queue, peer.settings.results_exchange, "#")
    return queue


def read_with_the_sdk(peer: Peer, queue: str, count: int) -> list[Any]:
    events: list[Any] = []
    deadline = time.monotonic() + 30
    while len(events) < count and time.monotonic() < deadline:
        method, props, body = peer.channel.basic_get(queue, auto_ack=True)
        if method is None:
            peer.connection.sleep(0.05)
            continue
        events.append(parse(body, props.content_type, props.headers))
    return events


@pytest.mark.timeout(120)
def test_the_official_sdk_reads_every_kind_of_live_outcome(
    site: Settings, site_peer: Peer, sim: SimulatorThread
) -> None:
    queue = sdk_consumer(site_peer)
    running = RunningWorker(site, site_peer.connect)
    try:
        set_faults(sim, fail_next=1, fail_status=403)
        forbidden = command()
        site_peer.publish(forbidden)
        events = read_with_the_sdk(site_peer, queue, 1)  # the fault is used up first
        accepted = command()
        site_peer.publish(accepted)
        site_peer.publish(accepted)  # a duplicate
        site_peer.publish(command(redirect={"PRIORIDADE": "20"}))
        past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
        site_peer.publish(command(expires_at=past))
        site_peer.send(b"{not json", {"message_id": NOT_AN_ID, "content_type": "application/json"})
        events += read_with_the_sdk(site_peer, queue, 5)
    finally:
        running.stop()
    assert running.error is None
    assert len(events) == 6
    kinds = {(e.get_type(), e.get_data()["duplicate"]) for e in events}
    assert kinds == {
        ("pabx.redirect.failed", False),
        ("pabx.redirect.accepted", False),
        ("pabx.redirect.accepted", True),
        ("pabx.redirect.rejected", False),
        ("pabx.redirect.expired", False),
    }
    for event in events:
        data = event.get_data()
        assert event.get_subject() == data["command_id"]  # absent (None) without a command id
        target = "/default" if data["redirect"] else ""  # the target when the command was read
        assert event.get_source() == SITE + target
    garbage = [e for e in events if e.get_data()["command_id"] is None]
    assert len(garbage) == 1 and garbage[0].get_data()["amqp"]["message_id"] == NOT_AN_ID
