"""The simulator over HTTPS and mutual TLS, as a thread and as ``pabx-worker simulate``."""

from __future__ import annotations

import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.certs import Authority, Leaf
from tests.kit.samples import VENDOR_EXAMPLE
from worker.tools.simulator import SimulatorThread, tls_context

KEY = "sim-tls-key"
TIMEOUT = 5
CLI = [sys.executable, "-m", "worker", "simulate", "--host", "127.0.0.1", "--api-key", KEY]


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Leaf
    client: Leaf


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = Authority(tmp_path_factory.mktemp("pki"), "simulator CA")
    return Pki(
        ca=ca,
        server=ca.issue("simulator", hosts=("localhost", "127.0.0.1")),
        client=ca.issue("caller", client=True),
    )


@pytest.fixture
def mtls_sim(pki: Pki) -> Iterator[SimulatorThread]:
    with SimulatorThread(
        api_key=KEY, tls_cert=pki.server.cert, tls_key=pki.server.key, client_ca=pki.ca.cert
    ) as sim:
        yield sim


def redirect(url: str, pki: Pki, **kwargs: Any) -> requests.Response:
    return requests.post(
        f"{url}/requests/17/executa-desvio",
        json=VENDOR_EXAMPLE,
        headers={"x-api-key": KEY},
        verify=str(pki.ca.cert),
        timeout=TIMEOUT,
        **kwargs,
    )


def client_tls(pki: Pki, *, with_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca.cert)
    if with_cert:
        context.load_cert_chain(pki.client.cert, pki.client.key)
    return context


# --- serving ----------------------------------------------------------------------------


def test_serves_https_with_a_certificate(pki: Pki) -> None:
    with SimulatorThread(api_key=KEY, tls_cert=pki.server.cert, tls_key=pki.server.key) as sim:
        assert sim.url.startswith("https://127.0.0.1:")
        assert redirect(sim.url, pki).status_code == 200
        recorded = requests.get(f"{sim.url}/_sim/requests", verify=str(pki.ca.cert), timeout=5)
        [entry] = recorded.json()["requests"]
        assert entry["status"] == 200 and entry["body"] == VENDOR_EXAMPLE


def test_mutual_tls_serves_a_client_with_a_certificate(mtls_sim: SimulatorThread, pki: Pki) -> None:
    answer = redirect(mtls_sim.url, pki, cert=(str(pki.client.cert), str(pki.client.key)))
    assert answer.status_code == 200


def test_mutual_tls_refuses_a_client_without_one_and_says_why(
    mtls_sim: SimulatorThread, pki: Pki
) -> None:
    host, port = mtls_sim.url.removeprefix("https://").split(":")
    request = b"GET /_sim/health HTTP/1.1\r\nHost: x\r\n\r\n"
    with (
        socket.create_connection((host, int(port)), timeout=TIMEOUT) as raw,
        client_tls(pki, with_cert=False).wrap_socket(raw, server_hostname=host) as conn,
    ):
        conn.sendall(request)  # TLS 1.3: the server checks our (missing) certificate now
        with pytest.raises(ssl.SSLError, match="certificate required"):
            conn.recv(4096)
    with_cert = requests.get(
        f"{mtls_sim.url}/_sim/requests",
        verify=str(pki.ca.cert),
        cert=(str(pki.client.cert), str(pki.client.key)),
        timeout=TIMEOUT,
    )
    assert with_cert.json()["requests"] == []


def test_stop_is_not_blocked_by_tls_connections(mtls_sim: SimulatorThread, pki: Pki) -> None:
    cert = (str(pki.client.cert), str(pki.client.key))
    requests.put(
        f"{mtls_sim.url}/_sim/faults",
        json={"hang": True},
        verify=str(pki.ca.cert),
        cert=cert,
        timeout=TIMEOUT,
    )
    host, port = mtls_sim.url.removeprefix("https://").split(":")
    idle = requests.Session()
    health = f"{mtls_sim.url}/_sim/health"
    assert idle.get(health, verify=str(pki.ca.cert), cert=cert, timeout=TIMEOUT).ok
    with (
        socket.create_connection((host, int(port)), timeout=TIMEOUT) as raw,
        client_tls(pki).wrap_socket(raw, server_hostname=host) as hanging,
    ):
        hanging.sendall(
            f"POST /requests/1/executa-desvio HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n"
            "Content-Length: 2\r\n\r\n{}".encode()
        )
        time.sleep(0.2)
        started = time.monotonic()
        mtls_sim.stop()  # a hanging request and a keep-alive connection, both over TLS
        assert time.monotonic() - started < 3
    idle.close()


# --- bad TLS arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"tls_key": "key"}, "--tls-key needs --tls-cert"),
        ({"tls_cert": "cert"}, "--tls-cert needs --tls-key"),
        ({"client_ca": "ca"}, "--client-ca needs --tls-cert and --tls-key"),
        ({"tls_key": "key", "client_ca": "ca"}, "--tls-key needs --tls-cert"),
    ],
)
def test_incomplete_tls_arguments_are_refused(
    pki: Pki, given: dict[str, str], message: str
) -> None:
    paths = {"cert": pki.server.cert, "key": pki.server.key, "ca": pki.ca.cert}
    arguments: dict[str, Any] = {name: paths[which] for name, which in given.items()}
    with pytest.raises(ValueError, match=message):
        SimulatorThread(api_key=KEY, **arguments)


def test_unreadable_or_unusable_tls_files_are_refused(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ValueError, match=r"--tls-cert: cannot read .*missing\.pem"):
        tls_context(missing, pki.server.key)
    with pytest.raises(ValueError, match=r"--tls-key: cannot read .*missing\.pem"):
        tls_context(pki.server.cert, missing)
    with pytest.raises(ValueError, match=r"--client-ca: cannot read .*missing\.pem"):
        tls_context(pki.server.cert, pki.server.key, missing)
    with pytest.raises(ValueError, match=r"--tls-cert/--tls-key: cannot load"):
        tls_context(pki.server.cert, pki.client.key)  # a key of another certificate
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=r"--client-ca: cannot load .*junk\.pem"):
        tls_context(pki.server.cert, pki.server.key, junk)
    assert tls_context(None, None) is None


# --- the command line -------------------------------------------------------------------------


def test_cli_serves_https_on_the_port_it_prints(pki: Pki) -> None:
    tls = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    proc = subprocess.Popen([*CLI, "--port", "0", *tls], stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().strip()
        assert line.startswith("pabx simulator listening on https://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1]
        assert not url.endswith(":0")
        assert redirect(url, pki).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-key", "KEY"], "--tls-key needs --tls-cert"),
        (["--client-ca", "CA"], "--client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "MISSING", "--tls-key", "KEY"], "--tls-cert: cannot read"),
    ],
)
def test_cli_refuses_bad_tls_flags_in_one_line(
    pki: Pki, tmp_path: Path, flags: list[str], message: str
) -> None:
    paths = {"KEY": pki.server.key, "CA": pki.ca.cert, "MISSING": tmp_path / "missing.pem"}
    argv = [str(paths.get(flag, flag)) for flag in flags]
    done = subprocess.run(
        [*CLI, "--port", "0", *argv], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("pabx-worker: ") and message in line
    assert "Traceback" not in done.stderr
