"""The command line as people and operators use it: real processes, real broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.kit.events import Peer
from tests.kit.processes import CLI, env_for, sim_requests
from tests.kit.samples import API_KEY, command
from worker.contract.settings import Settings
from worker.tools.simulator import SimulatorThread

pytestmark = pytest.mark.integration


def test_run_consumes_and_stops_cleanly_on_sigterm(
    settings: Settings, peer: Peer, sim: SimulatorThread, tmp_path: Path
) -> None:
    env = env_for(
        settings,
        PABX_WORKER_PABX_URL=sim.url,
        PABX_WORKER_PABX_API_KEY=API_KEY,
        PABX_WORKER_PABX_CHANNEL_ID="17",
        PABX_WORKER_HTTP_PORT="0",
        PABX_WORKER_STORE_URL=f"sqlite:///{tmp_path / 'store.sqlite3'}",
    )
    proc = subprocess.Popen([*CLI, "run"], env=env, stderr=subprocess.PIPE, text=True)
    cmd = command()
    try:
        peer.publish(cmd)
        _, event = peer.events(1, timeout=30)[0]
        assert event["data"]["status"] == "accepted"
        proc.send_signal(signal.SIGTERM)
        _, logs = proc.communicate(timeout=30)
        assert proc.returncode == 0, logs
    finally:
        proc.kill()
        if proc.stderr:
            proc.stderr.close()
    assert API_KEY not in logs and "4567" not in logs
    entries = [json.loads(line) for line in logs.splitlines()]
    assert any(e.get("message") == "stopped" for e in entries)
    [handled] = [e for e in entries if e.get("message") == "command accepted"]
    assert handled["command_id"] == cmd["command_id"]
    assert handled["ID_CHAMADA"] == cmd["redirect"]["ID_CHAMADA"]
    assert handled["attempt"] == 1 and handled["duration_ms"] >= 0


def test_run_reads_its_secrets_from_a_file_and_a_credential(
    settings: Settings, peer: Peer, sim: SimulatorThread, tmp_path: Path
) -> None:
    """The API key from ``PABX_WORKER_PABX_API_KEY_FILE``, the broker URL from systemd."""
    key_file = tmp_path / "pabx-api-key"
    key_file.write_text(API_KEY + "\n")
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "PABX_WORKER_AMQP_URL").write_text(settings.amqp_url + "\n")
    env = env_for(
        settings,
        PABX_WORKER_PABX_URL=sim.url,
        PABX_WORKER_PABX_API_KEY_FILE=str(key_file),
        PABX_WORKER_PABX_CHANNEL_ID="17",
        PABX_WORKER_HTTP_PORT="0",
        PABX_WORKER_STORE_URL=f"sqlite:///{tmp_path / 'store.sqlite3'}",
        CREDENTIALS_DIRECTORY=str(credentials),
    )
    del env["PABX_WORKER_AMQP_URL"]
    proc = subprocess.Popen([*CLI, "run"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        peer.publish(command())
        _, event = peer.events(1, timeout=30)[0]
        assert event["data"]["status"] == "accepted"  # the simulator checked the key
        proc.send_signal(signal.SIGTERM)
        _, logs = proc.communicate(timeout=30)
        assert proc.returncode == 0, logs
    finally:
        proc.kill()
        if proc.stderr:
            proc.stderr.close()
    assert API_KEY not in logs
    assert sim_requests(sim)[0]["headers"]["x-api-key"] == API_KEY


def test_send_wait_prints_the_outcome(
    settings: Settings, peer: Peer, sim: SimulatorThread, tmp_path: Path
) -> None:
    from tests.kit.processes import RunningWorker

    running = RunningWorker(settings)
    try:
        cmd = command()
        path = tmp_path / "cmd.json"
        path.write_text(json.dumps(cmd))
        done = subprocess.run(
            [*CLI, "send", str(path), "--wait", "20"],
            env=env_for(settings),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        running.stop()
    assert done.returncode == 0, done.stderr
    outcome: dict[str, Any] = json.loads(done.stdout)
    assert outcome["data"]["command_id"] == cmd["command_id"]
    assert outcome["data"]["status"] == "accepted"
    assert len(sim_requests(sim)) == 1


def test_send_json_names_the_command_and_its_outcome(
    settings: Settings, peer: Peer, sim: SimulatorThread, tmp_path: Path
) -> None:
    from tests.kit.processes import RunningWorker

    path = tmp_path / "cmd.json"

    def send(cmd: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
        path.write_text(json.dumps(cmd))
        return subprocess.run(
            [*CLI, "send", str(path), "--json", *args],
            env=env_for(settings),
            capture_output=True,
            text=True,
            timeout=60,
        )

    queued = command()
    done = send(queued)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "command_id": queued["command_id"],
        "published": True,
        "outcome": None,
    }
    [(_, body)] = peer.drain(settings.command_queue, 1)
    assert json.loads(body) == queued
    running = RunningWorker(settings)
    try:
        awaited = command()
        done = send(awaited, "--wait", "20")
    finally:
        running.stop()
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["command_id"] == awaited["command_id"] and printed["published"] is True
    assert printed["outcome"]["data"]["status"] == "accepted"


def test_send_rejects_an_invalid_command_before_publishing(settings: Settings, peer: Peer) -> None:
    bad = json.dumps(command(redirect={"PRIORIDADE": 30}))
    done = subprocess.run(
        [*CLI, "send", "-"],
        input=bad,
        env=env_for(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "PRIORIDADE" in done.stderr
    assert "Traceback" not in done.stderr
    assert peer.queue_length(settings.command_queue) == 0


def test_demo_shows_outcomes_and_exits_0(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PABX_WORKER_")}
    done = subprocess.run(
        [*CLI, "demo"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for status in ("accepted", "rejected", "expired", "failed"):
        assert status in done.stdout


def test_no_broker_is_a_clear_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PABX_WORKER_")}
    env["PABX_WORKER_AMQP_URL"] = "amqp://guest:guest@127.0.0.1:1/%2F"
    done = subprocess.run(
        [*CLI, "topology", "declare"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "PABX_WORKER_AMQP_URL" in done.stderr and "Traceback" not in done.stderr


def test_simulate_serves_until_sigterm() -> None:
    import socket

    import requests

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [*CLI, "simulate", "--port", str(port), "--api-key", "k"], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert requests.get(f"http://127.0.0.1:{port}/_sim/health", timeout=1).ok
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        if proc.stderr:
            proc.stderr.close()
