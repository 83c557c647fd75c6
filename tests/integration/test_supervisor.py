"""``run --processes 2`` on one SQLite file: a child killed mid-stream is restarted, no command is
lost, none is accepted twice by the PABX unless it was answered but not yet recorded when
the child died (README), the group's endpoint covers both, SIGTERM stops all; a supervisor
killed outright leaves no child behind."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.kit.events import Peer
from tests.kit.processes import WorkerProcess, free_port, set_faults, sim_requests, wait_until
from tests.kit.samples import command_ids, counted_command
from tests.kit.topology import private_settings
from worker.contract.settings import Settings
from worker.tools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

COMMANDS = 300


@pytest.fixture
def settings(broker_url: str, sim: SimulatorThread, tmp_path: Path) -> Settings:
    return private_settings(
        broker_url,
        sim.url,
        store_url=f"sqlite:///{tmp_path / 'store.sqlite3'}",
        concurrency=4,
        lease_s=4.0,  # a dead child's commands are taken over soon
        http_host="127.0.0.1",
        http_port=free_port(),
    )


@pytest.fixture
def group(settings: Settings, peer: Peer) -> Iterator[WorkerProcess]:
    running = WorkerProcess(settings, "--processes", "2")
    yield running
    running.close()


@pytest.mark.timeout(240)
def test_a_killed_child_is_restarted_and_no_command_is_lost_or_sent_twice(
    group: WorkerProcess, settings: Settings, peer: Peer, sim: SimulatorThread
) -> None:
    base = f"http://127.0.0.1:{settings.http_port}"
    assert wait_until(lambda: _status(f"{base}/readyz") == 200, 30), group.log[-3000:]
    first = _children(group.proc.pid)
    assert len(first) == 2, group.log[-3000:]

    # At least 100 ms a request: the simulator does not count one whose client died meanwhile.
    set_faults(sim, latency_ms=100, latency_max_ms=200)
    ids = command_ids("sup", COMMANDS)
    for command_id in ids:
        peer.publish(counted_command(command_id))
    peer.events(COMMANDS // 4, timeout=60)
    victim = first[0]
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.5)  # answers and events already on the wire land
    # What may be sent again (README: a kill -9 between sending and recording): commands
    # the PABX accepted that had no outcome yet.
    answered = {r["body"]["DADOS"] for r in sim_requests(sim) if r["status"] == 200}
    in_flight = answered - {event["data"]["command_id"] for _, event in peer.seen}
    assert wait_until(lambda: _restarted(group.proc.pid, first), 30), group.log[-3000:]

    events = _outcomes(peer, set(ids), timeout=150)
    by_command: dict[str, set[str]] = {}
    for _, event in events:
        by_command.setdefault(event["data"]["command_id"], set()).add(event["id"])
    assert set(by_command) == set(ids)  # no command lost
    assert all(len(event_ids) == 1 for event_ids in by_command.values())  # one outcome each
    assert {event["data"]["status"] for _, event in events} == {"accepted"}
    accepted = Counter(r["body"]["DADOS"] for r in sim_requests(sim) if r["status"] == 200)
    assert set(accepted) == set(ids)
    assert {cid for cid, times in accepted.items() if times > 1} <= in_flight
    assert max(accepted.values()) <= 2

    assert wait_until(lambda: _status(f"{base}/readyz") == 200, 30)
    families = {f.name: f for f in text_string_to_metric_families(_get(f"{base}/metrics"))}
    assert families["pabx_worker_process_restarts"].samples[0].value == 1.0
    assert families["pabx_worker_processes"].samples[0].value == 2.0
    ready = {s.labels["process"]: s.value for s in families["pabx_worker_ready"].samples}
    assert ready == {"0": 1.0, "1": 1.0}
    finished = {s.labels["process"] for s in families["pabx_worker_commands"].samples}
    assert finished >= {"0", "1"}
    assert any(f"(pid {victim}) was killed by SIGKILL" in m for m in group.messages())

    everyone = set(first) | set(_children(group.proc.pid))
    code, _ = group.terminate(timeout=40)
    assert code == 0, group.log[-3000:]
    assert not [pid for pid in everyone if Path(f"/proc/{pid}").exists()]


@pytest.mark.timeout(120)
def test_a_supervisor_killed_outright_leaves_no_child_behind(
    group: WorkerProcess, settings: Settings
) -> None:
    base = f"http://127.0.0.1:{settings.http_port}"
    assert wait_until(lambda: _status(f"{base}/readyz") == 200, 30), group.log[-3000:]
    children = _children(group.proc.pid)
    assert len(children) == 2, group.log[-3000:]
    os.kill(group.proc.pid, signal.SIGKILL)
    group.proc.wait(10)
    # Each child drains and stops as on SIGTERM (Linux: the kernel tells it its parent died).
    assert wait_until(lambda: not [pid for pid in children if _alive(pid)], 40), children
    stopped = lambda: sum(m == "stopped" for m in group.messages())  # noqa: E731
    assert wait_until(lambda: stopped() == 2, 10), group.log[-3000:]


def _alive(pid: int) -> bool:
    """Running: there and not a zombie waiting for a parent to reap it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] not in ("Z", "X")


def _status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return None


def _get(url: str) -> str:
    reply = requests.get(url, timeout=10)
    reply.raise_for_status()
    return reply.text


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc/*/stat)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if fields[1] == str(pid):
            found.append(int(stat.parent.name))
    return sorted(found)


def _restarted(pid: int, first: list[int]) -> bool:
    now = _children(pid)
    return len(now) == 2 and len(set(now) - set(first)) == 1


def _outcomes(peer: Peer, ids: set[str], timeout: float) -> list[tuple[Any, dict[str, Any]]]:
    """Outcome events until every one of ``ids`` has one, and any late ones after that."""
    deadline = time.monotonic() + timeout
    peer.events(len(ids), timeout=timeout)
    while not ids <= {event["data"]["command_id"] for _, event in peer.seen}:
        if time.monotonic() > deadline:
            break
        peer.events(len(peer.seen) + 1, timeout=1)
    return peer.events(len(peer.seen) + 1, timeout=2)
