"""The CLI and the worker over ``amqps://``, configured the way operators do it (SPEC §9)."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.kit.processes import CLI
from tests.kit.topology import private_settings
from tests.tls.conftest import Pki, TlsBrokers
from worker.consume.consumer import Worker
from worker.contract.errors import ConfigurationError
from worker.contract.settings import Settings
from worker.runtime import build_processor

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: A PABX nobody calls: these tests only connect and declare.
NO_PABX = "http://127.0.0.1:9"


def declare(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PABX_WORKER_")}
    return subprocess.run(
        [*CLI, "topology", "declare"],
        env={**clean, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_until_consuming(settings: Settings, timeout_s: float = 30.0) -> BaseException | None:
    """Run a worker until it consumes (None) or ends (its error); then stop it."""
    errors: list[BaseException] = []
    with build_processor(settings) as processor:
        worker = Worker(settings, processor)

        def run() -> None:
            try:
                worker.run()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, name="tls-worker", daemon=True)
        thread.start()
        deadline = time.monotonic() + timeout_s
        while not worker.ready.wait(0.05) and thread.is_alive():
            assert time.monotonic() < deadline, "the worker neither consumed nor stopped"
        worker.stop()
        thread.join(30)
    return errors[0] if errors else None


def test_topology_declare_over_tls(tls_brokers: TlsBrokers, pki: Pki, tmp_path: Path) -> None:
    done = declare(
        tmp_path,
        PABX_WORKER_AMQP_URL=tls_brokers.verified,
        PABX_WORKER_AMQP_CA_FILE=str(pki.ca),
    )
    assert done.returncode == 0, done.stderr
    assert "topology declared" in done.stderr


def test_topology_declare_without_the_ca_exits_2(tls_brokers: TlsBrokers, tmp_path: Path) -> None:
    done = declare(tmp_path, PABX_WORKER_AMQP_URL=tls_brokers.verified)
    assert done.returncode == 2, done.stderr
    assert "certificate verify failed" in done.stderr
    assert "PABX_WORKER_AMQP_CA_FILE" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_worker_consumes_over_mutual_tls(tls_brokers: TlsBrokers, pki: Pki) -> None:
    settings = private_settings(
        tls_brokers.mutual,
        NO_PABX,
        amqp_ca_file=pki.ca,
        amqp_cert_file=pki.client.cert,
        amqp_key_file=pki.client.key,
    )
    assert run_until_consuming(settings) is None


def test_the_worker_stops_on_a_certificate_failure(tls_brokers: TlsBrokers, pki: Pki) -> None:
    settings = private_settings(tls_brokers.other_host, NO_PABX, amqp_ca_file=pki.ca)
    error = run_until_consuming(settings)
    assert isinstance(error, ConfigurationError), error
    assert "certificate verify failed" in str(error)
