"""Metrics and the health endpoint, over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from worker.consume.observability import HealthServer, MeteredPabx, Metrics
from worker.contract.errors import PabxUnavailable
from worker.contract.settings import PabxTarget
from worker.tools.fakes import FakePabx

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
