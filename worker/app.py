"""Wiring: build the worker's parts from settings, run it, close everything at the end."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from worker.circuit import CircuitBreaker, CircuitState
from worker.consumer import Worker
from worker.errors import ConfigurationError
from worker.leases import LeaseKeeper
from worker.logs import configure_logging
from worker.observability import HealthServer, MeteredPabx, Metrics
from worker.pabx import HttpPabx
from worker.pipeline import PabxClient, Policy, Processor
from worker.settings import Settings
from worker.store import open_store

__all__ = ["build_processor", "run_worker", "secrets_of"]

log = logging.getLogger("pabx_worker")


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value the process knows, for log redaction."""
    secrets = [t.api_key.get_secret_value() for t in settings.targets().values()]
    secrets += list(settings.device_passwords().values())
    return secrets


@contextmanager
def build_processor(settings: Settings, metrics: Metrics | None = None) -> Iterator[Processor]:
    """A Processor with its PABX client, store and lease keeper, closed on exit.

    The PABX client is layered: HTTP, timed for metrics. Each target has its own breaker.
    """
    targets = settings.require_targets()
    passwords = settings.device_passwords()
    policy = Policy.from_settings(settings)
    store = open_store(settings.store_url)
    http = HttpPabx(
        pool_size=settings.concurrency,
        connect_timeout_s=settings.pabx_connect_timeout_s,
        read_timeout_s=settings.pabx_read_timeout_s,
        idle_timeout_s=settings.pabx_idle_timeout_s,
    )
    timed: PabxClient = http if metrics is None else MeteredPabx(http, metrics)
    leases = LeaseKeeper(store, lease_s=policy.lease_s).start()
    try:
        yield Processor(
            pabx=timed,
            store=store,
            targets=targets,
            policy=policy,
            passwords=passwords,
            breakers={
                name: CircuitBreaker(
                    threshold=settings.circuit_threshold, reset_s=settings.circuit_reset_s
                )
                for name in targets
            },
            leases=leases,
        )
    finally:
        leases.stop()
        http.close()
        store.close()


def run_worker(settings: Settings) -> None:
    """``pabx-worker run``: consume until SIGTERM or SIGINT."""
    configure_logging(
        fmt=settings.log_format, level=settings.log_level, secrets=secrets_of(settings)
    )
    metrics = Metrics()
    with build_processor(settings, metrics) as processor:
        worker = Worker(settings, processor, metrics)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
            worker.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server = _health_server(settings, worker, processor)
        try:
            worker.run()
        finally:
            if server is not None:
                server.stop()
    log.info("stopped")


def _health_server(settings: Settings, worker: Worker, processor: Processor) -> HealthServer | None:
    """Serve /metrics, /healthz, /readyz on HTTP_PORT (0: not at all)."""
    if settings.http_port == 0:
        return None

    def ready() -> bool:
        state = worker.state
        store_up = processor.store_breaker.state is CircuitState.CLOSED
        return state.connected and state.consuming and store_up and processor.store_answers()

    try:
        server = HealthServer(
            host=settings.http_host, port=settings.http_port, metrics=worker.metrics, ready=ready
        )
    except OSError as exc:
        raise ConfigurationError(
            f"PABX_WORKER_HTTP_PORT: cannot listen on {settings.http_host}:{settings.http_port}:"
            f" {exc.strerror or exc}"
        ) from None
    log.info("serving /metrics, /healthz, /readyz", extra={"port": server.port})
    return server.start()
