"""The broker goes away mid-stream: the worker reconnects, consumes again, loses nothing.

The connection cut runs everywhere: a TCP proxy sits between the worker and RabbitMQ, and
every connection through it is reset while new ones are refused for a while. The real broker
restart (``rabbitmqctl stop_app`` / ``start_app``) stops the shared server, so it runs only
with ``PABX_CHAOS_BROKER_RESTART=1``, on a machine where nobody else uses that broker.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

import pytest

from tests.chaos.harness import FULL, Rig, StateMonitor, Tally, size
from tests.kit.processes import RunningWorker, wait_until
from tests.kit.proxy import TcpProxy
from tests.kit.samples import command_ids
from tests.kit.samples import counted_command as command
from worker.contract.settings import Settings

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def _stream_with_outages(
    rig: Rig,
    settings: Settings,
    scenario: str,
    outage: Callable[[], None],
    *,
    count: int,
    outages: int,
) -> None:
    rig.faults(latency_ms=40)
    ids = command_ids(scenario, count)
    rig.publish(command(cid) for cid in ids)
    running = RunningWorker(settings)
    rig.on_close(running.stop)
    monitor = StateMonitor(running.worker)
    rig.on_close(monitor.stop)
    windows: list[tuple[float, float, float]] = []
    for k in range(outages):
        target = count * (k + 1) // (outages + 1)
        assert wait_until(lambda t=target: len(rig.finished() & set(ids)) >= t, 60)
        start = time.monotonic()
        outage()
        end = time.monotonic()
        assert running.worker.ready.wait(60), "the worker did not consume again"
        windows.append((start, end, time.monotonic()))
    assert rig.wait_outcomes(ids, timeout=size(60, 300)), "commands without an outcome"
    state = running.worker.state
    assert wait_until(lambda: state.in_flight == 0, 10), f"in_flight stuck at {state.in_flight}"
    rig.settle(1.0)
    tally = Tally.of(
        scenario,
        rig,
        ids,
        outages=outages,
        sessions=state.sessions,
        ready_flips=monitor.ready_flips(),
        slowest_recovery_s=round(max(back - start for start, _, back in windows), 2),
        consumers_after=rig.consumers(),
        in_flight_after=state.in_flight,
        left_in_queues=sum(rig.pending().values()),
    )
    tally.report()
    monitor.stop()
    for start, end, _ in windows:
        during = monitor.between(start, end)
        assert any(not ready and not connected for _, connected, _, ready in during), during
    assert running.worker.ready.is_set() and state.connected and state.consuming
    assert state.sessions == outages + 1 or state.sessions > outages
    assert monitor.ready_flips() >= outages
    assert rig.consumers() == 1  # registered again, once
    assert running.thread.is_alive() and running.error is None
    assert tally.lost == [] and tally.multiple_outcomes == []
    assert tally.statuses == {"accepted": count}
    # Commands in flight at the cut were recorded before their ack was lost: their
    # redelivered copies replay the outcome, they are not sent again.
    assert tally.sent_twice == []
    assert sum(rig.pending().values()) == 0


@pytest.mark.timeout(size(90, 600))
def test_broker_connection_cut_mid_stream(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(concurrency=8)
    proxy = TcpProxy.for_url(rig.amqp_url, 5672)
    rig.on_close(proxy.close)
    settings = rig.variant(amqp_url=proxy.url(rig.amqp_url))
    down_s = size(1.5, 5.0)

    def cut() -> None:
        with proxy.outage("refuse"):
            time.sleep(down_s)

    _stream_with_outages(
        rig,
        settings,
        "broker-cut",
        cut,
        count=size(150, 800),
        outages=size(1, 3),
    )


RESTART = os.environ.get("PABX_CHAOS_BROKER_RESTART") == "1"


@pytest.mark.skipif(
    not RESTART,
    reason="stops the shared RabbitMQ: set PABX_CHAOS_BROKER_RESTART=1 on a broker of your own",
)
@pytest.mark.timeout(600)
def test_broker_restart_mid_stream(make_rig: Callable[..., Rig]) -> None:
    rig = make_rig(concurrency=8)

    def restart() -> None:
        ctl = ["rabbitmqctl"]
        subprocess.run([*ctl, "stop_app"], check=True, timeout=180, capture_output=True)
        time.sleep(size(3.0, 10.0))
        subprocess.run([*ctl, "start_app"], check=True, timeout=180, capture_output=True)
        subprocess.run([*ctl, "await_startup"], check=False, timeout=180, capture_output=True)
        rig.reconnect()

    _stream_with_outages(
        rig,
        rig.settings,
        "broker-restart",
        restart,
        count=size(150, 800),
        outages=2 if FULL else 1,
    )
