"""``pabx-worker parked list|show|replay|discard|export`` on the real broker."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pika
import pytest
from pydantic import SecretStr

from tests.kit.events import Peer
from tests.kit.processes import CLI, RunningWorker, env_for, sim_requests
from tests.kit.samples import command
from worker.contract.settings import Settings
from worker.produce.parked import (
    ParkedFilter,
    ParkedMessage,
    clean_headers,
    masked_text,
    parse_duration,
    pretty_body,
)
from worker.tools.simulator import SimulatorThread

pytestmark = pytest.mark.integration


def parked_cli(
    settings: Settings, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "parked", *args],
        env=env_for(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def park(
    peer: Peer,
    body: dict[str, Any] | bytes,
    *,
    code: str = "pabx_unreachable",
    status: str = "failed",
    age: timedelta = timedelta(0),
    headers: dict[str, Any] | None = None,
    **props: Any,
) -> None:
    """A parked copy as the worker writes it (worker.consume.fate, for a Finish that parks)."""
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    parked_at = datetime.now(UTC) - age
    all_headers = {
        **(headers or {}),
        "x-pabx-error-code": code,
        "x-pabx-error": f"because {code}",
        "x-pabx-attempts": 3,
        "x-pabx-retries": 2,
        "x-pabx-status": status,
        "x-pabx-parked-at": parked_at.isoformat(timespec="milliseconds"),
    }
    props.setdefault("content_type", "application/json")
    peer.channel.basic_publish(
        peer.settings.dead_exchange,
        f"redirect.{code}",
        raw,
        pika.BasicProperties(headers=all_headers, delivery_mode=2, **props),
        mandatory=True,
    )


def listed(settings: Settings, *args: str) -> list[dict[str, Any]]:
    done = parked_cli(settings, "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    result: list[dict[str, Any]] = json.loads(done.stdout)
    return result


def ids_in(peer: Peer, queue: str) -> list[str]:
    """Command ids of the messages in a queue, consuming them."""
    count = peer.queue_length(queue)
    return [json.loads(body)["command_id"] for _, body in peer.drain(queue, count)]


def wrong_key_worker(settings: Settings) -> RunningWorker:
    return RunningWorker(settings.model_copy(update={"pabx_api_key": SecretStr("wrong-key")}))


def test_list_shows_reason_age_attempts_and_consumes_nothing(
    settings: Settings, peer: Peer, sim: SimulatorThread
) -> None:
    running = wrong_key_worker(settings)
    try:
        sent = [command() for _ in range(3)]
        for cmd in sent:
            peer.publish(cmd)
        assert len(peer.events(3, timeout=30)) == 3
    finally:
        running.stop()
    first = listed(settings)
    assert sorted(m["command_id"] for m in first) == sorted(c["command_id"] for c in sent)
    for entry in first:
        assert entry["error_code"] == "pabx_forbidden" and entry["status"] == "failed"
        assert entry["attempts"] == 1 and "403" in entry["reason"]
        assert 0 <= entry["age_s"] < 3600
    table = parked_cli(settings, "list")
    assert table.returncode == 0 and "3 shown of 3 parked" in table.stderr
    assert all(c["command_id"] in table.stdout for c in sent) and "pabx_forbidden" in table.stdout
    again = listed(settings)
    assert [m["command_id"] for m in again] == [m["command_id"] for m in first]  # same order
    assert peer.queue_length(settings.parked_queue) == 3  # nothing consumed


def test_list_filters_by_code_and_age(settings: Settings, peer: Peer) -> None:
    old = [command() for _ in range(2)]
    for cmd in old:
        park(peer, cmd, code="pabx_unreachable", age=timedelta(hours=3))
    park(peer, command(command_id="fresh-invalid"), code="invalid_command", status="rejected")
    # a dead letter written by the broker itself: rejected without requeue from the queue
    peer.publish(command(command_id="broker-dead"))
    deadline = time.monotonic() + 10
    method = None
    while method is None and time.monotonic() < deadline:
        method, _, _ = peer.channel.basic_get(settings.command_queue)
    assert method is not None
    peer.channel.basic_reject(method.delivery_tag, requeue=False)
    while peer.queue_length(settings.parked_queue) < 4 and time.monotonic() < deadline:
        peer.connection.sleep(0.05)

    every = listed(settings)
    assert len(every) == 4
    broker = next(m for m in every if m["command_id"] == "broker-dead")
    assert broker["error_code"] == "dlx_rejected" and broker["age_s"] is not None
    unreachable = listed(settings, "--code", "pabx_unreachable")
    assert [m["command_id"] for m in unreachable] == [c["command_id"] for c in old]
    assert [m["command_id"] for m in listed(settings, "--older-than", "1h")] == [
        c["command_id"] for c in old
    ]
    newer = {m["command_id"] for m in listed(settings, "--newer-than", "30m")}
    assert newer == {"fresh-invalid", "broker-dead"}
    both = listed(settings, "--code", "invalid_command", "--code", "dlx_rejected")
    assert {m["command_id"] for m in both} == {"fresh-invalid", "broker-dead"}
    assert len(listed(settings, "--limit", "1")) == 1
    assert peer.queue_length(settings.parked_queue) == 4


def test_show_explains_and_masks_the_password(settings: Settings, peer: Peer) -> None:
    cmd = command(command_id="show-me")
    park(peer, cmd, code="pabx_bad_request", status="rejected", headers={"tenant": "acme"})
    done = parked_cli(settings, "show", "show-me")
    assert done.returncode == 0, done.stderr
    assert "pabx_bad_request" in done.stdout and "because pabx_bad_request" in done.stdout
    assert "tenant" in done.stdout and cmd["redirect"]["ID_CHAMADA"] in done.stdout
    assert '"SENHA_DISPOSITIVO": "***"' in done.stdout and "4567" not in done.stdout
    as_json = json.loads(parked_cli(settings, "show", "show-me", "--json").stdout)
    assert as_json[0]["headers"]["x-pabx-attempts"] == 3
    missing = parked_cli(settings, "show", "no-such-id")
    assert missing.returncode == 1 and "no parked message" in missing.stderr
    assert peer.queue_length(settings.parked_queue) == 1


def test_replay_sends_a_clean_copy_and_empties_the_parked_queue(
    settings: Settings, peer: Peer
) -> None:
    cmd = command(command_id="replay-me")
    stamp = int(time.time()) - 30
    park(
        peer,
        cmd,
        headers={
            "tenant": "acme",
            "x-death": [{"count": 1, "reason": "rejected", "queue": "q"}],
            "x-first-death-reason": "rejected",
            "x-last-death-queue": "q",
        },
        message_id="msg-1",
        correlation_id="corr-1",
        reply_to="somewhere",
        timestamp=stamp,
    )
    done = parked_cli(settings, "replay")
    assert done.returncode == 0, done.stderr
    assert "replayed replay-me (pabx_unreachable" in done.stdout
    assert peer.queue_length(settings.parked_queue) == 0
    [(props, body)] = peer.drain(settings.command_queue, 1)
    assert body == json.dumps(cmd).encode()  # byte for byte
    kept = {
        k: v
        for k, v in props.headers.items()
        if k not in ("x-delivery-count", "x-pabx-publish-seq")
    }
    assert kept == {"tenant": "acme", "x-pabx-replay": 1}  # producer's headers + generation
    assert props.headers.get("x-delivery-count", 0) == 0
    assert (props.message_id, props.correlation_id, props.reply_to) == (
        "msg-1",
        "corr-1",
        "somewhere",
    )
    assert props.timestamp == stamp and props.delivery_mode == 2


def test_replay_filters_limit_and_dry_run_leave_the_rest_parked(
    settings: Settings, peer: Peer
) -> None:
    cmds = [command(command_id=f"r-{i}") for i in range(6)]
    for i, cmd in enumerate(cmds):
        park(peer, cmd, code="pabx_unreachable" if i % 2 == 0 else "pabx_forbidden")
    dry = parked_cli(settings, "replay", "--dry-run", "--code", "pabx_unreachable")
    assert dry.returncode == 0, dry.stderr
    assert "would replay 3 of 3 matching" in dry.stderr
    assert peer.queue_length(settings.command_queue) == 0
    assert [m["command_id"] for m in listed(settings)] == [c["command_id"] for c in cmds]

    limited = parked_cli(settings, "replay", "--code", "pabx_unreachable", "--limit", "2")
    assert limited.returncode == 0, limited.stderr
    assert peer.queue_length(settings.command_queue) == 2
    assert [m["command_id"] for m in listed(settings)] == ["r-1", "r-3", "r-4", "r-5"]

    assert parked_cli(settings, "replay", "--code", "pabx_forbidden").returncode == 0
    assert [m["command_id"] for m in listed(settings)] == ["r-4"]
    assert parked_cli(settings, "replay", "--older-than", "1d").returncode == 0
    assert [m["command_id"] for m in listed(settings)] == ["r-4"]
    assert sorted(ids_in(peer, settings.command_queue)) == ["r-0", "r-1", "r-2", "r-3", "r-5"]


def test_replay_json_reports_what_moved(settings: Settings, peer: Peer) -> None:
    for i in range(3):
        park(peer, command(command_id=f"j-{i}"), code="pabx_unreachable" if i else "pabx_error")
    dry = parked_cli(settings, "replay", "--dry-run", "--json", "--code", "pabx_unreachable")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {
        "dry_run": True,
        "scanned": 3,
        "selected": ["j-1", "j-2"],
        "replayed": [],
        "failed": [],
        "error": None,
    }
    done = parked_cli(settings, "replay", "--json", "--limit", "1")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)  # stdout holds the JSON alone
    assert report["selected"] == report["replayed"] == ["j-0"] and report["dry_run"] is False
    assert [m["command_id"] for m in listed(settings)] == ["j-1", "j-2"]


def test_replay_after_fixing_the_key_gets_the_commands_accepted(
    settings: Settings, peer: Peer, sim: SimulatorThread
) -> None:
    running = wrong_key_worker(settings)
    sent = [command() for _ in range(3)]
    try:
        for cmd in sent:
            peer.publish(cmd)
        assert len(peer.events(3, timeout=30)) == 3
    finally:
        running.stop()
    assert peer.queue_length(settings.parked_queue) == 3
    fixed = RunningWorker(settings)  # the right key, and a store of its own
    try:
        done = parked_cli(settings, "replay", "--rate", "50")
        assert done.returncode == 0, done.stderr
        events = peer.events(6, timeout=30)[3:]
    finally:
        fixed.stop()
    assert {e["data"]["command_id"] for _, e in events} == {c["command_id"] for c in sent}
    assert {e["data"]["status"] for _, e in events} == {"accepted"}
    assert peer.queue_length(settings.parked_queue) == 0
    assert [r["status"] for r in sim_requests(sim)] == [403] * 3 + [200] * 3


def test_replay_killed_midway_loses_nothing(settings: Settings, peer: Peer) -> None:
    cmds = [command(command_id=f"k-{i:02d}") for i in range(30)]
    for cmd in cmds:
        park(peer, cmd)
    proc = subprocess.Popen(
        [*CLI, "parked", "replay", "--rate", "5"],
        env=env_for(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while peer.queue_length(settings.command_queue) < 3 and time.monotonic() < deadline:
            peer.connection.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    total = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # the broker requeues what the dead process held
        total = peer.queue_length(settings.parked_queue) + peer.queue_length(settings.command_queue)
        if total >= 30:
            break
        peer.connection.sleep(0.05)
    assert total >= 30
    moved = ids_in(peer, settings.command_queue)
    still_parked = ids_in(peer, settings.parked_queue)
    assert set(moved) | set(still_parked) == {c["command_id"] for c in cmds}
    assert len(moved) >= 3


def archived(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_discard_archives_each_message_before_removing_it(
    settings: Settings, peer: Peer, tmp_path: Path
) -> None:
    cmds = [command(command_id=f"d-{i}") for i in range(4)]
    for i, cmd in enumerate(cmds):
        park(peer, cmd, code="pabx_unreachable" if i % 2 == 0 else "pabx_forbidden")
    archive = tmp_path / "discarded.jsonl"
    missing = parked_cli(settings, "discard", "--code", "pabx_forbidden")
    assert missing.returncode == 2 and "--archive" in missing.stderr
    dry = parked_cli(settings, "discard", "--dry-run", "--code", "pabx_forbidden")
    assert dry.returncode == 0 and "would discard 2 of 2 matching" in dry.stderr
    assert len(listed(settings)) == 4 and not archive.exists()

    done = parked_cli(settings, "discard", "--code", "pabx_forbidden", "--archive", str(archive))
    assert done.returncode == 0, done.stderr
    assert "discarded 2 of 2 matching" in done.stderr
    assert [m["command_id"] for m in listed(settings)] == ["d-0", "d-2"]
    lines = archived(archive)
    assert [line["command_id"] for line in lines] == ["d-1", "d-3"]
    assert json.loads(lines[0]["body"]) == cmds[1]  # unmasked: it can be published again
    assert lines[0]["error_code"] == "pabx_forbidden"
    assert lines[0]["headers"]["x-pabx-attempts"] == 3
    assert archive.stat().st_mode & 0o777 == 0o600

    again = parked_cli(settings, "discard", "--limit", "1", "--archive", str(archive))
    assert again.returncode == 0, again.stderr
    assert [line["command_id"] for line in archived(archive)] == ["d-1", "d-3", "d-0"]  # appended
    assert [m["command_id"] for m in listed(settings)] == ["d-2"]


def test_discard_killed_midway_loses_nothing(
    settings: Settings, peer: Peer, tmp_path: Path
) -> None:
    cmds = [command(command_id=f"k-{i:02d}") for i in range(30)]
    for cmd in cmds:
        park(peer, cmd)
    archive = tmp_path / "discarded.jsonl"
    proc = subprocess.Popen(
        [*CLI, "parked", "discard", "--rate", "5", "--archive", str(archive)],
        env=env_for(settings),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while len(archived(archive)) < 3 and time.monotonic() < deadline:
            peer.connection.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    kept = {line["command_id"] for line in archived(archive)}
    assert len(kept) >= 3
    deadline = time.monotonic() + 20
    # the broker requeues what the dead process held: all but (at most) the archived ones
    while peer.queue_length(settings.parked_queue) < 30 - len(kept):
        assert time.monotonic() < deadline
        peer.connection.sleep(0.05)
    still_parked = set(ids_in(peer, settings.parked_queue))
    every = {c["command_id"] for c in cmds}
    assert still_parked | kept == every  # nothing lost
    assert every - still_parked <= kept  # nothing removed that was not archived first


def test_export_writes_the_queue_without_consuming_it(
    settings: Settings, peer: Peer, tmp_path: Path
) -> None:
    cmds = [command(command_id=f"e-{i}") for i in range(3)]
    for cmd in cmds:
        park(peer, cmd)
    latin = '{"command_id": "não-utf8"}'.encode("latin-1")
    park(peer, latin, code="invalid_command", content_encoding="latin-1")
    out = tmp_path / "parked.jsonl"
    done = parked_cli(settings, "export", "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert "exported 4 of 4 parked" in done.stderr
    lines = archived(out)
    assert [json.loads(line["body"]) for line in lines[:3]] == cmds
    assert base64.b64decode(lines[3]["body_base64"]) == latin and "body" not in lines[3]
    assert lines[3]["properties"]["content_encoding"] == "latin-1"
    to_stdout = parked_cli(settings, "export", "--code", "invalid_command")
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert [json.loads(line)["error_code"] for line in to_stdout.stdout.splitlines()] == [
        "invalid_command"
    ]
    assert [m["command_id"] for m in listed(settings)][:3] == ["e-0", "e-1", "e-2"]
    assert peer.queue_length(settings.parked_queue) == 4


def test_export_killed_midway_leaves_the_queue_as_it_was(settings: Settings, peer: Peer) -> None:
    cmds = [command(command_id=f"x-{i:02d}") for i in range(30)]
    for cmd in cmds:  # 30 x 8 kB: more than a pipe holds, so the export blocks midway
        park(peer, {**cmd, "padding": "x" * 8000})
    proc = subprocess.Popen(
        [*CLI, "parked", "export"],
        env=env_for(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())  # it is writing, and holds what it read
        assert first["command_id"] == "x-00"
        deadline = time.monotonic() + 30
        while peer.queue_length(settings.parked_queue) == 30 and time.monotonic() < deadline:
            peer.connection.sleep(0.02)
        assert peer.queue_length(settings.parked_queue) < 30
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    deadline = time.monotonic() + 20
    while peer.queue_length(settings.parked_queue) < 30:
        assert time.monotonic() < deadline
        peer.connection.sleep(0.05)
    assert [m["command_id"] for m in listed(settings)] == [c["command_id"] for c in cmds]


def test_bad_options_are_usage_errors(settings: Settings, peer: Peer) -> None:
    for args in (
        ["list", "--older-than", "yesterday"],
        ["replay", "--newer-than", "-5"],
        ["replay", "--rate", "0"],
        ["replay", "--limit", "0"],
        ["discard", "--archive", "/nonexistent/dir/a.jsonl"],
        ["discard", "--dry-run", "--older-than", "soon"],
        ["export", "--limit", "0"],
    ):
        done = parked_cli(settings, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr


# -- pure parts ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("2.5", 2.5), ("90s", 90), ("15m", 900), ("2h", 7200), ("1d", 86400),
     ("1h30m", 5400), (" 10M ", 600)],
)  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-1", "abc", "5x", "1h 30m", "m5", "inf"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_clean_headers_strips_dead_letter_and_attempt_headers() -> None:
    headers = {
        "tenant": "acme",
        "x-death": [],
        "x-first-death-reason": "rejected",
        "x-first-death-queue": "q",
        "x-last-death-exchange": "e",
        "x-pabx-attempts": 3,
        "x-pabx-retries": 2,
        "x-pabx-error-code": "pabx_error",
        "x-delivery-count": 4,
        "x-custom": "kept",
    }
    assert clean_headers(headers) == {"tenant": "acme", "x-custom": "kept"}


def test_passwords_are_masked_even_in_bodies_that_are_not_json() -> None:
    assert "4567" not in masked_text(b'{"SENHA_DISPOSITIVO": "4567", broken')
    assert "4567" not in masked_text(b'{"redirect": {"SENHA_DISPOSITIVO": 4567}}')
    pretty = pretty_body(json.dumps(command()).encode())
    assert '"SENHA_DISPOSITIVO": "***"' in pretty and "4567" not in pretty


def _message(code: str, age_s: float | None) -> ParkedMessage:
    now = datetime.now(UTC)
    return ParkedMessage(
        position=1,
        delivery_tag=1,
        body=b"{}",
        properties={},
        headers={},
        command_id="c",
        error_code=code,
        reason="",
        status="failed",
        attempts=1,
        parked_at=None if age_s is None else now - timedelta(seconds=age_s),
    )


def test_filters() -> None:
    now = datetime.now(UTC)
    assert ParkedFilter().matches(_message("x", None), now)
    assert not ParkedFilter(frozenset({"y"})).matches(_message("x", 5), now)
    assert ParkedFilter(older_than_s=60).matches(_message("x", 120), now)
    assert not ParkedFilter(older_than_s=60).matches(_message("x", 30), now)
    assert ParkedFilter(newer_than_s=60).matches(_message("x", 30), now)
    assert not ParkedFilter(newer_than_s=60).matches(_message("x", None), now)


def test_unroutable_replays_stay_parked(settings: Settings, peer: Peer) -> None:
    from worker.produce.parked import ParkedQueue
    from worker.produce.producer import Producer

    for i in range(3):
        park(peer, command(command_id=f"u-{i}"))
    with Producer(settings) as producer:
        peer.channel.queue_unbind(
            settings.command_queue, settings.commands_exchange, settings.routing_key
        )
        report = ParkedQueue(producer).replay()
    assert not report.ok and report.replayed == []
    assert sorted(m.command_id or "" for m, _ in report.failed) == ["u-0", "u-1", "u-2"]
    assert all("unroutable" in reason for _, reason in report.failed)
    assert [m["command_id"] for m in listed(settings)] == ["u-0", "u-1", "u-2"]


def test_bodies_move_byte_for_byte_whatever_their_encoding(settings: Settings, peer: Peer) -> None:
    body = json.dumps(command(command_id="utf16")).encode("utf-16")
    park(peer, body, code="invalid_command", content_encoding="utf-16")
    assert parked_cli(settings, "replay").returncode == 0
    [(props, moved)] = peer.drain(settings.command_queue, 1)
    assert moved == body and props.content_encoding == "utf-16"
