"""SENHA_DISPOSITIVO and the API key appear in no log line, event, parked header or metric.

A real worker process logs at DEBUG while it meets every path: accepted, rejected (invalid,
conflict, PABX 400), failed (403, poison), expired, retried (500s, a hang that times out),
duplicates, and a password taken from DEVICE_PASSWORDS_FILE. Its whole stderr, every outcome
event, every parked copy's headers and ``/metrics`` are searched for the secrets. A parked copy
keeps its producer's body, password included, so it can be replayed (SPEC §4): the test checks
that too.

It runs twice. With realistic secrets, a secret found anywhere, even inside other text, is a
leak. With the shortest secrets a user could pick (API key ``k``, password ``4567``), which
ordinary text contains anyway, a leak is a secret in a field position (``"SENHA_DISPOSITIVO":
"4567"``, ``x-api-key: k``, a URL password, a field or label whose whole value is the secret),
and the logs must come out unaltered: every command id and ``ID_CHAMADA`` (chosen to contain
the secrets: ``cmd-45678-…``, ``08/07/24 10:46:19 010A 4567/…``) logged intact, ``***`` only
where a URL password was.
"""

from __future__ import annotations

import itertools
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.chaos.harness import Rig, report
from tests.kit.processes import WorkerProcess, free_port, wait_until
from tests.kit.samples import command_ids
from tests.kit.samples import counted_command as command

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

DEVICE = "7770001"
#: Names a secret's value follows in JSON, a repr, a header or ``name=value``.
SECRET_KEYS = r"(?:x-api-key|api[-_]?key|senha[-_]dispositivo|senha|password|device[-_]password)"
#: A URL password as the logs show it: the one place ``***`` may appear.
MASKED_URL_PASSWORD = re.compile(r"://[^\s/@:]*:\*\*\*@")


@dataclass(frozen=True)
class Secrets:
    """The scenario's secrets; ``short`` ones occur in ordinary text, long ones never do."""

    api_key: str
    senha: str
    device_password: str
    short: bool

    def named(self) -> list[tuple[str, str]]:
        return [
            ("api key", self.api_key),
            ("SENHA", self.senha),
            ("device password", self.device_password),
        ]


LONG = Secrets("ApiKey-Chaos-7d41b2c9e0", "S3nha-Chaos-7781x", "D3vice-Pw-4419q", short=False)
SHORT = Secrets("k", "4567", "4567", short=True)


def _leaks(secrets: Secrets, text: str, values: list[Any]) -> list[str]:
    """Which secrets leak into ``text`` (parsed as ``values``)."""
    found = []
    for name, secret in secrets.named():
        if secrets.short:
            leaked = _in_field_position(secret, text) or _whole_value(secret, values)
        else:
            leaked = secret in text
        if leaked:
            found.append(name)
    return found


def _in_field_position(secret: str, text: str) -> bool:
    s = re.escape(secret)
    return any(
        re.search(pattern, text, re.IGNORECASE)
        for pattern in (
            rf"""["']?{SECRET_KEYS}["']?\s*[:=]\s*["']?{s}(?![\w-])""",
            rf"://[^\s/@:]*:{s}@",
        )
    )


def _whole_value(secret: str, values: list[Any]) -> bool:
    return any(v == secret for v in itertools.chain.from_iterable(map(_scalars, values)))


def _scalars(value: Any) -> Iterator[Any]:
    """Every leaf of a JSON-like value (dict keys included, they can hold data too)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from _scalars(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _scalars(item)
    elif isinstance(value, bytes):
        yield value.decode("utf-8", errors="replace")
    else:
        yield value


def _log_entries(lines: list[str]) -> list[dict[str, Any]]:
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def _label_values(metrics: str) -> list[str]:
    return re.findall(r'="((?:[^"\\]|\\.)*)"', metrics)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("secrets", [LONG, SHORT], ids=["long-secrets", "short-secrets"])
def test_no_secret_in_logs_events_parked_headers_or_metrics(
    make_rig: Callable[..., Rig], tmp_path: Path, secrets: Secrets
) -> None:
    api_key, senha, device_password = secrets.api_key, secrets.senha, secrets.device_password
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps({DEVICE: device_password}))
    rig = make_rig(
        api_key=api_key,
        store_url=f"sqlite:///{tmp_path / 'store.sqlite3'}",
        device_passwords_file=devices,
        pabx_connect_timeout_s=0.5,
        pabx_read_timeout_s=1.0,
        retry_in_process_attempts=2,
        retry_delays_s=(0.2, 0.5),
        circuit_threshold=50,
    )
    port = free_port()
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

    calls = itertools.count()

    def good(**changes: Any) -> dict[str, Any]:
        redirect = {"SENHA_DISPOSITIVO": senha}
        if secrets.short:  # ids and call ids that contain the secrets
            cid = f"cmd-45678-k{uuid.uuid4().hex[:10]}"
            redirect["ID_CHAMADA"] = f"08/07/24 10:46:19 010A 4567/{next(calls):02d}"
        else:
            cid = f"secret-{uuid.uuid4().hex[:12]}"
        redirect.update(changes.pop("redirect", {}))
        cmd = command(cid, redirect=redirect, **changes)
        if cmd["redirect"]["SENHA_DISPOSITIVO"] is None:
            del cmd["redirect"]["SENHA_DISPOSITIVO"]
        sent_ids.add(cid)
        sent_calls.add(cmd["redirect"]["ID_CHAMADA"])
        return cmd

    sent_ids: set[str] = set()
    sent_calls: set[str] = set()

    first = good()
    by_device = good(redirect={"DISPOSITIVO": DEVICE, "SENHA_DISPOSITIVO": None})
    cases: list[tuple[dict[str, Any] | bytes, str, dict[str, Any]]] = [
        (first, "accepted", {}),
        (by_device, "accepted", {}),
        (good(redirect={"PRIORIDADE": "20"}), "rejected", {}),
        (good(redirect={"PRIORIDAD": "1"}), "rejected", {}),
        (good(redirect={"SENHA_DISPOSITIVO": {"value": senha}}), "rejected", {}),
        (good(redirect={"FONTE_MUSICA": "11"}), "rejected", {}),  # the PABX answers 400
        (json.dumps(good()).encode()[:-7], "rejected", {}),  # truncated JSON
        (
            json.dumps(good())
            .replace('"SENHA_DISPOSITIVO"', f'"SENHA_DISPOSITIVO": "{senha}", "SENHA_DISPOSITIVO"')
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

    reply = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    reply.raise_for_status()
    metrics = reply.text
    code, _ = worker.terminate(20)
    rig.settle(0.5)
    parked = rig.drain(rig.settings.parked_queue)

    api_keys_sent = {r["headers"].get("x-api-key") for r in rig.pabx_requests()}
    device_used = [
        r["body"].get("SENHA_DISPOSITIVO")
        for r in rig.pabx_requests()
        if isinstance(r["body"], dict) and r["body"].get("DADOS") == by_device["command_id"]
    ]
    events_text = "\n".join(s.raw.decode() + repr(vars(s.properties)) for s in rig.seen)
    event_values = [s.event for s in rig.seen] + [s.properties.headers for s in rig.seen]
    headers_text = "\n".join(
        repr(props.headers) + repr(props.correlation_id) for props, _ in parked
    )
    entries = _log_entries(worker.lines)
    statuses = [s.event["data"]["status"] for s in rig.seen]
    leaks = {
        "logs": _leaks(secrets, worker.log, entries),
        "events": _leaks(secrets, events_text, event_values),
        "parked_headers": _leaks(secrets, headers_text, [p.headers for p, _ in parked]),
        "metrics": _leaks(secrets, metrics, _label_values(metrics)),
    }
    logged_ids = {e["command_id"] for e in entries if e.get("command_id") is not None}
    logged_calls = {e["ID_CHAMADA"] for e in entries if e.get("ID_CHAMADA") is not None}
    masked = MASKED_URL_PASSWORD.sub("://", worker.log).count("***")
    report(
        {
            "scenario": "secrets-short" if secrets.short else "secrets",
            "sent": len(published),
            "outcomes": dict(sorted({s: statuses.count(s) for s in statuses}.items())),
            "log_lines_scanned": len(worker.lines),
            "log_levels": dict(Counter(_level(line) for line in worker.lines)),
            "events_scanned": len(rig.seen),
            "parked_headers_scanned": len(parked),
            "metrics_scanned": bool(metrics),
            "leaks": sum(len(v) for v in leaks.values()),
            "ids_logged": len(logged_ids),
            "masked_outside_urls": masked,
        }
    )

    assert code == 0, worker.log[-3000:]
    assert api_keys_sent == {api_key}  # the secrets were really in use
    assert device_used and set(device_used) == {device_password}, device_used
    messages = worker.messages()
    assert len(worker.lines) > 5 and "consuming" in messages
    assert "connected to the broker" in messages
    assert any('"level": "WARNING"' in line or '"level": "INFO"' in line for line in worker.lines)
    assert leaks == {"logs": [], "events": [], "parked_headers": [], "metrics": []}, leaks
    # Nothing else was touched: ids and call ids logged as sent, "***" only for URL passwords.
    assert logged_ids - sent_ids == set(), logged_ids - sent_ids
    assert logged_calls - sent_calls == set(), logged_calls - sent_calls
    assert {cid for cid in sent_ids if cid in published_ids(published)} <= logged_ids
    assert sent_calls & logged_calls, "no ID_CHAMADA was logged"
    assert masked == 0, [line for line in worker.lines if "***" in line]
    assert sorted(statuses) == sorted(expected.values()), (statuses, expected)
    # Parked copies keep the producer's bytes (the password too): they can be replayed.
    assert {body for _, body in parked} <= set(published.values())
    field = f'"SENHA_DISPOSITIVO": "{senha}"'.encode()
    assert sum(field in body for _, body in parked) >= 5


def published_ids(published: dict[str, bytes]) -> set[str]:
    """The command ids of the published bodies that are JSON objects naming one."""
    ids = set()
    for raw in published.values():
        try:
            body = json.loads(raw)
        except ValueError:
            continue
        if isinstance(body, dict) and isinstance(body.get("command_id"), str):
            ids.add(body["command_id"])
    return ids


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
