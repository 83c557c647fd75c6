"""The worker's HTTP endpoint: /healthz, /readyz following the broker, /metrics counting."""

from __future__ import annotations

import uuid

import pytest
import requests

from tests.kit.processes import WorkerProcess, free_port, wait_until
from tests.kit.proxy import TcpProxy
from tests.kit.rig import Rig
from tests.kit.samples import counted_command as command

pytestmark = pytest.mark.integration


def status(url: str) -> int:
    try:
        return requests.get(url, timeout=2).status_code
    except requests.ConnectionError:
        return 0


@pytest.mark.timeout(120)
def test_readyz_flips_with_the_broker_and_metrics_count_outcomes(amqp_url: str) -> None:
    rig = Rig(amqp_url)
    proxy = TcpProxy.for_url(amqp_url, 5672)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    worker = WorkerProcess(
        rig.settings.model_copy(update={"amqp_url": proxy.url(amqp_url)}),
        PABX_WORKER_HTTP_PORT=str(port),
        PABX_WORKER_HTTP_HOST="127.0.0.1",
    )
    try:
        worker.wait_ready()
        assert wait_until(lambda: status(f"{base}/readyz") == 200, 20)
        assert status(f"{base}/healthz") == 200
        ids = [f"http-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
        rig.publish(command(i) for i in ids)
        assert rig.wait_outcomes(ids, 20)
        metrics = requests.get(f"{base}/metrics", timeout=2).text
        assert 'pabx_worker_commands_total{duplicate="false",status="accepted"} 3.0' in metrics
        assert "pabx_worker_pabx_request_seconds_count" in metrics
        assert rig.settings.pabx_api_key.get_secret_value() not in metrics  # type: ignore[union-attr]

        with proxy.outage("refuse"):
            assert wait_until(lambda: status(f"{base}/readyz") == 503, 20)
            assert status(f"{base}/healthz") == 200  # alive, just not ready
        assert wait_until(lambda: status(f"{base}/readyz") == 200, 30)
        more = [f"http-{uuid.uuid4().hex[:8]}-after"]
        rig.publish(command(i) for i in more)
        assert rig.wait_outcomes(more, 20)
    finally:
        worker.terminate(30)
        worker.close()
        proxy.close()
        rig.close()
