"""Metrics (Prometheus) and the HTTP endpoint serving ``/metrics``, ``/healthz``, ``/readyz``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import PackageNotFoundError, version
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from worker.consume.pipeline import PabxClient
from worker.contract.errors import PabxError
from worker.contract.settings import PabxTarget

__all__ = [
    "CIRCUIT_VALUES",
    "LATENCY_BUCKETS",
    "Exposition",
    "HealthServer",
    "MeteredPabx",
    "Metrics",
    "merge_expositions",
    "pabx_result",
    "worker_version",
]

log = logging.getLogger("pabx_worker.http")

#: Value of the circuit gauge for each breaker state.
CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}
#: Buckets that fit a PABX request, and a command's outcome: 5 ms to 10 s.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def worker_version() -> str:
    """The installed distribution's version (``unknown`` when run from a bare checkout)."""
    try:
        return version("pabx-worker")
    except PackageNotFoundError:
        return "unknown"


def pabx_result(status_code: int | None, code: str) -> str:
    """The ``result`` label of a failed PABX request: an HTTP status, else our error code.

    Both sets are finite (an int outside 100-599 is not a status), so the label stays bounded.
    """
    if status_code is not None and 100 <= status_code <= 599:
        return str(status_code)
    return str(code)


class Metrics:
    """Every metric pabx-worker exports, on a registry of its own.

    Label values come from finite sets only: outcome statuses, configured target names,
    HTTP statuses or error codes, ``true``/``false``, and the version. Never an id.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.build_info = Gauge(
            "pabx_worker_build_info",
            "Always 1, labelled by the running version.",
            ["version"],
            registry=self.registry,
        )
        self.build_info.labels(worker_version()).set(1)
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
        self.parked = Counter(
            "pabx_worker_parked",
            "Failed commands copied to the parked queue.",
            registry=self.registry,
        )
        self.outcome_seconds = Histogram(
            "pabx_worker_outcome_seconds",
            "Time from a command's delivery to its outcome, by outcome status.",
            ["status"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.pabx_seconds = Histogram(
            "pabx_worker_pabx_request_seconds",
            "Duration of PABX requests, by target and result.",
            ["target", "result"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
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
        self.consuming = Gauge(
            "pabx_worker_consuming",
            "1 while a consumer is attached to the command queue.",
            registry=self.registry,
        )
        self.ready = Gauge(
            "pabx_worker_ready",
            "1 while /readyz answers 200.",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Exposition(Protocol):
    """What :class:`HealthServer` serves on ``/metrics``: :class:`Metrics`, or a group's."""

    def render(self) -> bytes: ...


def merge_expositions(texts: Mapping[str, str], label: str) -> list[Metric]:
    """Several expositions as one: every sample gains ``label`` set to its text's key.

    A family found in several texts is one family (HELP and TYPE of the first); a text that
    does not parse is left out.
    """
    merged: dict[str, Metric] = {}
    for value, text in texts.items():
        try:
            families = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        for family in families:
            into = merged.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            into.samples += [s._replace(labels={**s.labels, label: value}) for s in family.samples]
    return list(merged.values())


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
            result = pabx_result(exc.status_code, exc.code)
            raise
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.pabx_seconds.labels(target.name, result).observe(elapsed)


class HealthServer:
    """``/metrics``, ``/healthz`` (process alive) and ``/readyz`` on a background thread."""

    def __init__(
        self, *, host: str, port: int, metrics: Exposition, ready: Callable[[], bool]
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


def _handler(metrics: Exposition, ready: Callable[[], bool]) -> type[BaseHTTPRequestHandler]:
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
