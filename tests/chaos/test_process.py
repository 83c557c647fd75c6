"""The worker process dies (``kill -9``) or is asked to stop (SIGTERM) with commands in flight.

Both run ``python -m worker run`` as a separate process on a SQLite store in ``tmp_path``,
so the restarted worker sees the idempotency records of the first one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.chaos.harness import Rig, Tally, size
from tests.kit.processes import WorkerProcess, wait_until
from tests.kit.samples import command_ids
from tests.kit.samples import counted_command as command
from worker.contract.settings import Settings

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

CONCURRENCY = 32


def _settings(rig: Rig, tmp_path: Path) -> Settings:
    return rig.variant(
        store_url=f"sqlite:///{tmp_path / 'store.sqlite3'}",
        concurrency=CONCURRENCY,
        pabx_connect_timeout_s=0.3,
        pabx_read_timeout_s=1.0,
        retry_in_process_attempts=1,
        # A command claimed by the killed worker waits out its lease (11.3 s here)
        # bouncing through these queues, then is taken over.
        retry_delays_s=(0.5, 1.0),
        shutdown_timeout_s=10.0,
    )


def _start(rig: Rig, settings: Settings) -> WorkerProcess:
    process = WorkerProcess(settings)
    rig.on_close(process.close)
    process.wait_ready()
    return process


def _progress(rig: Rig, ids: list[str], at_least: int) -> None:
    mine = set(ids)
    assert wait_until(lambda: len(rig.finished() & mine) >= at_least, 60), "no progress"


def _steady_length(rig: Rig) -> int:
    """The command queue's length once the broker has requeued what a dead worker held."""
    last = -1
    while True:
        now = rig.queue_length()
        if now == last:
            return now
        last = now
        rig.peer.connection.sleep(0.3)


@pytest.mark.timeout(size(90, 600))
def test_kill_9_with_commands_in_flight_then_restart(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    rig = make_rig()
    settings = _settings(rig, tmp_path)
    count = size(100, 600)
    latency_ms = 400
    rig.faults(latency_ms=latency_ms)
    ids = command_ids("kill9", count)
    rig.publish(command(cid) for cid in ids)
    queued = rig.queue_length()

    first = _start(rig, settings)
    _progress(rig, ids, count // 4)
    first.kill()
    killed_at = time.monotonic()
    rig.settle(0.5)  # events and requests already on the wire land; the broker requeues
    by_first = Tally.of("kill9", rig, ids)
    in_flight = set(by_first.requests) - set(by_first.events)
    acked = count - _steady_length(rig)
    finished_first = len(by_first.events)

    second = _start(rig, settings)
    drained = rig.wait_outcomes(ids, timeout=size(60, 240))
    drain_s = time.monotonic() - killed_at
    rig.settle(1.0)
    code, _ = second.terminate(15)
    tally = Tally.of(
        "kill -9 + restart",
        rig,
        ids,
        queued_at_start=queued,
        concurrency=CONCURRENCY,
        pabx_latency_ms=latency_ms,
        outcomes_before_kill=finished_first,
        acked_before_kill=acked,
        outcome_published_ack_lost=finished_first - acked,
        in_flight_at_kill=len(in_flight),
        restart_drain_s=round(drain_s, 1),
        left_in_queues=sum(rig.pending().values()),
    )
    tally.report()
    assert drained, f"no outcome for {len(tally.lost)} commands"
    assert queued >= count
    assert in_flight, "the kill found nothing in flight: make the PABX slower"
    assert tally.lost == []
    assert tally.multiple_outcomes == []  # a repeated event only with the same event id
    assert tally.statuses == {"accepted": count}
    assert tally.surplus_requests <= len(in_flight)
    assert set(tally.sent_twice) <= in_flight
    assert sum(rig.pending().values()) == 0
    assert code == 0


@pytest.mark.timeout(size(60, 300))
def test_sigterm_finishes_in_flight_and_stops_taking_deliveries(
    make_rig: Callable[..., Rig], tmp_path: Path
) -> None:
    rig = make_rig()
    settings = _settings(rig, tmp_path)
    count = size(100, 500)
    latency_ms = 300
    rig.faults(latency_ms=latency_ms)
    ids = command_ids("sigterm", count)
    rig.publish(command(cid) for cid in ids)

    first = _start(rig, settings)
    _progress(rig, ids, count // 4)
    termed_at = datetime.now(UTC)
    code, stop_s = first.terminate(settings.shutdown_timeout_s + 10)
    rig.settle(0.3)
    by_first = Tally.of("sigterm", rig, ids)
    sent_first = set(by_first.requests)
    unfinished = sent_first - set(by_first.events)
    late = {
        str(r["body"]["DADOS"])
        for r in rig.pabx_requests()
        if datetime.fromisoformat(r["received_at"]) > termed_at
    }
    started_after_term = len(late)
    left = _steady_length(rig)
    acked = count - left

    second = _start(rig, settings)
    drained = rig.wait_outcomes(ids, timeout=size(40, 120))
    rig.settle(0.5)
    second_code, _ = second.terminate(15)
    tally = Tally.of(
        "SIGTERM + restart",
        rig,
        ids,
        concurrency=CONCURRENCY,
        pabx_latency_ms=latency_ms,
        exit_code=code,
        stop_s=round(stop_s, 2),
        outcomes_before_stop=len(by_first.events),
        acked_before_stop=acked,
        sent_without_outcome_at_stop=len(unfinished),
        requests_after_sigterm=started_after_term,
        left_in_queue_at_stop=left,
        left_in_queues=sum(rig.pending().values()),
    )
    tally.report()
    assert code == 0, first.log[-3000:]
    assert stop_s < settings.shutdown_timeout_s, "in-flight commands did not finish in time"
    assert {"stopping", "stopped"} <= set(first.messages())
    assert unfinished == set(), "in flight at SIGTERM but no outcome"
    assert acked == len(by_first.events)  # nothing acked without an outcome, nothing held
    assert started_after_term <= CONCURRENCY
    assert drained and tally.lost == []
    assert tally.multiple_outcomes == [] and tally.republished == 0
    assert tally.sent_twice == []
    assert tally.statuses == {"accepted": count}
    assert second_code == 0
