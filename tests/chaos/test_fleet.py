"""SPEC §5 under a fleet: several worker processes, one store, slow and trickling answers.

Each scenario starts real ``pabx-worker run`` processes on a private topology and
checks what the simulator recorded: how many requests each command made, when each
request arrived and ended, and the outcome events the workers published.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.chaos.harness import Rig, size
from tests.checks import most_in_window, overlapping_calls, rate_limit_holds
from tests.kit.processes import WorkerProcess, free_port, start_redis, wait_until
from tests.kit.samples import API_KEY, command_ids
from tests.kit.samples import counted_command as command
from worker.tools.simulator import SimulatorThread

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def fleet(rig: Rig, count: int, *args: str, **env: str) -> list[WorkerProcess]:
    """``count`` worker processes on the rig's settings, consuming; stopped at the end."""
    workers = []
    for _ in range(count):
        worker = WorkerProcess(rig.settings, *args, **env)
        rig.on_close(worker.close)
        workers.append(worker)
    for worker in workers:
        worker.wait_ready()
    return workers


def stop(workers: list[WorkerProcess]) -> None:
    """SIGTERM every worker; each must exit 0."""
    for worker in workers:
        code, _ = worker.terminate(30)
        assert code == 0, worker.log[-3000:]


def targets_env(**targets: dict[str, Any]) -> str:
    """``PABX_WORKER_PABX``: target tables as JSON."""
    return json.dumps(
        {name: {"api_key": API_KEY, "channel_id": 17, **t} for name, t in targets.items()}
    )


def requests_of(rig: Rig, ids: list[str], sim: SimulatorThread | None = None) -> Counter[str]:
    """PABX requests per command (the chaos commands carry their id in ``DADOS``)."""
    mine = set(ids)
    found = sim_records(sim or rig.sim)
    return Counter(str(r["body"]["DADOS"]) for r in found if r["body"]["DADOS"] in mine)


def sim_records(sim: SimulatorThread) -> list[dict[str, Any]]:
    reply = requests.get(f"{sim.url}/_sim/requests", timeout=10)
    reply.raise_for_status()
    return [r for r in reply.json()["requests"] if isinstance(r.get("body"), dict)]


def outcomes(rig: Rig, ids: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Outcome events of ``ids`` received so far, by command id."""
    rig.poll()
    mine = set(ids)
    return {cid: evs for cid, evs in rig.events().items() if cid in mine}


def wait_events(rig: Rig, ids: list[str], count: int, timeout: float = 60) -> bool:
    """Wait until ``count`` outcome events of ``ids`` arrived (copies included)."""
    return wait_until(lambda: sum(len(e) for e in outcomes(rig, ids).values()) >= count, timeout)


def replayed(worker: WorkerProcess) -> int:
    """How many duplicates (stored outcomes published again) a worker logged."""
    entries = (json.loads(line) for line in worker.lines if line.startswith("{"))
    return sum(1 for entry in entries if entry.get("duplicate") is True)


def assert_attempts_match_requests(
    events: dict[str, list[dict[str, Any]]], sent: Counter[str]
) -> None:
    """Every outcome's ``attempts`` equals what the PABX received for that command."""
    wrong = {
        cid: ([e["data"]["attempts"] for e in evs], sent[cid])
        for cid, evs in events.items()
        if any(e["data"]["attempts"] != sent[cid] for e in evs)
    }
    assert wrong == {}


@pytest.fixture(params=["redis", "postgres", "sqlite"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The store URL every worker of a scenario shares: each backend in turn (SQLite: one
    file for every process, as on one host)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.sqlite3'}"
    return str(request.getfixturevalue(f"{request.param}_url"))


# -- live leases ------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_trickled_answer_longer_than_the_lease_is_sent_once(
    make_rig: Callable[..., Rig], shared_store: str
) -> None:
    """Worker A trickles every answer over ~6 s with a 2 s lease; worker B gets the copies."""
    rig = make_rig(
        store_url=shared_store,
        concurrency=8,
        lease_s=2.0,
        pabx_connect_timeout_s=1.0,
        pabx_read_timeout_s=8.0,
    )
    rig.faults(trickle_ms=250, trickle_bytes=24)
    first = fleet(rig, 1)
    ids = command_ids("trickle", 8)  # as many as A takes at once
    commands = [command(cid) for cid in ids]
    rig.publish(commands)
    assert wait_until(lambda: len(sim_records(rig.sim)) == len(ids), 10)
    second = fleet(rig, 1)  # A has no room left: B takes every copy
    rig.publish(commands)
    assert rig.wait_outcomes(ids, timeout=90)
    assert wait_events(rig, ids, 2 * len(ids))
    stop(first + second)
    sent = requests_of(rig, ids)
    events = outcomes(rig, ids)
    assert {cid: n for cid, n in sent.items() if n != 1} == {} and len(sent) == len(ids)
    assert {e["data"]["status"] for evs in events.values() for e in evs} == {"accepted"}
    assert all(len({e["id"] for e in evs}) == 1 for evs in events.values())
    assert_attempts_match_requests(events, sent)
    durations = [r["ended"] - r["arrived"] for r in sim_records(rig.sim)]
    assert min(durations) > 4.0  # each answer really outlived the lease, twice over
    assert replayed(second[0]) > 0  # B did meet the copies


@pytest.mark.timeout(180)
def test_rate_limit_wait_longer_than_the_lease_is_sent_once(
    make_rig: Callable[..., Rig], redis_url: str
) -> None:
    """2 requests/s for the fleet, lease 2 s: A's last command waits ~10 s; B gets the copies."""
    count = 20
    rig = make_rig(store_url=redis_url, concurrency=count, lease_s=2.0)
    name = f"slow{uuid.uuid4().hex[:6]}"  # its own slot schedule in the shared Redis
    env = {"PABX_WORKER_PABX": targets_env(**{name: {"url": rig.sim.url, "rate_limit": 2}})}
    first = fleet(rig, 1, **env)
    ids = command_ids("paced", count)
    commands = [command(cid, pabx=name) for cid in ids]
    rig.publish(commands)
    assert wait_until(lambda: len(sim_records(rig.sim)) >= 2, 10)
    second = fleet(rig, 1, **env)
    rig.publish(commands)
    assert rig.wait_outcomes(ids, timeout=90)
    assert wait_events(rig, ids, 2 * count)
    stop(first + second)
    sent = requests_of(rig, ids)
    assert {cid: n for cid, n in sent.items() if n != 1} == {} and len(sent) == len(ids)
    events = outcomes(rig, ids)
    assert {e["data"]["status"] for evs in events.values() for e in evs} == {"accepted"}
    assert_attempts_match_requests(events, sent)
    arrivals = sorted(r["arrived"] for r in sim_records(rig.sim))
    assert arrivals[-1] - arrivals[0] > 8.0  # paced, so the later ones waited past the lease
    assert rate_limit_holds(arrivals, 2)
    assert replayed(second[0]) > 0


# -- ambiguous failures -------------------------------------------------------------------

AMBIGUOUS = {
    "read timeout": {"hang": True},
    "reset after send": {"reset_after_read": True},
    "500": {"error_rate": 1.0, "fail_status": 500},
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", list(AMBIGUOUS))
def test_ambiguous_failure_is_sent_once_and_parked(
    make_rig: Callable[..., Rig], redis_url: str, fault: str
) -> None:
    rig = make_rig(store_url=redis_url, pabx_read_timeout_s=0.5)
    rig.faults(**AMBIGUOUS[fault])
    workers = fleet(rig, 2)
    ids = command_ids("ambiguous", 6)
    rig.publish(command(cid) for cid in ids)
    assert rig.wait_outcomes(ids, timeout=60)
    rig.settle(1.0)
    stop(workers)
    sent = requests_of(rig, ids)
    assert sent == Counter(dict.fromkeys(ids, 1))
    events = outcomes(rig, ids)
    codes = {
        (e["data"]["status"], e["data"]["error"]["code"]) for evs in events.values() for e in evs
    }
    assert codes == {("failed", "pabx_outcome_unknown")}
    assert_attempts_match_requests(events, sent)
    assert rig.queue_length(rig.settings.parked_queue) == len(ids)


@pytest.mark.timeout(120)
def test_retry_ambiguous_resends_and_counts_each_resend(
    make_rig: Callable[..., Rig], redis_url: str
) -> None:
    rig = make_rig(store_url=redis_url, pabx_read_timeout_s=0.5, retry_ambiguous=True)
    workers = fleet(rig, 2)
    ids = command_ids("resent", 4)
    rig.faults(fail_next=2 * len(ids), fail_status=500)
    rig.publish(command(cid) for cid in ids)
    assert rig.wait_outcomes(ids, timeout=60)
    rig.settle(1.0)
    stop(workers)
    sent = requests_of(rig, ids)
    assert sum(sent.values()) == 3 * len(ids) and min(sent.values()) >= 1
    events = outcomes(rig, ids)
    assert {e["data"]["status"] for evs in events.values() for e in evs} == {"accepted"}
    assert_attempts_match_requests(events, sent)


# -- order per call across the fleet ------------------------------------------------------


@pytest.mark.timeout(240)
def test_order_per_call_across_three_workers(
    make_rig: Callable[..., Rig], shared_store: str
) -> None:
    """50 calls of 5 commands, 10 ms apart, PABX latency 5 to 50 ms, three workers."""
    rig = make_rig(store_url=shared_store, concurrency=16)
    rig.faults(latency_ms=5, latency_max_ms=50)
    workers = fleet(rig, 3)
    run = uuid.uuid4().hex[:8]
    calls = [f"order-{run}-{n:02d}" for n in range(size(50, 50))]
    ids: list[str] = []
    for step in range(5):
        for call in calls:
            cid = f"{call}-{step}"
            ids.append(cid)
            body = command(cid, redirect={"ID_CHAMADA": call, "DISPOSITIVO_DESTINO": f"90{step}"})
            rig.publish([body])
            time.sleep(0.01)
    assert rig.wait_outcomes(ids, timeout=150)
    rig.settle(1.0)
    stop(workers)
    records = [r for r in sim_records(rig.sim) if r["body"]["ID_CHAMADA"] in set(calls)]
    assert all(r["status"] == 200 for r in records)
    assert overlapping_calls(records) == []
    applied: dict[str, list[int]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r["arrived"]):
        applied[record["body"]["ID_CHAMADA"]].append(int(record["body"]["DISPOSITIVO_DESTINO"][2:]))
    out_of_order = {c: steps for c, steps in applied.items() if steps != sorted(set(steps))}
    assert out_of_order == {}
    assert {c: steps[-1] for c, steps in applied.items()} == dict.fromkeys(calls, 4)
    sent = {f"{r['body']['ID_CHAMADA']}-{r['body']['DISPOSITIVO_DESTINO'][2:]}" for r in records}
    events = outcomes(rig, ids)
    assert all(len({e["id"] for e in evs}) == 1 for evs in events.values())
    for cid in ids:
        data = events[cid][0]["data"]
        if cid in sent:
            assert data["status"] == "accepted", data
        else:
            assert (data["status"], data["error"]["code"]) == ("rejected", "superseded"), data
    assert rig.queue_length(rig.settings.parked_queue) == 0  # superseded is not parked
    superseded = len(ids) - len(sent)
    print(f"\norder: {len(sent)} sent, {superseded} superseded, 0 overlapping, 0 out of order")


@pytest.mark.timeout(120)
def test_a_call_stays_held_after_an_unanswered_request(
    make_rig: Callable[..., Rig], shared_store: str
) -> None:
    """Two workers; each call's first request hangs past the read timeout, and a newer
    command for the call is already waiting: it goes out only a read timeout after the
    worker gave up, never while the PABX may still be working on the first."""
    rig = make_rig(store_url=shared_store, pabx_read_timeout_s=0.5)
    workers = fleet(rig, 2)
    run = uuid.uuid4().hex[:8]
    calls = [f"held-{run}-{n}" for n in range(4)]
    rig.faults(hang=True)
    first = [f"{call}-first" for call in calls]
    rig.publish(command(f"{call}-first", redirect={"ID_CHAMADA": call}) for call in calls)
    assert wait_until(lambda: len(sim_records(rig.sim)) >= len(calls), 30)
    newer = [f"{call}-newer" for call in calls]
    rig.publish(command(f"{call}-newer", redirect={"ID_CHAMADA": call}) for call in calls)
    time.sleep(0.2)
    rig.faults(hang=False)  # the first requests hang on; the newer ones will be answered
    assert rig.wait_outcomes(first + newer, timeout=60)
    rig.settle(1.0)
    stop(workers)
    records = [r for r in sim_records(rig.sim) if r["body"]["ID_CHAMADA"] in set(calls)]
    assert overlapping_calls(records) == []
    for call in calls:
        hung, answered = sorted(
            (r for r in records if r["body"]["ID_CHAMADA"] == call), key=lambda r: r["arrived"]
        )
        assert (hung["status"], answered["status"]) == (None, 200)
        # Held for the read timeout (0.5 s) after the worker gave up on the first one.
        assert answered["arrived"] - hung["ended"] >= 0.3, call
    events = outcomes(rig, first + newer)
    for cid in first:
        data = events[cid][0]["data"]
        assert (data["status"], data["error"]["code"]) == ("failed", "pabx_outcome_unknown")
    assert {events[cid][0]["data"]["status"] for cid in newer} == {"accepted"}


@pytest.mark.timeout(180)
def test_commands_arriving_out_of_issue_order_are_superseded(
    make_rig: Callable[..., Rig], redis_url: str
) -> None:
    """20 calls, 5 commands each, published back to back in a shuffled order."""
    rig = make_rig(store_url=redis_url, concurrency=16)
    rig.faults(latency_ms=5, latency_max_ms=50)
    workers = fleet(rig, 3)
    run = uuid.uuid4().hex[:8]
    base = datetime.now(UTC)
    calls = [f"shuffled-{run}-{n:02d}" for n in range(20)]
    steps = [3, 0, 4, 1, 2]  # the same shuffle for every call: the newest comes third
    ids = [f"{call}-{step}" for call in calls for step in steps]
    for step in steps:
        for call in calls:
            issued = (base + timedelta(milliseconds=step)).isoformat()
            redirect = {"ID_CHAMADA": call, "DISPOSITIVO_DESTINO": f"90{step}"}
            rig.publish([command(f"{call}-{step}", issued_at=issued, redirect=redirect)])
    assert rig.wait_outcomes(ids, timeout=120)
    rig.settle(1.0)
    stop(workers)
    records = [r for r in sim_records(rig.sim) if r["body"]["ID_CHAMADA"] in set(calls)]
    assert overlapping_calls(records) == []
    applied: dict[str, list[int]] = defaultdict(list)
    for record in sorted(records, key=lambda r: r["arrived"]):
        applied[record["body"]["ID_CHAMADA"]].append(int(record["body"]["DISPOSITIVO_DESTINO"][2:]))
    assert {c: s for c, s in applied.items() if s != sorted(set(s))} == {}
    assert {c: s[-1] for c, s in applied.items()} == dict.fromkeys(calls, 4)
    events = outcomes(rig, ids)
    superseded = [
        cid
        for cid, evs in events.items()
        if evs[0]["data"]["error"] and evs[0]["data"]["error"]["code"] == "superseded"
    ]
    sent = {f"{r['body']['ID_CHAMADA']}-{r['body']['DISPOSITIVO_DESTINO'][2:]}" for r in records}
    assert set(superseded) == set(ids) - sent and superseded  # the older ones lost out
    for cid in superseded:
        newer = events[cid][0]["data"]["error"]["message"].rsplit(" ", 1)[-1]
        assert newer.startswith(cid.rsplit("-", 1)[0]) and newer > cid
    assert rig.queue_length(rig.settings.parked_queue) == 0
    print(f"\nshuffled: {len(sent)} sent, {len(superseded)} superseded")


# -- fleet-wide rate limit ----------------------------------------------------------------


@pytest.mark.timeout(240)
def test_rate_limit_holds_for_three_workers(
    make_rig: Callable[..., Rig], shared_store: str
) -> None:
    rate, count = 20, size(600, 600)
    rig = make_rig(store_url=shared_store, concurrency=32)
    name = f"fleet{uuid.uuid4().hex[:6]}"
    workers = fleet(
        rig, 3, PABX_WORKER_PABX=targets_env(**{name: {"url": rig.sim.url, "rate_limit": rate}})
    )
    ids = command_ids("fleet-rate", count)
    rig.publish(command(cid, pabx=name) for cid in ids)
    assert rig.wait_outcomes(ids, timeout=count / rate + 90)
    stop(workers)
    arrivals = [r["arrived"] for r in sim_records(rig.sim)]
    assert len(arrivals) == count
    busiest = most_in_window(arrivals)
    span = max(arrivals) - min(arrivals)
    print(f"\nfleet rate limit: {count} requests in {span:.1f} s, busiest 5 s window {busiest}")
    assert rate_limit_holds(arrivals, rate)
    assert span >= (count - rate) / rate * 0.9  # it was paced, not just slow


# -- a breaker per dependency -------------------------------------------------------------


@pytest.mark.timeout(180)
def test_one_target_down_leaves_the_other_at_its_rate(
    make_rig: Callable[..., Rig], redis_url: str
) -> None:
    outage_s, rate = 10.0, 20
    rig = make_rig(store_url=redis_url, circuit_threshold=3, circuit_reset_s=1.0)
    with SimulatorThread(api_key=API_KEY) as other:
        targets = targets_env(a=dict(url=rig.sim.url), b=dict(url=other.url))
        workers = fleet(rig, 2, PABX_WORKER_PABX=targets)
        a_ids, b_ids = command_ids("down-a", 60), command_ids("up-b", int(rate * 3 * outage_s))
        started = time.time()
        down_from, down_to = started + outage_s, started + 2 * outage_s
        a_sent: list[str] = []
        phase = "up"
        for n, cid in enumerate(b_ids):
            rig.publish([command(cid, pabx="b")])
            if n % 10 == 0 and len(a_sent) < len(a_ids):
                a_sent.append(a_ids[len(a_sent)])
                rig.publish([command(a_sent[-1], pabx="a")])
            now = time.time()
            if phase == "up" and now >= down_from:
                rig.faults(error_rate=1.0, fail_status=503)
                phase = "down"
            elif phase == "down" and now >= down_to:
                rig.faults()
                phase = "back"
            time.sleep(max(started + (n + 1) / rate - time.time(), 0))
        assert rig.wait_outcomes(a_sent + b_ids, timeout=120)
        stop(workers)
        b_times = [r["arrived"] for r in sim_records(other)]
    before = sum(started + 1 <= t < down_from for t in b_times) / (outage_s - 1)
    during = sum(down_from + 1 <= t < down_to for t in b_times) / (outage_s - 1)
    print(f"\ntarget b: {before:.1f}/s before target a went down, {during:.1f}/s during")
    assert during >= 0.8 * before and before >= 0.8 * rate
    b_events = outcomes(rig, b_ids)
    assert {evs[0]["data"]["status"] for evs in b_events.values()} == {"accepted"}


# -- the store goes away ------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Redis of this test's own, so it can be frozen (SIGSTOP) without touching the machine's."""
    port = free_port()
    proc = start_redis(tmp_path, port)
    url = f"redis://127.0.0.1:{port}/0"
    yield url, proc
    proc.send_signal(signal.SIGCONT)
    proc.terminate()
    proc.wait(10)


def _ready(port: int) -> bool:
    """What a probe with a 2 s timeout sees: a late answer is a failed probe."""
    try:
        return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).ok
    except requests.Timeout:
        return False


def _metric(port: int, name: str) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


@pytest.mark.timeout(180)
def test_store_outage_pauses_instead_of_cycling_commands(
    make_rig: Callable[..., Rig], private_redis: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, redis_proc = private_redis
    rig = make_rig(store_url=url, concurrency=8)
    rig.faults(latency_ms=50)
    ports = [free_port(), free_port()]
    workers = [
        *fleet(rig, 1, PABX_WORKER_HTTP_PORT=str(ports[0]), PABX_WORKER_HTTP_HOST="127.0.0.1"),
        *fleet(rig, 1, PABX_WORKER_HTTP_PORT=str(ports[1]), PABX_WORKER_HTTP_HOST="127.0.0.1"),
    ]
    ids = command_ids("store-down", 200)
    rig.publish(command(cid) for cid in ids[:100])
    assert wait_until(lambda: len(rig.finished() & set(ids)) >= 20, 30)
    redis_proc.send_signal(signal.SIGSTOP)
    frozen = time.monotonic()
    rig.publish(command(cid) for cid in ids[100:])
    not_ready = set()
    while time.monotonic() - frozen < 10.0:
        for port in ports:
            if not _ready(port):
                not_ready.add(port)
        time.sleep(0.2)
    redis_proc.send_signal(signal.SIGCONT)
    assert rig.wait_outcomes(ids, timeout=90)
    retries = sum(_metric(port, "pabx_worker_retries_total") for port in ports)
    ready_again = all(
        wait_until(lambda p=port: requests.get(f"http://127.0.0.1:{p}/readyz", timeout=5).ok, 15)
        for port in ports
    )
    stop(workers)
    print(f"\nstore outage 10 s: {retries:.0f} retry publications, not ready: {sorted(not_ready)}")
    assert retries < 10
    assert not_ready == set(ports) and ready_again
    sent = requests_of(rig, ids)
    assert sent == Counter(dict.fromkeys(ids, 1))
    events = outcomes(rig, ids)
    assert {evs[0]["data"]["status"] for evs in events.values()} == {"accepted"}
