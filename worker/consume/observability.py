"""Metrics (Prometheus) and the HTTP endpoint serving ``/metrics``, ``/healthz``, ``/readyz``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from worker.consume.pipeline import PabxClient
from worker.contract.errors import PabxError
from worker.contract.settings import PabxTarget

__all__ = ["CIRCUIT_VALUES", "HealthServer", "MeteredPabx", "Metrics"]

log = logging.getLogger("pabx_worker.http")

#: Value of the circuit gauge for each breaker state.
CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    """Every metric pabx-worker exports, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.commands = Counter(
            "pabx_worker_commands",
            "Commands finished, by outcome status.",
            ["status", "duplicate"],
            registry=self.registry,
        )
        self.retries = Counter(
            "pabx_worker_retries",
            "Commands sent to a broker-held retry queue.",
            registry=self.registry,
        )
        self.pabx_seconds = Histogram(
            "pabx_worker_pabx_request_seconds",
            "Duration of PABX requests, by target and result.",
            ["target", "result"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.queue_seconds = Histogram(
            "pabx_worker_queue_seconds",
            "Time from the command's timestamp (AMQP timestamp or issued_at) to its delivery.",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300),
        )
        self.in_flight = Gauge(
            "pabx_worker_in_flight", "Commands being handled.", registry=self.registry
        )
        self.circuit = Gauge(
            "pabx_worker_circuit_state",
            "PABX target's circuit: 0 closed, 1 half-open, 2 open.",
            ["target"],
            registry=self.registry,
        )
        self.store_up = Gauge(
            "pabx_worker_store_up",
            "1 while the idempotency store answers (its circuit is closed).",
            registry=self.registry,
        )
        self.connected = Gauge(
            "pabx_worker_broker_connected",
            "1 while connected to the broker.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MeteredPabx:
    """Wraps a :class:`~worker.consume.pipeline.PabxClient`, timing every request."""

    def __init__(self, inner: PabxClient, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def redirect(self, target: PabxTarget, channel_id: int, body: Mapping[str, str]) -> int:
        started = time.perf_counter()
        result = "200"
        try:
            return self._inner.redirect(target, channel_id, body)
        except PabxError as exc:
            result = str(exc.status_code or exc.code)
            raise
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.pabx_seconds.labels(target.name, result).observe(elapsed)


class HealthServer:
    """``/metrics``, ``/healthz`` (process alive) and ``/readyz`` on a background thread."""

    def __init__(
        self, *, host: str, port: int, metrics: Metrics, ready: Callable[[], bool]
    ) -> None:
        handler = _handler(metrics, ready)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="pabx-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _handler(metrics: Metrics, ready: Callable[[], bool]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, metrics.render(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._reply(200, b"ok\n")
            elif path == "/readyz":
                ok = ready()
                self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._reply(404, b"not found\n")

        def _reply(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return None  # probes every few seconds would flood the log

    return Handler
