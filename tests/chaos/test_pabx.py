"""The PABX misbehaves mid-stream: outage, 503 and 500 storms, latency spikes, hangs, slowness.

Commands the PABX never got (refused, 503) wait and are sent again (the circuit breaker
pauses consumption, retries go through the broker). Commands it may have acted on (an
answer slower than the read timeout, a hang, a 500) are never sent twice: they end
``failed`` / ``pabx_outcome_unknown`` and are parked. Every command gets exactly one
outcome, and nothing is left behind.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from tests.chaos.harness import Rig, StateMonitor, Tally, size
from tests.kit.processes import RunningWorker, wait_until
from tests.kit.proxy import TcpProxy
from tests.kit.samples import command_ids
from tests.kit.samples import counted_command as command

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

#: Normal PABX latency, so that the stream is still going when the fault starts.
BASE_LATENCY_MS = 100
FAULT_S = size(1.0, 8.0)
FAULT_SETTINGS = {
    "concurrency": 8,
    "pabx_connect_timeout_s": 0.5,
    "pabx_read_timeout_s": size(0.5, 1.0),
    "retry_in_process_attempts": 2,
    "retry_in_process_max_wait_s": 0.05,
    "retry_delays_s": size((0.1, 0.25, 0.5), (0.2, 0.5, 1.0)),
    "circuit_threshold": 5,
    "circuit_reset_s": size(0.3, 0.5),
}


@dataclass(frozen=True)
class Fault:
    name: str
    start: Callable[[Rig, TcpProxy], object]
    #: Statuses a command may end with.
    allowed: frozenset[str]
    #: Part of the commands carrying a deadline that falls inside the fault.
    short_deadlines: bool = False


def _normal(rig: Rig, proxy: TcpProxy) -> None:
    proxy.restore()
    rig.faults(latency_ms=BASE_LATENCY_MS)


FAULTS = [
    # Requests cut mid-answer when it goes down are ambiguous (failed); new ones are refused.
    Fault(
        "pabx-outage", lambda r, p: p.refuse(), frozenset({"accepted", "expired", "failed"}), True
    ),
    Fault(
        "pabx-503-storm",
        lambda r, p: r.faults(latency_ms=BASE_LATENCY_MS, error_rate=0.8, fail_status=503),
        frozenset({"accepted"}),
    ),
    Fault(
        "pabx-latency-spike",
        lambda r, p: r.faults(latency_ms=1500),  # above the read timeout: ambiguous
        frozenset({"accepted", "failed"}),
    ),
    Fault(
        "pabx-500-storm",
        lambda r, p: r.faults(latency_ms=BASE_LATENCY_MS, error_rate=0.8, fail_status=500),
        frozenset({"accepted", "failed"}),
    ),
    Fault("pabx-hang", lambda r, p: r.faults(hang=True), frozenset({"accepted", "failed"})),
]
#: Codes a ``failed`` command may carry: not sent past the budget, or ambiguous.
FAILED_CODES = ("pabx_unreachable", "pabx_outcome_unknown")


@pytest.mark.timeout(size(60, 300))
@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_pabx_fault_mid_stream(make_rig: Callable[..., Rig], fault: Fault) -> None:
    rig = make_rig(**FAULT_SETTINGS)
    proxy = TcpProxy.for_url(rig.sim.url, 80)
    rig.on_close(proxy.close)
    settings = rig.variant(pabx_url=proxy.url(rig.sim.url))
    _normal(rig, proxy)
    count = size(30, 300)
    ids = command_ids(fault.name, count)
    short = set(ids[::4]) if fault.short_deadlines else set()
    expires = (datetime.now(UTC) + timedelta(seconds=FAULT_S * 0.6)).isoformat()
    running = RunningWorker(settings)
    rig.on_close(running.stop)
    monitor = StateMonitor(running.worker)
    rig.on_close(monitor.stop)
    rig.publish(command(cid, expires_at=expires) if cid in short else command(cid) for cid in ids)

    mine = set(ids)
    assert wait_until(lambda: len(rig.finished() & mine) >= count // 5, 30)
    before = len(rig.finished() & mine)
    cut = fault.start(rig, proxy)
    started = time.monotonic()
    rig.peer.connection.sleep(FAULT_S)
    during = len(rig.finished() & mine) - before
    _normal(rig, proxy)
    ended = time.monotonic()
    left_after_fault = count - len(rig.finished() & mine)
    drained = rig.wait_outcomes(ids, timeout=size(40, 200))
    recovery_s = time.monotonic() - ended
    state = running.worker.state
    assert wait_until(lambda: state.in_flight == 0, 10)
    rig.settle(0.5)
    paused = any(c and not consuming for _, c, consuming, _ in monitor.between(started, ended))
    tally = Tally.of(
        fault.name,
        rig,
        ids,
        fault_s=FAULT_S,
        connections_cut=cut,
        outcomes_during_fault=during,
        circuit_opened=running.processor.breakers["default"].opened,
        consumption_paused=paused,
        broker_retries=state.handled.get("retry", 0),
        drain_after_fault_s=round(recovery_s, 1),
        peak_in_flight_after_fault=monitor.peak_in_flight(ended),
        parked=rig.queue_length(settings.parked_queue),
        left_in_queues=sum(rig.pending().values()),
    )
    tally.report()
    assert drained and tally.lost == []
    assert tally.multiple_outcomes == []
    assert set(tally.statuses) <= fault.allowed, tally.statuses
    for cid, events in tally.events.items():
        data = events[0]["data"]
        if data["status"] == "expired":
            assert cid in short and data["error"]["code"] == "expired"
        if data["status"] == "failed":
            assert data["error"]["code"] in FAILED_CODES, data
    # At most once toward the PABX: only answers saying it did not act (503) are resent.
    may_have_acted = Counter(
        str(r["body"]["DADOS"])
        for r in rig.pabx_requests()
        if isinstance(r.get("body"), dict) and r["status"] not in (429, 503)
    )
    assert [cid for cid in ids if may_have_acted[cid] > 1] == []
    assert sum(rig.pending().values()) == 0  # nothing left waiting without an outcome
    failed = tally.statuses.get("failed", 0)
    assert rig.queue_length(settings.parked_queue) == failed
    assert running.thread.is_alive() and state.sessions == 1
    if left_after_fault >= 4 * settings.concurrency:
        # Back to full speed once the PABX recovers, not one command at a time.
        assert monitor.peak_in_flight(ended) == settings.concurrency
    if fault.name == "pabx-outage":
        assert running.processor.breakers["default"].opened >= 1 and paused
        # Ambiguous only on a connection the outage cut: each carried at most one request
        # (in flight then, or written on a kept-alive one just as it was cut); new ones are
        # refused, not sent.
        assert isinstance(cut, int) and failed <= cut


@pytest.mark.timeout(size(60, 180))
def test_pabx_slower_than_two_heartbeats_keeps_the_broker_connection(
    make_rig: Callable[..., Rig],
) -> None:
    heartbeat_s = 2
    latency_s = 2.5 * heartbeat_s
    rig = make_rig(
        concurrency=8,
        heartbeat_s=heartbeat_s,
        pabx_read_timeout_s=latency_s + 3,
        retry_in_process_attempts=1,
    )
    rig.faults(latency_ms=latency_s * 1000)
    count = size(8, 32)  # one wave of 8 in flight at once; four in full mode
    ids = command_ids("slow-pabx", count)
    running = RunningWorker(rig.settings)
    rig.on_close(running.stop)
    monitor = StateMonitor(running.worker)
    rig.on_close(monitor.stop)
    started = time.monotonic()
    rig.publish(command(cid) for cid in ids)
    drained = rig.wait_outcomes(ids, timeout=latency_s * (count / 8 + 2) + 10)
    took = time.monotonic() - started
    state = running.worker.state
    rig.settle(0.5)
    tally = Tally.of(
        "PABX slower than 2 heartbeats",
        rig,
        ids,
        heartbeat_s=heartbeat_s,
        pabx_latency_s=latency_s,
        took_s=round(took, 1),
        sessions=state.sessions,
        ready_flips=monitor.ready_flips(),
    )
    tally.report()
    assert drained and tally.lost == []
    assert tally.statuses == {"accepted": count}
    assert tally.surplus_requests == 0
    assert state.sessions == 1 and monitor.ready_flips() == 0
    assert state.connected and state.consuming
