"""SENHA_DISPOSITIVO and the API key appear in no log line, event, parked header or metric.

A real worker process logs at DEBUG while it meets every path: accepted, rejected (invalid,
conflict, PABX 400), failed (403, poison), expired, retried (500s, a hang that times out),
duplicates, and a password taken from DEVICE_PASSWORDS_FILE. Its whole stderr, every outcome
event, every parked copy's headers and ``/metrics`` (when the worker serves it) are searched
for the secrets. A parked copy keeps its producer's body, password included, so it can be
replayed (SPEC §4): the test checks that too.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.chaos.harness import Rig, WorkerProcess, command, command_ids, report, wait_until

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

API_KEY = "ApiKey-Chaos-7d41b2c9e0"
SENHA = "S3nha-Chaos-7781x"
DEVICE_PASSWORD = "D3vice-Pw-4419q"
DEVICE = "7770001"
SECRETS = (API_KEY, SENHA, DEVICE_PASSWORD)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _leaks(text: str) -> list[str]:
    return [
        name
        for name, secret in zip(("api key", "SENHA", "device password"), SECRETS, strict=True)
        if secret in text
    ]


@pytest.mark.timeout(120)
def test_no_secret_in_logs_events_parked_headers_or_metrics(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps({DEVICE: DEVICE_PASSWORD}))
    rig = make_rig(
        api_key=API_KEY,
        store_url=f"sqlite:///{tmp_path / 'store.sqlite3'}",
        device_passwords_file=devices,
        pabx_connect_timeout_s=0.5,
        pabx_read_timeout_s=1.0,
        retry_in_process_attempts=2,
        retry_delays_s=(0.2, 0.5),
        circuit_threshold=50,
    )
    port = _free_port()
    worker = WorkerProcess(
        rig.variant(http_port=port),
        PABX_WORKER_LOG_LEVEL="DEBUG",
    )
    rig.on_close(worker.close)
    worker.wait_ready()

    corr_ids = iter(command_ids("secrets", 40))
    published: dict[str, bytes] = {}
    expected: dict[str, str] = {}

    def send(body: dict[str, Any] | bytes, outcome: str, **props: Any) -> str:
        """Publish; the AMQP correlation_id finds the outcome even when the body is garbage."""
        corr = next(corr_ids)
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        rig.peer.publish(raw, correlation_id=corr, **props)
        published[corr] = raw
        expected[corr] = outcome
        return corr

    def done(corr: str) -> None:
        def arrived() -> bool:
            rig.poll()
            return any(s.properties.correlation_id == corr for s in rig.seen)

        assert wait_until(arrived, 20), f"no outcome for {corr}"

    def good(**changes: Any) -> dict[str, Any]:
        redirect = {"SENHA_DISPOSITIVO": SENHA, **changes.pop("redirect", {})}
        cmd = command(f"secret-{uuid.uuid4().hex[:12]}", redirect=redirect, **changes)
        if cmd["redirect"]["SENHA_DISPOSITIVO"] is None:
            del cmd["redirect"]["SENHA_DISPOSITIVO"]
        return cmd

    first = good()
    cases: list[tuple[dict[str, Any] | bytes, str, dict[str, Any]]] = [
        (first, "accepted", {}),
        (good(redirect={"DISPOSITIVO": DEVICE, "SENHA_DISPOSITIVO": None}), "accepted", {}),
        (good(redirect={"PRIORIDADE": "20"}), "rejected", {}),
        (good(redirect={"PRIORIDAD": "1"}), "rejected", {}),
        (good(redirect={"SENHA_DISPOSITIVO": {"value": SENHA}}), "rejected", {}),
        (good(redirect={"FONTE_MUSICA": "11"}), "rejected", {}),  # the PABX answers 400
        (json.dumps(good()).encode()[:-7], "rejected", {}),  # truncated JSON
        (
            json.dumps(good())
            .replace('"SENHA_DISPOSITIVO"', f'"SENHA_DISPOSITIVO": "{SENHA}", "SENHA_DISPOSITIVO"')
            .encode(),
            "rejected",
            {},
        ),
        (good(redirect={"DISPOSITIVO": "9990000", "SENHA_DISPOSITIVO": None}), "rejected", {}),
        (
            good(expires_at=(datetime.now(UTC) - timedelta(seconds=5)).isoformat()),
            "expired",
            {},
        ),
        # A producer's x-delivery-count on a first delivery is not trusted: no poison.
        (good(), "accepted", {"headers": {"x-delivery-count": 50}}),
        ({**first, "redirect": {**first["redirect"], "DADOS": "other"}}, "rejected", {}),
        (first, "accepted", {}),  # a duplicate: replayed
        (good(), "rejected", {"content_type": "text/plain"}),
    ]
    for body, outcome, props in cases:
        corr = send(body, outcome, **props)
        done(corr)

    rig.faults(fail_next=1, fail_status=403)
    done(send(good(), "failed"))
    rig.faults(fail_next=3, fail_status=503)
    done(send(good(), "accepted"))
    rig.faults(fail_next=1, fail_status=500)
    done(send(good(), "failed"))  # ambiguous: not resent
    rig.faults(fail_next=1, fail_status=401)
    done(send(good(), "failed"))
    rig.faults(hang=True)
    hung = send(good(), "failed")  # a read timeout is ambiguous: not resent
    assert wait_until(lambda: rig.requests_by_command()[_cid(published[hung])] >= 1, 10)
    time.sleep(1.3)  # the read timeout fires on the hung request
    rig.faults()
    done(hung)

    metrics = ""
    try:
        reply = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
        metrics = reply.text if reply.ok else ""
    except requests.RequestException:
        pass  # this worker serves no /metrics yet
    code, _ = worker.terminate(20)
    rig.settle(0.5)
    parked = rig.drain(rig.settings.parked_queue)

    api_keys_sent = {r["headers"].get("x-api-key") for r in rig.pabx_requests()}
    device_used = any(
        isinstance(r["body"], dict) and r["body"].get("SENHA_DISPOSITIVO") == DEVICE_PASSWORD
        for r in rig.pabx_requests()
    )
    events_text = "\n".join(s.raw.decode() + repr(vars(s.properties)) for s in rig.seen)
    headers_text = "\n".join(
        repr(props.headers) + repr(props.correlation_id) for props, _ in parked
    )
    statuses = [s.event["data"]["status"] for s in rig.seen]
    leaks = {
        "logs": _leaks(worker.log),
        "events": _leaks(events_text),
        "parked_headers": _leaks(headers_text),
        "metrics": _leaks(metrics),
    }
    report(
        {
            "scenario": "secrets",
            "sent": len(published),
            "outcomes": dict(sorted({s: statuses.count(s) for s in statuses}.items())),
            "log_lines_scanned": len(worker.lines),
            "log_levels": dict(Counter(_level(line) for line in worker.lines)),
            "events_scanned": len(rig.seen),
            "parked_headers_scanned": len(parked),
            "metrics_scanned": bool(metrics),
            "leaks": sum(len(v) for v in leaks.values()),
        }
    )

    assert code == 0, worker.log[-3000:]
    assert api_keys_sent == {API_KEY} and device_used  # the secrets were really in use
    assert len(worker.lines) > 5 and "consuming" in worker.messages()
    assert any('"level": "WARNING"' in line or '"level": "INFO"' in line for line in worker.lines)
    assert leaks == {"logs": [], "events": [], "parked_headers": [], "metrics": []}, leaks
    assert sorted(statuses) == sorted(expected.values()), (statuses, expected)
    # Parked copies keep the producer's bytes (the password too): they can be replayed.
    assert {body for _, body in parked} <= set(published.values())
    assert sum(SENHA.encode() in body for _, body in parked) >= 5


def _cid(raw: bytes) -> str:
    return str(json.loads(raw)["command_id"])


def _level(line: str) -> str:
    try:
        return str(json.loads(line).get("level", "?"))
    except ValueError:
        return "not-json"


def _status(rig: Rig, correlation_id: str) -> str:
    return next(
        str(s.event["data"]["status"])
        for s in rig.seen
        if s.properties.correlation_id == correlation_id
    )
