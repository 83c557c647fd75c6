"""The PABX simulator (SPEC §6), exercised over real HTTP."""

from __future__ import annotations

import json
import math
import re
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
import requests

from tests.kit.samples import VENDOR_EXAMPLE
from worker.tools.simulator import Faults, SimulatorThread, parse_faults

API_KEY = "test-key-123"
TIMEOUT = 10.0
DEFAULT_FAULTS = {
    "latency_ms": 0,
    "latency_max_ms": 0,
    "fail_next": 0,
    "fail_status": 503,
    "error_rate": 0.0,
    "hang": False,
    "reset_after_read": False,
    "trickle_ms": 0,
    "trickle_bytes": 32,
}

REQUIRED = [
    "DISPOSITIVO",
    "SENHA_DISPOSITIVO",
    "DISPOSITIVO_DESTINO",
    "ID_CHAMADA",
    "PRIORIDADE",
    "DADOS",
]
OPTIONAL = [
    "FONTE_MUSICA",
    "TEMPO_FILA",
    "DISPOSITIVO_DESTINO_APOS_FINALIZACAO_CHAMADA",
    "TEMPO_POS_ATENDIMENTO",
]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(api_key=API_KEY) as running:
        yield running


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture(autouse=True)
def _reset(sim: SimulatorThread, http: requests.Session) -> None:
    assert http.put(f"{sim.url}/_sim/faults", json={}, timeout=TIMEOUT).status_code == 200
    assert http.delete(f"{sim.url}/_sim/requests", timeout=TIMEOUT).status_code in (200, 204)


def redirect(
    sim: SimulatorThread,
    http: requests.Session,
    body: Any = None,
    *,
    channel: str | int = 17,
    key: str | None = API_KEY,
    data: str | bytes | None = None,
    timeout: float = TIMEOUT,
) -> requests.Response:
    headers = {"x-api-key": key} if key is not None else {}
    url = f"{sim.url}/requests/{channel}/executa-desvio"
    if data is not None:
        return http.post(url, data=data, headers=headers, timeout=timeout)
    payload = VENDOR_EXAMPLE if body is None else body
    return http.post(url, json=payload, headers=headers, timeout=timeout)


def recorded(sim: SimulatorThread, http: requests.Session) -> list[dict[str, Any]]:
    response = http.get(f"{sim.url}/_sim/requests", timeout=TIMEOUT)
    assert response.status_code == 200
    result: list[dict[str, Any]] = response.json()["requests"]
    return result


def put_faults(sim: SimulatorThread, http: requests.Session, **faults: Any) -> None:
    response = http.put(f"{sim.url}/_sim/faults", json=faults, timeout=TIMEOUT)
    assert response.status_code == 200, response.text


def with_field(name: str, value: Any) -> dict[str, Any]:
    return {**VENDOR_EXAMPLE, name: value}


def assert_400(response: requests.Response, mentions: str) -> None:
    assert response.status_code == 400, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert mentions in response.json()["error"]


# --------------------------------------------------------------------------- success


def test_vendor_example_is_accepted_and_recorded(
    sim: SimulatorThread, http: requests.Session
) -> None:
    response = redirect(sim, http)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {}

    [entry] = recorded(sim, http)
    assert entry["channel_id"] == 17
    assert entry["status"] == 200
    assert entry["body"] == VENDOR_EXAMPLE
    headers = {k.lower(): v for k, v in entry["headers"].items()}
    assert headers["x-api-key"] == API_KEY
    assert headers["content-type"] == "application/json"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["received_at"])


def test_only_required_fields_are_accepted(sim: SimulatorThread, http: requests.Session) -> None:
    body = {name: VENDOR_EXAMPLE[name] for name in REQUIRED}
    assert redirect(sim, http, body).status_code == 200


def test_requests_are_recorded_in_arrival_order_including_errors(
    sim: SimulatorThread, http: requests.Session
) -> None:
    assert redirect(sim, http, channel=1).status_code == 200
    assert redirect(sim, http, channel=2, key=None).status_code == 401
    assert redirect(sim, http, channel="abc").status_code == 400
    assert redirect(sim, http, channel=3, data="not json").status_code == 400
    entries = recorded(sim, http)
    assert [e["channel_id"] for e in entries] == [1, 2, "abc", 3]
    assert [e["status"] for e in entries] == [200, 401, 400, 400]
    assert entries[3]["body"] == "not json"


def test_prioridade_bounds_are_accepted(sim: SimulatorThread, http: requests.Session) -> None:
    assert redirect(sim, http, with_field("PRIORIDADE", "19")).status_code == 200
    assert redirect(sim, http, with_field("PRIORIDADE", "0")).status_code == 200


def test_dados_of_100_chars_is_accepted(sim: SimulatorThread, http: requests.Session) -> None:
    assert redirect(sim, http, with_field("DADOS", "x" * 100)).status_code == 200


# --------------------------------------------------------------------------- auth


def test_missing_api_key_is_401(sim: SimulatorThread, http: requests.Session) -> None:
    response = redirect(sim, http, key=None)
    assert response.status_code == 401
    assert "x-api-key" in response.json()["error"]


def test_empty_api_key_is_401(sim: SimulatorThread, http: requests.Session) -> None:
    assert redirect(sim, http, key="").status_code == 401


def test_wrong_api_key_is_403(sim: SimulatorThread, http: requests.Session) -> None:
    response = redirect(sim, http, key="wrong")
    assert response.status_code == 403
    assert "x-api-key" in response.json()["error"]


def test_auth_is_checked_before_the_body(sim: SimulatorThread, http: requests.Session) -> None:
    assert redirect(sim, http, data="junk", key=None).status_code == 401
    assert redirect(sim, http, data="junk", key="wrong").status_code == 403


# --------------------------------------------------------------------------- 400 classes


@pytest.mark.parametrize("name", REQUIRED)
def test_missing_required_field_is_400(
    sim: SimulatorThread, http: requests.Session, name: str
) -> None:
    body = {k: v for k, v in VENDOR_EXAMPLE.items() if k != name}
    assert_400(redirect(sim, http, body), name)


@pytest.mark.parametrize("value", ["20", "-1", "x", "", " 1", "1.0", "100"])
def test_bad_prioridade_is_400(sim: SimulatorThread, http: requests.Session, value: str) -> None:
    assert_400(redirect(sim, http, with_field("PRIORIDADE", value)), "PRIORIDADE")


def test_dados_of_101_chars_is_400(sim: SimulatorThread, http: requests.Session) -> None:
    assert_400(redirect(sim, http, with_field("DADOS", "x" * 101)), "DADOS")


@pytest.mark.parametrize("channel", ["abc", "-1", "1.5", "17a", "1" * 20])
def test_non_integer_channel_is_400(
    sim: SimulatorThread, http: requests.Session, channel: str
) -> None:
    assert_400(redirect(sim, http, channel=channel), "channelID")


@pytest.mark.parametrize("data", ["not json", "{", ""])
def test_non_json_body_is_400(sim: SimulatorThread, http: requests.Session, data: str) -> None:
    assert_400(redirect(sim, http, data=data), "JSON")


@pytest.mark.parametrize("body", [[VENDOR_EXAMPLE], "a string", 17, None])
def test_json_that_is_not_an_object_is_400(
    sim: SimulatorThread, http: requests.Session, body: Any
) -> None:
    assert_400(redirect(sim, http, data=json.dumps(body)), "JSON object")


def test_invalid_utf8_body_is_400(sim: SimulatorThread, http: requests.Session) -> None:
    assert_400(redirect(sim, http, data=b'{"DADOS": "\xff"}'), "UTF-8")


def test_unknown_field_is_400(sim: SimulatorThread, http: requests.Session) -> None:
    assert_400(redirect(sim, http, with_field("PRIORIDAD", "0")), "PRIORIDAD")


@pytest.mark.parametrize("name", REQUIRED + OPTIONAL)
@pytest.mark.parametrize("value", [0, 1.5, None, True, ["1"], {"a": "1"}])
def test_non_string_value_is_400(
    sim: SimulatorThread, http: requests.Session, name: str, value: Any
) -> None:
    assert_400(redirect(sim, http, with_field(name, value)), name)


@pytest.mark.parametrize("name", ["DISPOSITIVO", "SENHA_DISPOSITIVO", "DISPOSITIVO_DESTINO"])
def test_empty_identifier_is_400(sim: SimulatorThread, http: requests.Session, name: str) -> None:
    assert_400(redirect(sim, http, with_field(name, "")), name)


@pytest.mark.parametrize("value", ["0", "11", "x", "-1"])
def test_bad_fonte_musica_is_400(sim: SimulatorThread, http: requests.Session, value: str) -> None:
    assert_400(redirect(sim, http, with_field("FONTE_MUSICA", value)), "FONTE_MUSICA")


@pytest.mark.parametrize("name", ["TEMPO_FILA", "TEMPO_POS_ATENDIMENTO"])
def test_non_digit_tempo_is_400(sim: SimulatorThread, http: requests.Session, name: str) -> None:
    assert_400(redirect(sim, http, with_field(name, "5s")), name)


# --------------------------------------------------------------------------- faults


def test_fail_next_then_success(sim: SimulatorThread, http: requests.Session) -> None:
    put_faults(sim, http, fail_next=2, fail_status=503)
    assert [redirect(sim, http).status_code for _ in range(3)] == [503, 503, 200]
    assert [e["status"] for e in recorded(sim, http)] == [503, 503, 200]
    assert http.get(f"{sim.url}/_sim/faults", timeout=TIMEOUT).json()["fail_next"] == 0


def test_faults_apply_before_vendor_rules(sim: SimulatorThread, http: requests.Session) -> None:
    put_faults(sim, http, fail_next=1, fail_status=500)
    assert redirect(sim, http, key=None, data="junk").status_code == 500


def test_error_rate_one_always_fails(sim: SimulatorThread, http: requests.Session) -> None:
    put_faults(sim, http, error_rate=1.0, fail_status=502)
    assert [redirect(sim, http).status_code for _ in range(5)] == [502] * 5


def test_latency_delays_the_answer(sim: SimulatorThread, http: requests.Session) -> None:
    put_faults(sim, http, latency_ms=200)
    started = time.monotonic()
    assert redirect(sim, http).status_code == 200
    assert time.monotonic() - started >= 0.2


def test_hang_never_answers(sim: SimulatorThread, http: requests.Session) -> None:
    put_faults(sim, http, hang=True)
    with pytest.raises(requests.ReadTimeout):
        redirect(sim, http, timeout=0.5)
    [entry] = recorded(sim, http)
    assert entry["status"] is None


def test_put_faults_replaces_every_setting(sim: SimulatorThread, http: requests.Session) -> None:
    every = {
        "latency_ms": 5,
        "latency_max_ms": 7,
        "fail_next": 3,
        "fail_status": 429,
        "error_rate": 0.5,
        "hang": True,
        "reset_after_read": True,
        "trickle_ms": 2.5,
        "trickle_bytes": 4,
    }
    put_faults(sim, http, **every)
    assert http.get(f"{sim.url}/_sim/faults", timeout=TIMEOUT).json() == every
    put_faults(sim, http, fail_next=1)
    current = http.get(f"{sim.url}/_sim/faults", timeout=TIMEOUT).json()
    assert current == {**DEFAULT_FAULTS, "fail_next": 1}


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "[]",
        '{"latency": 5}',
        '{"latency_ms": -1}',
        '{"latency_ms": "5"}',
        '{"fail_next": 1.5}',
        '{"fail_next": true}',
        '{"fail_next": -1}',
        '{"fail_status": 200}',
        '{"fail_status": 600}',
        '{"error_rate": 1.5}',
        '{"error_rate": -0.1}',
        '{"hang": 1}',
    ],
)
def test_put_faults_rejects_bad_input(
    sim: SimulatorThread, http: requests.Session, payload: str
) -> None:
    response = http.put(f"{sim.url}/_sim/faults", data=payload, timeout=TIMEOUT)
    assert response.status_code == 400
    assert response.json()["error"]
    assert http.get(f"{sim.url}/_sim/faults", timeout=TIMEOUT).json() == DEFAULT_FAULTS


@pytest.mark.parametrize(
    ("payload", "key"),
    [
        ('{"latency_max_ms": -1}', "latency_max_ms"),
        ('{"latency_max_ms": "5"}', "latency_max_ms"),
        ('{"latency_max_ms": true}', "latency_max_ms"),
        ('{"latency_max_ms": NaN}', "latency_max_ms"),
        ('{"latency_max_ms": Infinity}', "latency_max_ms"),
        ('{"trickle_ms": -0.5}', "trickle_ms"),
        ('{"trickle_ms": "20"}', "trickle_ms"),
        ('{"trickle_ms": null}', "trickle_ms"),
        ('{"trickle_bytes": 1}', "trickle_bytes"),
        ('{"trickle_bytes": 0}', "trickle_bytes"),
        ('{"trickle_bytes": 10.0}', "trickle_bytes"),
        ('{"trickle_bytes": true}', "trickle_bytes"),
        ('{"reset_after_read": 1}', "reset_after_read"),
        ('{"reset_after_read": "true"}', "reset_after_read"),
        ('{"reset_after_read": null}', "reset_after_read"),
        ('{"latency_ms": 1, "trickle": 5}', "trickle"),
    ],
)
def test_put_faults_rejects_bad_new_settings_naming_the_key(
    sim: SimulatorThread, http: requests.Session, payload: str, key: str
) -> None:
    response = http.put(f"{sim.url}/_sim/faults", data=payload, timeout=TIMEOUT)
    assert response.status_code == 400
    assert key in response.json()["error"]
    assert http.get(f"{sim.url}/_sim/faults", timeout=TIMEOUT).json() == DEFAULT_FAULTS


def test_parse_faults_defaults() -> None:
    assert parse_faults({}) == Faults()
    assert parse_faults({"latency_ms": 10}).latency_ms == 10
    defaults = Faults()
    assert (defaults.latency_max_ms, defaults.trickle_ms, defaults.trickle_bytes) == (0, 0, 32)
    assert defaults.reset_after_read is False


def test_parse_faults_new_settings() -> None:
    faults = parse_faults(
        {"latency_max_ms": 50, "trickle_ms": 20, "trickle_bytes": 2, "reset_after_read": True}
    )
    assert faults == Faults(
        latency_max_ms=50, trickle_ms=20, trickle_bytes=2, reset_after_read=True
    )
    with pytest.raises(ValueError, match="latency_max_ms"):
        parse_faults({"latency_max_ms": math.inf})
    with pytest.raises(ValueError, match="trickle_bytes"):
        parse_faults({"trickle_bytes": 1})


# --------------------------------------------------------------------------- admin


def test_delete_requests_clears(sim: SimulatorThread, http: requests.Session) -> None:
    redirect(sim, http)
    redirect(sim, http)
    assert len(recorded(sim, http)) == 2
    assert http.delete(f"{sim.url}/_sim/requests", timeout=TIMEOUT).status_code in (200, 204)
    assert recorded(sim, http) == []


def test_health(sim: SimulatorThread, http: requests.Session) -> None:
    response = http.get(f"{sim.url}/_sim/health", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_initial_latency_and_clean_stop() -> None:
    with SimulatorThread(api_key="k", latency_ms=150) as other:
        faults = requests.get(f"{other.url}/_sim/faults", timeout=TIMEOUT).json()
        assert faults["latency_ms"] == 150
        started = time.monotonic()
        response = requests.post(
            f"{other.url}/requests/1/executa-desvio",
            json=VENDOR_EXAMPLE,
            headers={"x-api-key": "k"},
            timeout=TIMEOUT,
        )
        assert response.status_code == 200
        assert time.monotonic() - started >= 0.15
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{other.url}/_sim/health", timeout=TIMEOUT)


def test_stop_is_not_blocked_by_a_hanging_request() -> None:
    sim = SimulatorThread(api_key="k").start()
    host, port = sim.url.removeprefix("http://").split(":")
    try:
        requests.put(f"{sim.url}/_sim/faults", json={"hang": True}, timeout=TIMEOUT)
        with socket.create_connection((host, int(port)), timeout=TIMEOUT) as conn:
            conn.sendall(
                b"POST /requests/1/executa-desvio HTTP/1.1\r\n"
                b"Host: x\r\nContent-Length: 2\r\n\r\n{}"
            )
            deadline = time.monotonic() + TIMEOUT
            while not recorded_plain(sim.url) and time.monotonic() < deadline:
                time.sleep(0.01)
            started = time.monotonic()
            sim.stop()  # the hanging handler is released, not waited out
            elapsed = time.monotonic() - started
            answer = conn.recv(4096)
    finally:
        sim.stop()
    assert elapsed < 1.0
    assert answer.startswith(b"HTTP/1.1 503")


def recorded_plain(url: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = requests.get(f"{url}/_sim/requests", timeout=TIMEOUT).json()[
        "requests"
    ]
    return result


# --------------------------------------------------------------------------- timing, raw clients


def host_port(sim: SimulatorThread) -> tuple[str, int]:
    host, port = sim.url.removeprefix("http://").split(":")
    return host, int(port)


def raw_redirect(sim: SimulatorThread, *, key: str = API_KEY) -> socket.socket:
    """Send one vendor request over a plain socket; the caller reads the answer."""
    body = json.dumps(VENDOR_EXAMPLE).encode()
    head = (
        "POST /requests/17/executa-desvio HTTP/1.1\r\n"
        f"Host: x\r\nx-api-key: {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    conn = socket.create_connection(host_port(sim), timeout=TIMEOUT)
    conn.sendall(head.encode() + body)
    return conn


def read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    """Read up to the end of the headers: (head, body bytes that came with it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        assert chunk, f"connection closed before the headers ended: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def read_exactly(conn: socket.socket, data: bytes, size: int) -> bytes:
    while len(data) < size:
        chunk = conn.recv(4096)
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def wait_until(check: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def only_record(sim: SimulatorThread, http: requests.Session) -> dict[str, Any]:
    [entry] = recorded(sim, http)
    return entry


def test_records_carry_arrived_and_ended(sim: SimulatorThread, http: requests.Session) -> None:
    before = time.time()
    assert redirect(sim, http).status_code == 200
    assert redirect(sim, http, key=None).status_code == 401
    after = time.time()
    first, second = recorded(sim, http)
    for entry in (first, second):
        assert isinstance(entry["arrived"], float)
        assert isinstance(entry["ended"], float)
        assert before - 1 <= entry["arrived"] <= entry["ended"] <= after + 1
    assert first["ended"] <= second["arrived"]  # one connection, one request at a time
    received = first["received_at"].replace("Z", "+00:00")
    assert abs(datetime.fromisoformat(received).timestamp() - first["arrived"]) < 0.002


def test_ended_is_null_while_a_hang_is_open(sim: SimulatorThread, http: requests.Session) -> None:
    put_faults(sim, http, hang=True)
    with raw_redirect(sim):
        wait_until(lambda: len(recorded(sim, http)) == 1)
        time.sleep(0.1)
        entry = only_record(sim, http)
        assert entry["ended"] is None
        assert entry["status"] is None
    wait_until(lambda: only_record(sim, http)["ended"] is not None, timeout=2)
    entry = only_record(sim, http)
    assert entry["status"] is None
    assert entry["ended"] - entry["arrived"] >= 0.1


def test_latency_max_spreads_latencies_within_bounds(
    sim: SimulatorThread, http: requests.Session
) -> None:
    put_faults(sim, http, latency_ms=20, latency_max_ms=120)
    for _ in range(12):
        assert redirect(sim, http).status_code == 200
    durations = [e["ended"] - e["arrived"] for e in recorded(sim, http)]
    assert len(durations) == 12
    assert min(durations) >= 0.02 - 0.005
    assert max(durations) <= 0.12 + 0.5
    assert max(durations) - min(durations) >= 0.02  # not a fixed delay


def test_latency_max_below_latency_keeps_the_fixed_latency(
    sim: SimulatorThread, http: requests.Session
) -> None:
    put_faults(sim, http, latency_ms=100, latency_max_ms=50)
    assert redirect(sim, http).status_code == 200
    entry = only_record(sim, http)
    assert entry["ended"] - entry["arrived"] >= 0.1 - 0.005


def test_trickle_sends_headers_at_once_and_the_body_slowly(
    sim: SimulatorThread, http: requests.Session
) -> None:
    trickle_ms, trickle_bytes = 50, 10
    total = trickle_ms * trickle_bytes / 1000
    put_faults(sim, http, trickle_ms=trickle_ms, trickle_bytes=trickle_bytes)
    started = time.monotonic()
    with raw_redirect(sim) as conn:
        head, rest = read_head(conn)
        headers_after = time.monotonic() - started
        body = read_exactly(conn, rest, trickle_bytes)
        body_after = time.monotonic() - started
    lines = head.decode().split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200")
    fields_ = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert fields_["content-length"] == str(trickle_bytes)
    assert fields_["content-type"].startswith("application/json")
    assert headers_after < total / 2
    assert len(rest) < trickle_bytes
    assert 0.8 * total <= body_after < total + 5
    assert body == b"{}" + b" " * (trickle_bytes - 2)
    assert json.loads(body) == {}
    wait_until(lambda: only_record(sim, http)["ended"] is not None, timeout=2)
    entry = only_record(sim, http)
    assert entry["status"] == 200
    assert entry["ended"] - entry["arrived"] >= 0.8 * total


def test_trickled_answer_parses_with_requests(sim: SimulatorThread, http: requests.Session) -> None:
    put_faults(sim, http, trickle_ms=20, trickle_bytes=10)
    started = time.monotonic()
    response = redirect(sim, http)
    assert time.monotonic() - started >= 0.8 * 0.2
    assert response.status_code == 200
    assert response.json() == {}


def test_trickle_stops_when_the_client_goes_away(
    sim: SimulatorThread, http: requests.Session
) -> None:
    put_faults(sim, http, trickle_ms=500, trickle_bytes=100)  # 50 s if nobody hung up
    with raw_redirect(sim) as conn:
        head, _ = read_head(conn)
        assert head.startswith(b"HTTP/1.1 200")
        wait_until(lambda: only_record(sim, http)["status"] == 200, timeout=2)
        assert only_record(sim, http)["ended"] is None
        hung_up = time.time()
    wait_until(lambda: only_record(sim, http)["ended"] is not None, timeout=3)
    entry = only_record(sim, http)
    assert entry["status"] == 200
    assert entry["ended"] - hung_up < 0.4  # noticed before the next byte was due


def test_error_answers_are_not_trickled(sim: SimulatorThread, http: requests.Session) -> None:
    put_faults(sim, http, trickle_ms=200, trickle_bytes=100, fail_next=1)  # 20 s per trickle
    started = time.monotonic()
    assert redirect(sim, http).status_code == 503
    assert redirect(sim, http, key=None).status_code == 401
    assert_400(redirect(sim, http, with_field("PRIORIDADE", "x")), "PRIORIDADE")
    assert time.monotonic() - started < 2


def test_reset_after_read_drops_the_connection_unanswered(
    sim: SimulatorThread, http: requests.Session
) -> None:
    put_faults(sim, http, reset_after_read=True)
    with raw_redirect(sim) as conn:
        try:
            answer = conn.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert answer == b""
    wait_until(lambda: only_record(sim, http)["ended"] is not None, timeout=2)
    entry = only_record(sim, http)
    assert entry["status"] is None
    assert entry["body"] == VENDOR_EXAMPLE
    assert entry["ended"] >= entry["arrived"]


def test_reset_after_read_with_requests(sim: SimulatorThread, http: requests.Session) -> None:
    put_faults(sim, http, reset_after_read=True, fail_next=1)  # the reset comes first
    with pytest.raises(requests.ConnectionError):
        redirect(sim, http)
    assert http.get(f"{sim.url}/_sim/faults", timeout=TIMEOUT).json()["fail_next"] == 1
    [entry] = recorded(sim, http)
    assert entry["status"] is None
    assert entry["ended"] is not None


def test_hang_comes_before_reset_after_read(sim: SimulatorThread, http: requests.Session) -> None:
    put_faults(sim, http, hang=True, reset_after_read=True)
    with pytest.raises(requests.ReadTimeout):
        redirect(sim, http, timeout=0.3)


def test_latency_comes_before_reset_after_read(
    sim: SimulatorThread, http: requests.Session
) -> None:
    put_faults(sim, http, latency_ms=150, reset_after_read=True)
    started = time.monotonic()
    with pytest.raises(requests.ConnectionError):
        redirect(sim, http)
    assert time.monotonic() - started >= 0.15


def test_stop_is_not_blocked_by_a_trickle() -> None:
    sim = SimulatorThread(api_key=API_KEY).start()
    try:
        requests.put(
            f"{sim.url}/_sim/faults", json={"trickle_ms": 100, "trickle_bytes": 500}, timeout=5
        ).raise_for_status()
        with raw_redirect(sim) as conn:
            head, _ = read_head(conn)
            assert head.startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            sim.stop()
            elapsed = time.monotonic() - started
    finally:
        sim.stop()
    assert elapsed < 1.0
