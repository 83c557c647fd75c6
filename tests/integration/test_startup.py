"""Start-up: ``pabx-worker run`` names its dependencies and copes with a store that is down.

A real worker process starts with a Redis store URL whose port nothing listens on: it logs
where the broker, the store and the PABX are (no password, no key), warns at once that the
store does not answer, and stays not ready (``/readyz`` 503, not consuming). Then a private
``redis-server`` starts on that port and the worker becomes ready on its own, also with
``HTTP_PORT=0``, where no readiness probe pings the store for it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import require_service
from tests.kit.processes import WorkerProcess, free_port, start_redis, wait_until
from tests.kit.topology import private_settings

pytestmark = pytest.mark.integration

STORE_PASSWORD = "Redis-Pw-5c1e"
API_KEY = "Startup-Key-31f9"
#: A PABX nobody calls in these tests (no command is sent).
PABX_URL = "http://127.0.0.1:9/pabx"
STORE_DOWN = "the store does not answer; not consuming until it does"


class RedisServer:
    """A private ``redis-server`` on ``port``, started on demand, stopped at the end."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self._dir = directory
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self._proc = start_redis(self._dir, self.port, password=STORE_PASSWORD)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    require_service("redis-server (binary)", lambda: shutil.which("redis-server") is not None)
    server = RedisServer(free_port(), tmp_path)
    yield server
    server.stop()


def _readyz(port: int) -> int | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
    except requests.RequestException:
        return None


def _entries(worker: WorkerProcess, message: str) -> list[dict[str, Any]]:
    found = []
    for line in worker.lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("message") == message:
            found.append(entry)
    return found


@pytest.mark.timeout(60)
@pytest.mark.parametrize("http", [True, False], ids=["http", "no-http"])
def test_store_down_at_start_warns_stays_unready_then_recovers(
    amqp_url: str, redis_server: RedisServer, http: bool
) -> None:
    http_port = free_port() if http else 0
    store_url = f"redis://:{STORE_PASSWORD}@127.0.0.1:{redis_server.port}/0"
    settings = private_settings(
        amqp_url, PABX_URL, store_url=store_url, http_port=http_port, pabx_api_key=API_KEY
    )
    started = time.monotonic()
    worker = WorkerProcess(settings)
    try:
        assert wait_until(lambda: _entries(worker, STORE_DOWN), 5), worker.log[-3000:]
        warned_after = time.monotonic() - started
        print(f"store warning {warned_after:.2f} s after start")
        [warning] = _entries(worker, STORE_DOWN)
        assert warning["level"] == "WARNING"
        assert warning["at"] == f"redis://:***@127.0.0.1:{redis_server.port}/0"

        messages = worker.messages()
        assert "broker at amqp://guest:***@127.0.0.1:5672/%2F" in messages, messages
        assert f"store at redis://:***@127.0.0.1:{redis_server.port}/0" in messages
        assert "PABX target default at http://127.0.0.1:9" in messages

        # Connected to the broker, yet neither consuming nor ready while the store is down.
        assert wait_until(lambda: "connected to the broker" in worker.messages(), 15)
        if http:
            assert wait_until(lambda: _readyz(http_port) is not None, 10)
            assert _readyz(http_port) == 503
        time.sleep(1.5)  # a few store re-checks: still down, still not consuming
        assert not worker.consuming.is_set()
        if http:
            assert _readyz(http_port) == 503

        redis_server.start()
        assert worker.consuming.wait(15), worker.log[-3000:]
        if http:
            assert wait_until(lambda: _readyz(http_port) == 200, 10)
        assert "the store answers again" in worker.messages()

        code, _ = worker.terminate(20)
        assert code == 0, worker.log[-3000:]
    finally:
        worker.close()
    log = worker.log
    assert STORE_PASSWORD not in log and API_KEY not in log
    assert warned_after < 5, f"warned {warned_after:.1f} s after start"
