"""``pabx-worker send``: one command, from a file or stdin, with its outcome."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.kit.events import Peer
from tests.kit.processes import CLI, RunningWorker, env_for, set_faults, sim_requests
from tests.kit.samples import command
from worker.contract.settings import Settings
from worker.tools.simulator import SimulatorThread

pytestmark = pytest.mark.integration


def send(
    settings: Settings, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "send", *args],
        input=stdin,
        env=env_for(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


def outcome_of(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_stdin_with_wait_prints_the_accepted_outcome(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread
) -> None:
    cmd = command()
    done = send(settings, "-", "--wait", "30", stdin=json.dumps(cmd))
    assert done.returncode == 0, done.stderr
    event = outcome_of(done)
    assert event["type"] == "pabx.redirect.accepted"
    assert event["data"]["command_id"] == cmd["command_id"]
    assert f"published {cmd['command_id']}" in done.stderr
    assert len(sim_requests(sim)) == 1


def test_stdin_is_the_default(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread
) -> None:
    cmd = command()
    done = send(settings, "--wait", "30", stdin=json.dumps(cmd))
    assert done.returncode == 0, done.stderr
    assert outcome_of(done)["data"]["status"] == "accepted"


def test_a_rejected_outcome_exits_1_and_is_printed(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread, tmp_path: Path
) -> None:
    set_faults(sim, fail_next=1, fail_status=400)
    path = tmp_path / "cmd.json"
    path.write_text(json.dumps(command()))
    done = send(settings, str(path), "--wait", "30")
    assert done.returncode == 1
    event = outcome_of(done)
    assert event["data"]["status"] == "rejected"
    assert event["data"]["error"]["code"] == "pabx_bad_request"


def test_a_failed_outcome_exits_1(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread
) -> None:
    set_faults(sim, fail_next=1, fail_status=403)
    done = send(settings, "-", "--wait", "30", stdin=json.dumps(command()))
    assert done.returncode == 1
    assert outcome_of(done)["data"]["error"]["code"] == "pabx_forbidden"


def test_sending_the_same_command_again_is_a_duplicate_not_a_second_call(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread
) -> None:
    body = json.dumps(command())
    first = send(settings, "-", "--wait", "30", stdin=body)
    again = send(settings, "-", "--wait", "30", stdin=body)
    assert (first.returncode, again.returncode) == (0, 0)
    assert outcome_of(again)["data"]["duplicate"] is True
    assert outcome_of(again)["id"] == outcome_of(first)["id"]
    assert len(sim_requests(sim)) == 1


def test_a_command_without_id_gets_the_message_id(
    settings: Settings, peer: Peer, worker: RunningWorker
) -> None:
    cmd = command()
    del cmd["command_id"]
    done = send(settings, "-", "--wait", "30", stdin=json.dumps(cmd))
    assert done.returncode == 0, done.stderr
    published = done.stderr.split("published ", 1)[1].split()[0]
    assert outcome_of(done)["data"]["command_id"] == published


def test_without_wait_the_command_is_queued_with_confirms(
    settings: Settings, peer: Peer, tmp_path: Path
) -> None:
    cmd = command()
    path = tmp_path / "cmd.json"
    path.write_text(json.dumps(cmd))
    done = send(settings, str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    [(props, body)] = peer.drain(settings.command_queue, 1)
    assert body == path.read_bytes()  # as written, byte for byte
    assert props.message_id == props.correlation_id == cmd["command_id"]
    assert props.content_type == "application/json" and props.delivery_mode == 2


def test_no_outcome_within_wait_exits_1(settings: Settings, peer: Peer) -> None:
    done = send(settings, "-", "--wait", "1", stdin=json.dumps(command()))
    assert done.returncode == 1 and "no outcome" in done.stderr
    assert peer.queue_length(settings.command_queue) == 1


def test_no_validate_publishes_anything_and_the_worker_rejects_it(
    settings: Settings, peer: Peer, worker: RunningWorker, sim: SimulatorThread
) -> None:
    done = send(settings, "-", "--no-validate", "--wait", "30", stdin="this is not json")
    assert done.returncode == 1
    event = outcome_of(done)
    assert event["data"]["status"] == "rejected"
    assert event["data"]["error"]["code"] == "invalid_command"
    assert sim_requests(sim) == []


def test_invalid_input_is_a_usage_error(settings: Settings, peer: Peer, tmp_path: Path) -> None:
    missing = send(settings, str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    typo = send(settings, "-", stdin=json.dumps({**command(), "priority": 1}))
    assert typo.returncode == 2 and "priority" in typo.stderr
    assert peer.queue_length(settings.command_queue) == 0
