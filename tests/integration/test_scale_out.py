"""Three worker processes on one queue sharing a Redis or PostgreSQL store: no double sends."""

from __future__ import annotations

import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.events import Peer
from tests.kit.processes import CLI, env_for, set_faults, sim_requests
from tests.kit.samples import API_KEY, command
from worker.contract.settings import Settings
from worker.tools.simulator import SimulatorThread

pytestmark = pytest.mark.integration

COMMANDS = 60
COPIES = 3


@pytest.fixture(params=["redis", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str:
    name = "redis_url" if request.param == "redis" else "postgres_url"
    return str(request.getfixturevalue(name))


@pytest.fixture
def workers(
    settings: Settings, peer: Peer, sim: SimulatorThread, store_url: str, tmp_path: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    env = env_for(
        settings,
        PABX_WORKER_PABX_URL=sim.url,
        PABX_WORKER_PABX_API_KEY=API_KEY,
        PABX_WORKER_PABX_CHANNEL_ID="17",
        PABX_WORKER_HTTP_PORT="0",
        PABX_WORKER_STORE_URL=store_url,
        PABX_WORKER_CONCURRENCY="8",
        PABX_WORKER_LOG_LEVEL="WARNING",
    )
    logs = [tmp_path / f"worker-{i}.log" for i in range(3)]
    procs = []
    for log in logs:
        with log.open("wb") as sink:
            procs.append(subprocess.Popen([*CLI, "run"], env=env, stderr=sink))
    yield procs
    for proc in procs:
        proc.terminate()
    codes = [proc.wait(30) for proc in procs]
    assert codes == [0, 0, 0], [log.read_text()[-2000:] for log in logs]


@pytest.mark.timeout(120)
def test_duplicates_across_three_workers_reach_the_pabx_once(
    workers: list[subprocess.Popen[bytes]], peer: Peer, sim: SimulatorThread
) -> None:
    set_faults(sim, latency_ms=20)
    run = uuid.uuid4().hex[:8]
    commands = [
        command(f"scale-{run}-{i}", redirect={"DADOS": f"scale-{run}-{i}"}) for i in range(COMMANDS)
    ]
    for cmd in commands:  # copies back to back, so different workers take them concurrently
        for _ in range(COPIES):
            peer.publish(cmd)
    events = peer.events(COMMANDS * COPIES, timeout=90)
    assert len(events) == COMMANDS * COPIES
    by_command = Counter(e["data"]["command_id"] for _, e in events)
    assert set(by_command.values()) == {COPIES}
    ids = {e["data"]["command_id"]: set() for _, e in events}
    for _, e in events:
        ids[e["data"]["command_id"]].add(e["id"])
    assert all(len(v) == 1 for v in ids.values())  # one event id per command
    assert {e["data"]["status"] for _, e in events} == {"accepted"}
    sent = Counter(r["body"]["DADOS"] for r in sim_requests(sim))
    assert len(sent) == COMMANDS and set(sent.values()) == {1}
