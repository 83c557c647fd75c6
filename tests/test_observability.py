"""Metrics and the health endpoint, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from tests.kit.events import MemoryPeer, memory_peer
from tests.kit.processes import RunningWorker, set_faults, wait_until
from tests.kit.samples import API_KEY, command
from tests.kit.topology import private_settings
from worker.consume.observability import (
    HealthServer,
    MeteredPabx,
    Metrics,
    pabx_result,
    worker_version,
)
from worker.contract.errors import PabxUnavailable
from worker.contract.models import ErrorCode
from worker.contract.settings import PabxTarget
from worker.tools.fakes import FakePabx
from worker.tools.memory_broker import MemoryBroker
from worker.tools.simulator import SimulatorThread

TARGET = PabxTarget(url="http://pabx.invalid", api_key="never-shown-key", channel_id=1)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def server(metrics: Metrics) -> Iterator[tuple[HealthServer, list[bool]]]:
    state = [False]
    running = HealthServer(
        host="127.0.0.1", port=0, metrics=metrics, ready=lambda: state[0]
    ).start()
    yield running, state
    running.stop()


def test_healthz_is_always_ok_and_readyz_follows_readiness(
    server: tuple[HealthServer, list[bool]],
) -> None:
    running, state = server
    base = f"http://127.0.0.1:{running.port}"
    assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
    assert requests.get(f"{base}/readyz", timeout=5).status_code == 503
    state[0] = True
    assert requests.get(f"{base}/readyz", timeout=5).status_code == 200
    assert requests.get(f"{base}/nope", timeout=5).status_code == 404


def test_metrics_expose_pabx_durations_by_target_and_result(
    metrics: Metrics, server: tuple[HealthServer, list[bool]]
) -> None:
    pabx = MeteredPabx(FakePabx([503]), metrics)
    with pytest.raises(PabxUnavailable):
        pabx.redirect(TARGET, 1, {"SENHA_DISPOSITIVO": "4567"})
    assert pabx.redirect(TARGET, 1, {}) == 200
    metrics.commands.labels("accepted", "false").inc()
    text = requests.get(f"http://127.0.0.1:{server[0].port}/metrics", timeout=5).text
    assert 'pabx_worker_pabx_request_seconds_count{result="503",target="default"} 1.0' in text
    assert 'pabx_worker_pabx_request_seconds_count{result="200",target="default"} 1.0' in text
    assert 'pabx_worker_commands_total{duplicate="false",status="accepted"} 1.0' in text
    assert "never-shown-key" not in text and "4567" not in text


def test_build_info_process_and_platform_series_are_on_the_private_registry(
    metrics: Metrics,
) -> None:
    text = metrics.render().decode()
    assert f'pabx_worker_build_info{{version="{worker_version()}"}} 1.0' in text
    assert "\nprocess_cpu_seconds_total " in text
    assert "\npython_info{" in text
    assert "python_gc_collections_total{" in text


def test_pabx_buckets_run_from_5_ms_to_10_s(metrics: Metrics) -> None:
    MeteredPabx(FakePabx([200]), metrics).redirect(TARGET, 1, {})
    text = metrics.render().decode()
    assert (
        'pabx_worker_pabx_request_seconds_bucket{le="0.005",result="200",target="default"}' in text
    )
    assert (
        'pabx_worker_pabx_request_seconds_bucket{le="10.0",result="200",target="default"}' in text
    )


@pytest.mark.parametrize(
    ("status_code", "expected"),
    [
        (503, "503"),
        (None, "pabx_unreachable"),
        (0, "pabx_unreachable"),
        (10_000, "pabx_unreachable"),
    ],
)
def test_the_result_label_is_an_http_status_or_an_error_code(
    status_code: int | None, expected: str
) -> None:
    assert pabx_result(status_code, ErrorCode.PABX_UNREACHABLE) == expected


def _series(text: str) -> set[str]:
    """Every sample's name and labels, values dropped (``_created`` timestamps too)."""
    return {
        line.rsplit(" ", 1)[0]
        for line in text.splitlines()
        if line.startswith("pabx_worker_") and "_created" not in line
    }


def _round(running: RunningWorker, peer: MemoryPeer, sim: SimulatorThread, count: int) -> None:
    """``count`` accepted, ``count`` refused by the PABX, one invalid; returns once counted."""
    total = sum(running.worker.state.handled.values())
    for faults in ({}, {"error_rate": 1.0, "fail_status": 400}):
        set_faults(sim, **faults)
        for _ in range(count):
            peer.publish(command())
        total += count
        assert len(peer.events(total)) == total
    peer.publish(command(redirect={"DISPOSITIVO": "not digits"}))
    total += 1
    assert len(peer.events(total)) == total
    assert wait_until(lambda: sum(running.worker.state.handled.values()) == total, 15)


def test_label_cardinality_does_not_grow_with_the_number_of_commands() -> None:
    """Ten times the commands (each with its own ids) adds no series: no label holds an id."""
    with SimulatorThread(api_key=API_KEY) as sim:
        settings = private_settings("amqp://memory.invalid:1/%2F", sim.url)
        peer = memory_peer(settings, MemoryBroker())
        running = RunningWorker(settings, peer.connect)
        try:
            _round(running, peer, sim, 2)
            before = _series(running.worker.metrics.render().decode())
            _round(running, peer, sim, 20)
            text = running.worker.metrics.render().decode()
        finally:
            running.stop()
    assert _series(text) == before
    assert 'pabx_worker_commands_total{duplicate="false",status="accepted"} 22.0' in text
    # Every rejection (22 refused by the PABX, 2 invalid) is parked once.
    assert 'pabx_worker_commands_total{duplicate="false",status="rejected"} 24.0' in text
    assert "\npabx_worker_parked_total 24.0" in text
    assert len(before) < 150
