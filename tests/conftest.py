"""Shared fixtures: real services on this machine, skipped locally when absent, fatal under CI."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest

#: Under CI a missing server is a failure, never a skip.
IN_CI = os.environ.get("CI", "").lower() == "true"

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _port_open(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def require_service(name: str, probe: Callable[[], bool]) -> None:
    """Skip the test when a server is missing; fail instead under ``CI=true``."""
    if probe():
        return
    message = f"{name} is not answering"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: integration tests may not skip)")
    pytest.skip(message)


@pytest.fixture
def clean_worker_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``PABX_WORKER_*`` variable and no ``CREDENTIALS_DIRECTORY`` from the caller's
    environment: a test's settings are exactly what it gives."""
    from worker.contract.settings import CREDENTIALS_ENV, ENV_PREFIX

    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    monkeypatch.delenv(CREDENTIALS_ENV, raising=False)


@pytest.fixture(scope="session")
def amqp_url() -> str:
    require_service("RabbitMQ", lambda: _port_open(AMQP_URL, 5672))
    return AMQP_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_service("Redis", lambda: _port_open(REDIS_URL, 6379))
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_url() -> str:
    require_service("PostgreSQL", lambda: _port_open(POSTGRES_URL, 5432))
    return POSTGRES_URL
