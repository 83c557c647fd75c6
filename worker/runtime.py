"""Wiring: build the worker's parts from settings, run it, close everything at the end."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from urllib.parse import urlsplit

from worker.adapters.pabx import HttpPabx
from worker.adapters.store import Store, open_store, redact_url
from worker.adapters.systemd import Notifier
from worker.consume.circuit import CircuitBreaker, CircuitState
from worker.consume.consumer import Worker
from worker.consume.leases import LeaseKeeper
from worker.consume.observability import Exposition, HealthServer, MeteredPabx, Metrics
from worker.consume.pipeline import PabxClient, Policy, Processor
from worker.contract.errors import ConfigurationError, StoreError
from worker.contract.settings import PabxTarget, Settings
from worker.logs import SERVICE, configure_logging, package_version, redact_text
from worker.tracing import NO_TRACING, Tracing, tracing_from_env

__all__ = [
    "PROCESS_INDEX_ENV",
    "SUPERVISOR_PID_ENV",
    "build_processor",
    "run_worker",
    "secrets_of",
    "serve_health",
    "store_label",
    "tune_gc",
]

log = logging.getLogger("pabx_worker")

#: How often a store that stopped answering is pinged again (so a paused consumer resumes).
STORE_RECHECK_S = 1.0
#: Set by ``run --processes N`` in each worker it starts: the worker's place, 0 to N-1.
#: Not a ``PABX_WORKER_*`` name: those are settings, and an unknown one is an error.
PROCESS_INDEX_ENV = "PABX_PROCESS_INDEX"
#: The supervisor's pid, set in its children's environment (:func:`end_with_supervisor`).
SUPERVISOR_PID_ENV = "PABX_SUPERVISOR_PID"
#: ``prctl`` option: the signal a process gets when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value the process knows, for log redaction."""
    secrets = [t.api_key.get_secret_value() for t in settings.targets().values()]
    secrets += list(settings.device_passwords().values())
    return secrets


def store_label(url: str) -> str:
    """The store URL fit for logs: any password masked (URL userinfo or ``password=``)."""
    return redact_text(redact_url(url))


def _origin(url: str) -> str:
    """``scheme://host:port`` of a PABX URL: no credentials, no path."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def _log_dependencies(settings: Settings, targets: dict[str, PabxTarget]) -> None:
    """One INFO line per dependency, where it is and never its credentials."""
    for url in (u.strip() for u in settings.amqp_url.split(";")):
        if url:
            where = redact_url(url)
            log.info("broker at %s", where, extra={"dependency": "broker", "at": where})
    where = store_label(settings.store_url)
    log.info("store at %s", where, extra={"dependency": "store", "at": where})
    for name, target in targets.items():
        where = _origin(target.url)
        log.info(
            "PABX target %s at %s",
            name,
            where,
            extra={"dependency": "pabx", "target": name, "at": where},
        )


def _first_ping(store: Store, processor: Processor, label: str) -> None:
    """Ping the store once at start; if it does not answer, warn and stay not ready.

    The open store circuit keeps the consumer paused and ``/readyz`` at 503 until a ping
    answers (:class:`_StoreWatch`).
    """
    try:
        store.ping()
    except StoreError as exc:
        processor.store_breaker.failure()
        log.warning(
            "the store does not answer; not consuming until it does",
            extra={"dependency": "store", "at": label, "error": str(exc)},
        )
        return
    processor.store_breaker.success()
    log.info("the store answers", extra={"dependency": "store", "at": label})


@contextmanager
def build_processor(
    settings: Settings,
    metrics: Metrics | None = None,
    *,
    check_store: bool = False,
    tracing: Tracing = NO_TRACING,
) -> Iterator[Processor]:
    """A Processor with its PABX client, store and lease keeper, closed on exit.

    The PABX client is layered: HTTP, timed for metrics. Each target has its own breaker.
    ``check_store`` pings the store once before handing the Processor out (``run``).
    """
    targets = settings.require_targets()
    passwords = settings.device_passwords()
    policy = Policy.from_settings(settings)
    http = HttpPabx(  # first: it checks the TLS files of every target
        pool_size=settings.concurrency,
        connect_timeout_s=settings.pabx_connect_timeout_s,
        read_timeout_s=settings.pabx_read_timeout_s,
        idle_timeout_s=settings.pabx_idle_timeout_s,
        targets=targets,
        tracing=tracing,
    )
    try:
        store = open_store(settings.store_url)
    except BaseException:
        http.close()
        raise
    timed: PabxClient = http if metrics is None else MeteredPabx(http, metrics)
    leases = LeaseKeeper(store, lease_s=policy.lease_s).start()
    try:
        processor = Processor(
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
            tracing=tracing,
        )
        if check_store:
            _first_ping(store, processor, store_label(settings.store_url))
        yield processor
    finally:
        leases.stop()
        http.close()
        store.close()


#: Allocations between young collections (CPython's default is 700), and the older two.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """Fewer, cheaper garbage collections for a long-running worker.

    Every command allocates thousands of short-lived objects, nearly all freed by reference
    counting; at CPython's default a young collection runs every few commands. Everything
    built at start (imports, settings, clients) is frozen out of later collections. The
    bench measured a few per cent less CPU per command (``--kinds worker,worker:gc-default``).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_worker(settings: Settings) -> None:
    """``pabx-worker run``: consume until SIGTERM or SIGINT."""
    tracing = _tracing()
    configure_logging(
        fmt=settings.log_format,
        level=settings.log_level,
        secrets=secrets_of(settings),
        trace_ids=tracing.log_ids if tracing.enabled else None,
    )
    index = os.environ.get(PROCESS_INDEX_ENV)
    if index is not None:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_ProcessIndex(index))
    supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
    if supervisor.isdigit() and not end_with_supervisor(int(supervisor)):
        log.warning("the supervisor is gone; not starting")
        return
    _log_dependencies(settings, settings.require_targets())
    metrics = Metrics()
    try:
        _run(settings, metrics, tracing)
    finally:
        tracing.shutdown()
    log.info("stopped")


def end_with_supervisor(supervisor: int) -> bool:
    """A child of ``run --processes N``: SIGTERM when the supervisor dies, however it dies.

    On Linux the kernel sends it (``PR_SET_PDEATHSIG``), so a supervisor killed with
    SIGKILL leaves no worker behind: each drains its commands and stops, as on the
    supervisor's own SIGTERM. Elsewhere nothing is asked for. False when the supervisor is
    gone already (the child's parent is no longer it).
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return os.getppid() == supervisor  # checked after asking: no death goes unnoticed


class _ProcessIndex(logging.Filter):
    """Adds ``process_index`` to every record: which of ``--processes N`` logged it."""

    def __init__(self, index: str) -> None:
        super().__init__()
        self._index = int(index) if index.isdigit() else index

    def filter(self, record: logging.LogRecord) -> bool:
        record.process_index = self._index
        return True


def _tracing() -> Tracing:
    """OpenTelemetry when an ``OTEL_*`` variable is set; it needs the ``otel`` extra."""
    try:
        return tracing_from_env(service=SERVICE, version=package_version())
    except ImportError as exc:
        raise ConfigurationError(
            f"OTEL_* variables are set but OpenTelemetry is not installed ({exc.name}):"
            " install pabx-worker[otel], or unset them"
        ) from None


def _run(settings: Settings, metrics: Metrics, tracing: Tracing) -> None:
    notifier = Notifier()  # systemd Type=notify: NOTIFY_SOCKET, WATCHDOG_USEC
    with (
        contextlib.closing(notifier),
        build_processor(settings, metrics, check_store=True, tracing=tracing) as processor,
    ):
        worker = Worker(settings, processor, metrics, notifier=notifier)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
            notifier.stopping()
            worker.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        server = _health_server(settings, worker, processor)
        watch = _StoreWatch(processor, store_label(settings.store_url)).start()
        tune_gc()
        try:
            worker.run()
        finally:
            watch.stop()
            if server is not None:
                server.stop()


class _StoreWatch:
    """Pings the store while its circuit is not closed, until it answers again.

    Nothing else would: the consumer pauses while the store circuit is open (so no command
    meets the store), and ``/readyz`` looks at the circuit before it pings (and is not
    served at all with ``HTTP_PORT=0``). Started and stopped by :func:`run_worker`, before
    the store is closed.
    """

    def __init__(self, processor: Processor, label: str, every_s: float = STORE_RECHECK_S):
        self._processor = processor
        self._label = label
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pabx-store-watch", daemon=True)

    def start(self) -> _StoreWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        breaker = self._processor.store_breaker
        was_down = breaker.state is not CircuitState.CLOSED
        while not self._stop.wait(self._every_s):
            up = breaker.state is CircuitState.CLOSED or self._processor.store_answers()
            if up and was_down:
                log.info(
                    "the store answers again", extra={"dependency": "store", "at": self._label}
                )
            was_down = not up


def _health_server(settings: Settings, worker: Worker, processor: Processor) -> HealthServer | None:
    """Serve /metrics, /healthz, /readyz on HTTP_PORT (0: not at all)."""
    if settings.http_port == 0:
        return None

    def ready() -> bool:
        state = worker.state
        store_up = processor.store_breaker.state is CircuitState.CLOSED
        return state.connected and state.consuming and store_up and processor.store_answers()

    worker.metrics.ready.set_function(lambda: int(ready()))
    return serve_health(settings, worker.metrics, ready, "serving /metrics, /healthz, /readyz")


def serve_health(
    settings: Settings, metrics: Exposition, ready: Callable[[], bool], started: str
) -> HealthServer:
    """Start /metrics, /healthz, /readyz on HTTP_HOST:HTTP_PORT and log ``started``; a port
    that cannot be had is a ConfigurationError naming the setting."""
    try:
        server = HealthServer(
            host=settings.http_host, port=settings.http_port, metrics=metrics, ready=ready
        )
    except OSError as exc:
        raise ConfigurationError(
            f"PABX_WORKER_HTTP_PORT: cannot listen on {settings.http_host}:{settings.http_port}:"
            f" {exc.strerror or exc}"
        ) from None
    log.info(started, extra={"port": server.port})
    return server.start()
