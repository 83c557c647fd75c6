"""The idempotency store goes away (Redis stopped, PostgreSQL unreachable) and comes back.

The worker reaches the store through a TCP proxy. Redis is "stopped": every connection is
reset and new ones are refused. PostgreSQL is "unreachable": connections are cut and new
ones hang unanswered until the driver's connect timeout. Commands wait (broker-held
retries) and finish once the store is back; none is acked without an outcome.

Reduced mode cuts the store before the commands arrive; full mode cuts it mid-stream, with
commands between their PABX call and the recording of its answer: those are sent again
once their lease lapses, which the table shows as surplus PABX requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
import pytest
import redis

from tests.chaos.harness import FULL, Rig, StateMonitor, Tally, size
from tests.kit.processes import RunningWorker, wait_until
from tests.kit.proxy import TcpProxy
from tests.kit.samples import command_ids
from tests.kit.samples import counted_command as command

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

OUTAGE_S = size(1.5, 8.0)


def _forget(kind: str, url: str, ids: list[str]) -> None:
    """Remove this scenario's idempotency records from the shared servers."""
    if kind == "redis":
        with redis.Redis.from_url(url) as client:
            client.delete(*(f"pabx:cmd:{cid}" for cid in ids))
    else:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM pabx_commands WHERE command_id = ANY(%s)", (ids,))


@pytest.mark.timeout(size(60, 300))
@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_store_outage(
    make_rig: Callable[..., Rig], request: pytest.FixtureRequest, kind: str
) -> None:
    url: str = request.getfixturevalue(f"{kind}_url")
    proxy = TcpProxy.for_url(url, 6379 if kind == "redis" else 5432)
    mode = "refuse" if kind == "redis" else "blackhole"
    rig = make_rig(
        concurrency=8,
        store_url=proxy.url(url),
        pabx_connect_timeout_s=0.5,
        pabx_read_timeout_s=1.0,
        retry_in_process_attempts=1,
        retry_delays_s=(0.2, 0.5, 1.0),
    )
    rig.on_close(proxy.close)
    count = size(40, 300)
    ids = command_ids(f"store-{kind}", count)
    rig.on_close(lambda: _forget(kind, url, ids))
    rig.faults(latency_ms=100)
    running = RunningWorker(rig.settings)
    rig.on_close(running.stop)
    monitor = StateMonitor(running.worker)
    rig.on_close(monitor.stop)
    mine = set(ids)

    def outage() -> tuple[int, float]:
        sent_before = set(rig.requests_by_command())
        done_before = rig.finished()
        started = time.monotonic()
        with proxy.outage(mode):
            rig.peer.connection.sleep(OUTAGE_S)
        # Sent to the PABX but not finished when the store went away.
        exposed = len((sent_before & mine) - done_before)
        return exposed, time.monotonic() - started

    if FULL:  # mid-stream
        rig.publish(command(cid) for cid in ids)
        assert wait_until(lambda: len(rig.finished() & mine) >= count // 4, 60)
        exposed, down_s = outage()
    else:  # down before the commands arrive
        proxy.refuse() if mode == "refuse" else proxy.blackhole()
        rig.publish(command(cid) for cid in ids)
        rig.peer.connection.sleep(OUTAGE_S)
        proxy.restore()
        exposed, down_s = 0, OUTAGE_S
    restored = time.monotonic()
    drained = rig.wait_outcomes(ids, timeout=size(40, 200))
    recovery_s = time.monotonic() - restored
    state = running.worker.state
    assert wait_until(lambda: state.in_flight == 0, 10)
    rig.settle(0.5)
    tally = Tally.of(
        f"store outage: {kind} ({mode})",
        rig,
        ids,
        outage_s=round(down_s, 1),
        in_pabx_call_at_outage=exposed,
        broker_retries=state.handled.get("retry", 0),
        drain_after_outage_s=round(recovery_s, 1),
        sessions=state.sessions,
        left_in_queues=sum(rig.pending().values()),
    )
    tally.report()
    assert drained and tally.lost == []
    assert tally.multiple_outcomes == []
    assert tally.statuses == {"accepted": count}
    # Only commands between their PABX call and its recording can be sent again.
    assert tally.surplus_requests <= rig.settings.concurrency
    assert sum(rig.pending().values()) == 0
    assert running.thread.is_alive() and state.sessions == 1
    if not FULL:
        assert tally.surplus_requests == 0  # nothing was sent while the store was away
