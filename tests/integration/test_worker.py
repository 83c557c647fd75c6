"""The worker end to end: producer → broker → worker → simulator over HTTP → events.

Each test marked ``ON_BOTH_BROKERS`` runs twice: on the in-memory broker (no server needed)
and on RabbitMQ with a pika producer (``integration``).
"""

from __future__ import annotations

import json
from typing import Any

import pika
import pytest
from pydantic import SecretStr

from tests.integration.conftest import (
    API_KEY,
    CHANNEL,
    ON_BOTH_BROKERS,
    AnyPeer,
    RunningWorker,
    private_settings,
    set_faults,
    sim_requests,
)
from tests.kit.samples import VENDOR_EXAMPLE, command
from worker.consume.consumer import Worker
from worker.contract.errors import ConfigurationError
from worker.contract.models import OutcomeEvent
from worker.contract.settings import Settings
from worker.tools.simulator import SimulatorThread

VENDOR_BODY = VENDOR_EXAMPLE


def only_event(peer: AnyPeer) -> tuple[Any, dict[str, Any]]:
    events = peer.events(1)
    assert len(events) == 1, events
    return events[0]


@ON_BOTH_BROKERS
def test_valid_command_reaches_the_pabx_once_and_is_accepted(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread
) -> None:
    cmd = command(redirect={"PRIORIDADE": 0, "TEMPO_FILA": 23})
    peer.publish(cmd)
    props, event = only_event(peer)
    OutcomeEvent.model_validate(event)
    assert event["type"] == "pabx.redirect.accepted"
    assert event["data"]["command_id"] == cmd["command_id"]
    assert props.content_type == "application/cloudevents+json"
    assert props.message_id == event["id"]
    assert props.correlation_id == cmd["command_id"]
    received = sim_requests(sim)
    assert len(received) == 1
    assert received[0]["channel_id"] == CHANNEL
    headers = {k.lower(): v for k, v in received[0]["headers"].items()}
    assert headers["x-api-key"] == API_KEY
    assert received[0]["body"] == {**cmd["redirect"], "PRIORIDADE": "0", "TEMPO_FILA": "23"}
    peer.sleep(0.3)
    assert peer.events(2, timeout=0.5) == [(props, event)]  # exactly one event
    assert peer.queue_length(peer.settings.command_queue) == 0  # acked


@ON_BOTH_BROKERS
def test_outcome_goes_to_reply_to_with_the_producer_correlation_id(
    worker: RunningWorker, peer: AnyPeer
) -> None:
    reply = peer.temporary_queue()
    peer.publish(command(), reply_to=reply, correlation_id="corr-77")
    props, event = only_event(peer)
    assert props.correlation_id == "corr-77"
    replies = peer.drain(reply, 1)
    assert len(replies) == 1 and json.loads(replies[0][1])["id"] == event["id"]


@ON_BOTH_BROKERS
def test_reply_to_a_topology_queue_is_not_replied_to(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread
) -> None:
    peer.publish(command(), reply_to=peer.settings.command_queue)
    _, event = only_event(peer)
    assert event["data"]["status"] == "accepted"
    peer.sleep(1.0)  # an outcome in the command queue would come back as a command
    assert len(peer.events(2, timeout=1.0)) == 1
    assert len(sim_requests(sim)) == 1


@ON_BOTH_BROKERS
def test_delivery_count_header_on_a_first_delivery_is_ignored(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread
) -> None:
    peer.publish(command(), headers={"x-delivery-count": 9})
    _, event = only_event(peer)
    assert event["data"]["status"] == "accepted" and event["data"]["attempts"] == 1
    assert len(sim_requests(sim)) == 1


INVALID = {
    "prioridade-20": command(redirect={"PRIORIDADE": "20"}),
    "typo": {
        **command(),
        "redirect": {
            **{k: v for k, v in VENDOR_BODY.items() if k != "PRIORIDADE"},
            "PRIORIDAD": "1",
        },
    },
    "missing-field": {
        **command(),
        "redirect": {k: v for k, v in VENDOR_BODY.items() if k != "ID_CHAMADA"},
    },
    "dados-101": command(redirect={"DADOS": "x" * 101}),
    "unknown-top-level": {**command(), "priority": 1},
    "bad-command-id": command(command_id="has space"),
}


@ON_BOTH_BROKERS
@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_commands_are_rejected_parked_and_never_sent(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread, name: str
) -> None:
    peer.publish(INVALID[name], message_id=f"msg-{name}")
    _, event = only_event(peer)
    assert event["data"]["status"] == "rejected"
    assert event["data"]["error"]["code"] == "invalid_command"
    parked = peer.drain(peer.settings.parked_queue, 1)
    assert len(parked) == 1
    props, body = parked[0]
    assert body == json.dumps(INVALID[name]).encode()  # the producer's bytes, replayable
    assert props.headers["x-pabx-error-code"] == "invalid_command"
    assert props.headers["x-pabx-attempts"] == 0
    assert len(props.headers["x-pabx-error"]) <= 512
    assert sim_requests(sim) == []


@ON_BOTH_BROKERS
@pytest.mark.parametrize(
    ("body", "props"),
    [
        (b"this is not json", {}),
        (b'{"type": "redirect"', {}),
        (b"\xff\xfe\x00", {}),
        (json.dumps(command()).encode(), {"content_type": "text/plain"}),
        (json.dumps(command()).encode(), {"content_encoding": "gzip"}),
        (json.dumps(command(redirect={"DADOS": "a" * 90})).encode() + b" " * 70_000, {}),
    ],
    ids=["text", "truncated", "bad-utf8", "text-plain", "gzip", "oversize"],
)
def test_garbage_is_rejected_with_amqp_correlation(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread, body: bytes, props: dict[str, Any]
) -> None:
    props.setdefault("content_type", "application/json")
    peer.publish(body, correlation_id="garbage-corr", **props)
    _, event = only_event(peer)
    assert event["data"]["status"] == "rejected"
    assert event["data"]["error"]["code"] == "invalid_command"
    if event["data"]["command_id"] is None:
        assert event["data"]["amqp"]["correlation_id"] == "garbage-corr"
    assert len(peer.drain(peer.settings.parked_queue, 1)) == 1
    assert sim_requests(sim) == []


@ON_BOTH_BROKERS
@pytest.mark.parametrize(
    ("status", "outcome", "code"),
    [
        (400, "rejected", "pabx_bad_request"),
        (401, "failed", "pabx_unauthorized"),
        (403, "failed", "pabx_forbidden"),
    ],
)
def test_pabx_refusals_are_final_after_one_request(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread, status: int, outcome: str, code: str
) -> None:
    set_faults(sim, fail_next=1, fail_status=status)
    peer.publish(command())
    _, event = only_event(peer)
    assert (event["data"]["status"], event["data"]["error"]["code"]) == (outcome, code)
    assert event["data"]["pabx"]["status_code"] == status
    assert len(sim_requests(sim)) == 1
    parked = peer.drain(peer.settings.parked_queue, 1)
    assert parked[0][0].headers["x-pabx-error-code"] == code


@ON_BOTH_BROKERS
def test_a_wrong_api_key_is_refused_by_the_pabx_with_403(
    settings: Settings, sim: SimulatorThread, peer: AnyPeer
) -> None:
    settings = settings.model_copy(update={"pabx_api_key": SecretStr("not-the-key")})
    running = RunningWorker(settings, peer.connect)
    try:
        peer.publish(command())
        _, event = only_event(peer)
    finally:
        running.stop()
    assert event["data"]["error"]["code"] == "pabx_forbidden"


@ON_BOTH_BROKERS
def test_503_is_retried_and_then_accepted(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread
) -> None:
    set_faults(sim, fail_next=2, fail_status=503)
    peer.publish(command())
    _, event = only_event(peer)
    assert event["data"]["status"] == "accepted" and event["data"]["attempts"] == 3
    assert [r["status"] for r in sim_requests(sim)] == [503, 503, 200]


@ON_BOTH_BROKERS
def test_outage_past_the_in_process_budget_is_retried_through_the_broker(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread
) -> None:
    set_faults(sim, fail_next=4, fail_status=503)
    peer.publish(command())
    _, event = only_event(peer)
    assert event["data"]["status"] == "accepted" and event["data"]["attempts"] == 5
    assert len(sim_requests(sim)) == 5


@ON_BOTH_BROKERS
def test_the_same_command_three_times_is_sent_once(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread
) -> None:
    cmd = command()
    for _ in range(3):
        peer.publish(cmd)
    events = peer.events(3)
    assert len(events) == 3
    assert {e["id"] for _, e in events} == {events[0][1]["id"]}
    assert sorted(e["data"]["duplicate"] for _, e in events) == [False, True, True]
    assert len(sim_requests(sim)) == 1


@ON_BOTH_BROKERS
def test_worker_survives_everything_and_accepts_the_next_command(
    worker: RunningWorker, peer: AnyPeer, sim: SimulatorThread
) -> None:
    for body in (b"garbage", b"[]", b"{}", b"null", json.dumps(INVALID["typo"]).encode()):
        peer.publish(body)
    set_faults(sim, fail_next=1, fail_status=403)
    peer.publish(command())
    assert len(peer.events(6)) == 6  # the 403 went to that command, not to the next one
    good = command()
    peer.publish(good)
    events = peer.events(7)
    assert len(events) == 7
    last = [e for _, e in events if e["data"]["command_id"] == good["command_id"]]
    assert last and last[0]["data"]["status"] == "accepted"
    assert worker.thread.is_alive() and worker.worker.state.sessions == 1


@pytest.mark.integration
def test_existing_queue_with_other_arguments_is_a_configuration_error(
    amqp_url: str, sim: SimulatorThread
) -> None:
    settings = private_settings(amqp_url, sim.url)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_declare(
        settings.command_queue, durable=True, arguments={"x-queue-type": "classic"}
    )
    try:
        with pytest.raises(ConfigurationError, match="already exists with other arguments"):
            from worker.runtime import build_processor

            with build_processor(settings) as processor:
                Worker(settings, processor).run()
    finally:
        channel.queue_delete(settings.command_queue)
        for name in ("commands", "unrouted", "results", "dead"):
            channel.exchange_delete(settings.command_queue.replace("redirect", name))
        connection.close()
