"""The dashboard and the alerts on a real Prometheus: it scrapes a worker handling traffic with
faults injected and a private RabbitMQ node's rabbitmq_prometheus endpoint; every dashboard
query returns data, and the circuit-open alert fires while the PABX is down, then resolves."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import IN_CI
from tests.kit.processes import (
    ClusterURLs,
    WorkerProcess,
    find_sbin,
    free_port,
    local_cluster,
    set_faults,
    wait_until,
)
from tests.kit.prometheus import DEPLOY, PrometheusServer, prometheus
from tests.kit.proxy import TcpProxy
from tests.kit.rig import Rig
from tests.kit.samples import counted_command as command

pytestmark = pytest.mark.integration

#: First AMQP port tried for the private node (slots move on by 10 when taken).
BASE_PORT = 5741
#: The test's rules keep the shipped expressions with this ``for:`` so they fire in seconds.
TEST_FOR = "2s"


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterURLs]:
    """One private RabbitMQ node with the rabbitmq_prometheus plugin."""
    if find_sbin() is None:
        message = "rabbitmq-server is not on PATH: cannot start a private node"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: integration tests may not skip)")
        pytest.skip(message)
    prometheus()  # installs it first, or skips, before booting a node for nothing
    with local_cluster(
        tmp_path_factory.mktemp("rabbit-prom"), 1, BASE_PORT, slots=4, prometheus=True
    ) as urls:
        yield urls


def fast_rules(directory: Path) -> Path:
    """The shipped rules with every ``for:`` shortened to :data:`TEST_FOR`."""
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = TEST_FOR
    path = directory / "alerts.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


def dashboard_queries(queues: str) -> list[tuple[str, str]]:
    """(panel title, expression) of every dashboard target, its variables filled in."""
    board = json.loads((DEPLOY / "grafana" / "pabx-worker.json").read_text())
    values = {"$__rate_interval": "5s", "$instance": ".*", "$queues": queues}
    found = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in values.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, expr
            found.append((panel["title"], expr))
    return found


def circuit_alerts(server: PrometheusServer, state: str) -> list[dict[str, Any]]:
    return [
        alert
        for alert in server.alerts()
        if alert["labels"]["alertname"] == "PabxWorkerCircuitOpen" and alert["state"] == state
    ]


def publish(rig: Rig, count: int) -> list[str]:
    ids = [f"prom-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
    rig.publish(command(i) for i in ids)
    return ids


@pytest.mark.timeout(300)
def test_dashboard_queries_return_data_and_the_circuit_alert_fires_and_resolves(
    rabbit: ClusterURLs, tmp_path: Path
) -> None:
    node = rabbit.cluster.nodes[0]
    rig = Rig(rabbit[0], circuit_threshold=3, circuit_reset_s=1.0, retry_in_process_attempts=1)
    pabx = TcpProxy.for_url(rig.sim.url, 80)
    port = free_port()
    settings = rig.variant(pabx_url=pabx.url(rig.sim.url), http_port=port, http_host="127.0.0.1")
    worker = WorkerProcess(settings)
    server: PrometheusServer | None = None
    try:
        worker.wait_ready()
        server = PrometheusServer(
            tmp_path,
            {
                "pabx-worker": {"targets": [f"127.0.0.1:{port}"]},
                "rabbitmq": {
                    "targets": [f"127.0.0.1:{node.prometheus_port}"],
                    "metrics_path": "/metrics/detailed",
                    "params": {"family": ["queue_coarse_metrics"]},
                },
            },
            rule_files=[fast_rules(tmp_path)],
        )
        started = time.time()
        assert wait_until(server.targets_up, 30, 0.5), server.log[-3000:]

        # Traffic with faults: slow answers, two 503s (retried: fewer than the breaker's
        # threshold, so it stays closed), then refusals (rejected).
        set_faults(rig.sim, latency_ms=5, latency_max_ms=60, fail_next=2, fail_status=503)
        ids = publish(rig, 20)
        assert rig.wait_outcomes(ids, 60)
        set_faults(rig.sim, error_rate=1.0, fail_status=400)
        ids = publish(rig, 2)
        assert rig.wait_outcomes(ids, 30)
        set_faults(rig.sim)
        assert circuit_alerts(server, "pending") == circuit_alerts(server, "firing") == []

        # The PABX goes down: the breaker opens and the alert fires, for the right target.
        pabx.refuse()
        during = publish(rig, 5)
        assert wait_until(lambda: circuit_alerts(server, "firing"), 60, 0.5), worker.log[-3000:]
        assert [a["labels"]["target"] for a in circuit_alerts(server, "firing")] == ["default"]

        # It comes back: the commands go through and the alert resolves.
        pabx.restore()
        assert rig.wait_outcomes(during, 60)
        assert wait_until(lambda: not circuit_alerts(server, "firing"), 60, 0.5)

        queues = f"{settings.command_queue}|{settings.parked_queue}"
        empty = [
            f"{title}: {expr}"
            for title, expr in dashboard_queries(queues)
            if not server.query_range(expr, started)
        ]
        assert empty == []
    finally:
        if server is not None:
            server.close()
        worker.terminate(30)
        worker.close()
        pabx.close()
        rig.close()
