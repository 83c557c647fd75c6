"""``send --trace`` and ``batch --trace``: each command starts a trace (SPEC §8)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.kit.events import AnyPeer
from tests.kit.processes import CLI, env_for
from tests.kit.samples import command
from worker.contract.settings import Settings

pytestmark = pytest.mark.integration


def cli(settings: Settings, *args: str, stdin: str | None = None) -> None:
    # No OTEL_* variable: the trace is started and propagated, its spans go nowhere.
    env = {k: v for k, v in env_for(settings).items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [*CLI, *args], input=stdin, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def trace_ids(peer: AnyPeer, settings: Settings, count: int) -> list[str]:
    """The trace id of each command waiting in the command queue."""
    found = []
    for props, _ in peer.drain(settings.command_queue, count):
        version, trace_id, span_id, _flags = props.headers["traceparent"].split("-")
        assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
        found.append(trace_id)
    return found


def test_send_trace_puts_a_traceparent_on_the_command(settings: Settings, peer: AnyPeer) -> None:
    cli(settings, "send", "--trace", stdin=json.dumps(command()))
    assert len(trace_ids(peer, settings, 1)) == 1


def test_send_without_trace_adds_no_traceparent(settings: Settings, peer: AnyPeer) -> None:
    cli(settings, "send", stdin=json.dumps(command()))
    ((props, _),) = peer.drain(settings.command_queue, 1)
    assert "traceparent" not in (props.headers or {})


def test_batch_trace_starts_one_trace_per_command(
    settings: Settings, peer: AnyPeer, tmp_path: Path
) -> None:
    lines = [json.dumps(command()) for _ in range(3)]
    path = tmp_path / "batch.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cli(settings, "batch", "--trace", str(path))
    assert len(set(trace_ids(peer, settings, 3))) == 3
