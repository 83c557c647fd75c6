"""Wiring: build the worker's parts from settings, run it, close everything at the end."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from worker.circuit import CircuitBreaker
from worker.consumer import Worker
from worker.logs import configure_logging
from worker.pabx import HttpPabx
from worker.pipeline import Policy, Processor
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
def build_processor(settings: Settings) -> Iterator[Processor]:
    """A Processor with its PABX session and store, closed on exit."""
    targets = settings.require_targets()
    passwords = settings.device_passwords()
    store = open_store(settings.store_url)
    pabx = HttpPabx(
        pool_size=settings.concurrency,
        connect_timeout_s=settings.pabx_connect_timeout_s,
        read_timeout_s=settings.pabx_read_timeout_s,
    )
    try:
        yield Processor(
            pabx=pabx,
            store=store,
            targets=targets,
            policy=Policy.from_settings(settings),
            passwords=passwords,
            breaker=CircuitBreaker(
                threshold=settings.circuit_threshold, reset_s=settings.circuit_reset_s
            ),
        )
    finally:
        pabx.close()
        store.close()


def run_worker(settings: Settings) -> None:
    """``pabx-worker run``: consume until SIGTERM or SIGINT."""
    configure_logging(
        fmt=settings.log_format, level=settings.log_level, secrets=secrets_of(settings)
    )
    with build_processor(settings) as processor:
        worker = Worker(settings, processor)

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("stopping", extra={"signal": signal.Signals(signum).name})
            worker.stop()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        worker.run()
    log.info("stopped")
