"""HttpPabx over real TLS: the simulator serves HTTPS on 127.0.0.1 with certificates made here."""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3
from pydantic import SecretStr
from urllib3.util.ssl_ import create_urllib3_context

import worker.adapters.pabx
from tests.certs import PabxPki as Pki
from tests.certs import pabx_pki
from tests.kit.samples import VENDOR_REQUIRED
from worker.adapters.pabx import HttpPabx
from worker.contract.errors import (
    ConfigurationError,
    PabxOutcomeUnknown,
    PabxPermanentError,
    PabxTlsError,
    PabxUnreachable,
)
from worker.contract.settings import PabxTarget
from worker.tools.simulator import SimulatorThread

KEY = "tls-unit-key"
BODY = VENDOR_REQUIRED


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return pabx_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def https_sim(pki: Pki) -> Iterator[SimulatorThread]:
    with SimulatorThread(api_key=KEY, tls_cert=pki.server.cert, tls_key=pki.server.key) as sim:
        yield sim


@pytest.fixture(scope="module")
def mtls_sim(pki: Pki) -> Iterator[SimulatorThread]:
    with SimulatorThread(
        api_key=KEY, tls_cert=pki.server.cert, tls_key=pki.server.key, client_ca=pki.ca.cert
    ) as sim:
        yield sim


@pytest.fixture
def pabx() -> Iterator[HttpPabx]:
    client = HttpPabx(pool_size=4, connect_timeout_s=1, read_timeout_s=0.5)
    yield client
    client.close()


def target(url: str, name: str = "default", **tls: Any) -> PabxTarget:
    return PabxTarget(url=url, api_key=SecretStr(KEY), channel_id=17, name=name, **tls)


def admin(pki: Pki) -> dict[str, Any]:
    """requests keyword arguments that reach the simulator's admin API over (mutual) TLS."""
    return {"verify": str(pki.ca.cert), "cert": (str(pki.client.cert), str(pki.client.key))}


def reset(sim: SimulatorThread, pki: Pki, **faults: Any) -> None:
    requests.put(f"{sim.url}/_sim/faults", json=faults, timeout=5, **admin(pki))
    requests.delete(f"{sim.url}/_sim/requests", timeout=5, **admin(pki))


def recorded(sim: SimulatorThread, pki: Pki) -> int:
    reply = requests.get(f"{sim.url}/_sim/requests", timeout=5, **admin(pki))
    return len(reply.json()["requests"])


# --- verification -----------------------------------------------------------------------


def test_right_ca_is_accepted(pabx: HttpPabx, https_sim: SimulatorThread, pki: Pki) -> None:
    reset(https_sim, pki)
    assert https_sim.url.startswith("https://127.0.0.1:")
    assert pabx.redirect(target(https_sim.url, ca_file=pki.ca.cert), 23, BODY) == 200
    assert pabx.redirect(target(https_sim.url, ca_file=pki.ca.cert), 23, BODY) == 200
    assert recorded(https_sim, pki) == 2


def test_wrong_ca_fails_at_once_and_sends_nothing(
    pabx: HttpPabx, https_sim: SimulatorThread, pki: Pki
) -> None:
    reset(https_sim, pki)
    started = time.monotonic()
    with pytest.raises(PabxTlsError, match="TLS handshake failed: certificate verify failed"):
        pabx.redirect(target(https_sim.url, ca_file=pki.other.cert), 17, BODY)
    assert time.monotonic() - started < 1
    assert recorded(https_sim, pki) == 0


def test_a_tls_failure_is_permanent_and_never_shows_the_key(
    pabx: HttpPabx, https_sim: SimulatorThread, pki: Pki
) -> None:
    with pytest.raises(PabxTlsError) as info:
        pabx.redirect(target(https_sim.url, ca_file=pki.other.cert), 17, BODY)
    assert isinstance(info.value, PabxPermanentError)
    assert info.value.code == "pabx_unreachable" and info.value.status_code is None
    assert KEY not in str(info.value)


def test_system_cas_do_not_trust_a_private_ca(
    pabx: HttpPabx, https_sim: SimulatorThread, pki: Pki
) -> None:
    reset(https_sim, pki)
    with pytest.raises(PabxTlsError, match="certificate verify failed"):
        pabx.redirect(target(https_sim.url), 17, BODY)
    assert recorded(https_sim, pki) == 0


def test_host_name_mismatch_is_refused(pabx: HttpPabx, pki: Pki) -> None:
    with SimulatorThread(
        api_key=KEY, tls_cert=pki.wrong_host.cert, tls_key=pki.wrong_host.key
    ) as sim:
        with pytest.raises(PabxTlsError, match=r"certificate verify failed: .*mismatch") as info:
            pabx.redirect(target(sim.url, ca_file=pki.ca.cert), 17, BODY)
        assert "127.0.0.1" in str(info.value)
        # The admin API, reached as the name its certificate is for.
        http = urllib3.PoolManager(ca_certs=str(pki.ca.cert), server_hostname="other.example")
        reply = http.request("GET", f"{sim.url}/_sim/requests")
        assert reply.status == 200 and reply.json()["requests"] == []
        http.clear()


def test_verify_false_accepts_any_certificate_and_warns_once(
    https_sim: SimulatorThread, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    lab = target(https_sim.url, name="lab", ca_file=pki.other.cert, verify=False)
    checked = target(https_sim.url, name="checked", ca_file=pki.ca.cert)
    with caplog.at_level(logging.WARNING, logger="pabx_worker.pabx"):
        pabx = HttpPabx(
            pool_size=2,
            connect_timeout_s=1,
            read_timeout_s=1,
            targets={"lab": lab, "checked": checked},
        )
    try:
        [warning] = [r for r in caplog.records if r.name == "pabx_worker.pabx"]
        assert warning.levelno == logging.WARNING
        assert "TLS verification is off for PABX target lab" in warning.getMessage()
        assert KEY not in warning.getMessage()
        caplog.clear()
        # No urllib3 InsecureRequestWarning per connection either (warnings are errors here).
        assert pabx.redirect(lab, 17, BODY) == 200
        assert pabx.redirect(lab, 17, BODY) == 200
        assert not caplog.records
    finally:
        pabx.close()


# --- mutual TLS ---------------------------------------------------------------------------


def test_mutual_tls_with_a_client_certificate_is_accepted(
    pabx: HttpPabx, mtls_sim: SimulatorThread, pki: Pki
) -> None:
    reset(mtls_sim, pki)
    mine = target(
        mtls_sim.url, ca_file=pki.ca.cert, cert_file=pki.client.cert, key_file=pki.client.key
    )
    assert pabx.redirect(mine, 17, BODY) == 200
    assert recorded(mtls_sim, pki) == 1


def test_mutual_tls_without_a_client_certificate_is_refused(
    pabx: HttpPabx, mtls_sim: SimulatorThread, pki: Pki
) -> None:
    reset(mtls_sim, pki)
    started = time.monotonic()
    with pytest.raises(PabxTlsError, match=r"refused by the PABX: .*certificate required"):
        pabx.redirect(target(mtls_sim.url, ca_file=pki.ca.cert), 17, BODY)
    assert time.monotonic() - started < 1
    assert recorded(mtls_sim, pki) == 0


def test_mutual_tls_with_a_certificate_from_another_ca_is_refused(
    pabx: HttpPabx, mtls_sim: SimulatorThread, pki: Pki
) -> None:
    reset(mtls_sim, pki)
    stranger = target(
        mtls_sim.url,
        ca_file=pki.ca.cert,
        cert_file=pki.foreign_client.cert,
        key_file=pki.foreign_client.key,
    )
    with pytest.raises(PabxTlsError, match="unknown ca"):
        pabx.redirect(stranger, 17, BODY)
    assert recorded(mtls_sim, pki) == 0


def test_targets_on_one_host_keep_their_own_tls_settings(
    pabx: HttpPabx, mtls_sim: SimulatorThread, pki: Pki
) -> None:
    with_cert = target(
        mtls_sim.url,
        name="with-cert",
        ca_file=pki.ca.cert,
        cert_file=pki.client.cert,
        key_file=pki.client.key,
    )
    without = target(mtls_sim.url, name="without", ca_file=pki.ca.cert)
    wrong_ca = target(
        mtls_sim.url,
        name="wrong-ca",
        ca_file=pki.other.cert,
        cert_file=pki.client.cert,
        key_file=pki.client.key,
    )
    for _ in range(2):
        assert pabx.redirect(with_cert, 17, BODY) == 200
        with pytest.raises(PabxTlsError, match="certificate required"):
            pabx.redirect(without, 17, BODY)
        with pytest.raises(PabxTlsError, match="certificate verify failed"):
            pabx.redirect(wrong_ca, 17, BODY)


def test_each_target_context_is_built_once(
    https_sim: SimulatorThread, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[ssl.SSLContext] = []

    def counting(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        built.append(create_urllib3_context(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(worker.adapters.pabx, "create_urllib3_context", counting)
    first = target(https_sim.url, name="first", ca_file=pki.ca.cert)
    second = target(https_sim.url, name="second", ca_file=pki.ca.cert)
    pabx = HttpPabx(pool_size=2, connect_timeout_s=1, read_timeout_s=1, targets={"first": first})
    try:
        assert len(built) == 1  # made up front for a target given to the constructor
        for _ in range(3):
            assert pabx.redirect(first, 17, BODY) == 200
            assert pabx.redirect(second, 17, BODY) == 200
        assert len(built) == 2  # the second on its first use
    finally:
        pabx.close()


# --- time bound and keep-alive over TLS -----------------------------------------------------


def test_tls_handshake_that_never_answers_is_cut_at_the_time_bound(pki: Pki) -> None:
    # The kernel completes the TCP handshake from the backlog; nobody ever says a TLS word.
    pabx = HttpPabx(pool_size=2, connect_timeout_s=0.3, read_timeout_s=0.5)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        url = f"https://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        try:
            with pytest.raises(PabxUnreachable) as info:
                pabx.redirect(target(url, ca_file=pki.ca.cert), 17, BODY)
        finally:
            pabx.close()
    assert time.monotonic() - started < 2
    assert not isinstance(info.value, PabxTlsError)


def test_no_answer_over_tls_is_ambiguous(
    pabx: HttpPabx, https_sim: SimulatorThread, pki: Pki
) -> None:
    reset(https_sim, pki, hang=True)
    try:
        with pytest.raises(PabxOutcomeUnknown, match="timed out after the request was sent"):
            pabx.redirect(target(https_sim.url, ca_file=pki.ca.cert), 17, BODY)
    finally:
        reset(https_sim, pki)


def test_trickled_answer_over_tls_is_cut_at_the_time_bound(
    pabx: HttpPabx, https_sim: SimulatorThread, pki: Pki
) -> None:
    reset(https_sim, pki, trickle_ms=100, trickle_bytes=40)
    try:
        started = time.monotonic()
        with pytest.raises(PabxOutcomeUnknown, match=r"longer than 1\.5 s"):
            pabx.redirect(target(https_sim.url, ca_file=pki.ca.cert), 17, BODY)
        assert 1.4 <= time.monotonic() - started < 3
    finally:
        reset(https_sim, pki)


def test_idle_tls_connection_is_replaced(https_sim: SimulatorThread, pki: Pki) -> None:
    pabx = HttpPabx(pool_size=2, connect_timeout_s=1, read_timeout_s=1, idle_timeout_s=0.2)
    tls = target(https_sim.url, ca_file=pki.ca.cert)
    try:
        assert pabx.redirect(tls, 17, BODY) == 200
        assert pabx.redirect(tls, 17, BODY) == 200
        time.sleep(0.3)
        assert pabx.redirect(tls, 17, BODY) == 200
    finally:
        pabx.close()


# --- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_unreadable_tls_file_is_a_configuration_error(pki: Pki, tmp_path: Path, key: str) -> None:
    files: dict[str, Path] = {
        "ca_file": pki.ca.cert,
        "cert_file": pki.client.cert,
        "key_file": pki.client.key,
        key: tmp_path / "missing.pem",
    }
    main = target("https://127.0.0.1:9", name="main", **files)
    with pytest.raises(ConfigurationError, match=rf"pabx\.main\.{key}: cannot read .*missing\.pem"):
        HttpPabx(pool_size=1, connect_timeout_s=1, read_timeout_s=1, targets={"main": main})


def test_ca_file_that_is_not_pem_is_a_configuration_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    main = target("https://127.0.0.1:9", name="main", ca_file=junk)
    with pytest.raises(ConfigurationError, match=r"pabx\.main\.ca_file: cannot load .*junk\.pem"):
        HttpPabx(pool_size=1, connect_timeout_s=1, read_timeout_s=1, targets={"main": main})


def test_client_key_not_matching_its_certificate_is_a_configuration_error(pki: Pki) -> None:
    main = target(
        "https://127.0.0.1:9", name="main", cert_file=pki.client.cert, key_file=pki.server.key
    )
    with pytest.raises(ConfigurationError, match=r"pabx\.main\.cert_file: cannot load"):
        HttpPabx(pool_size=1, connect_timeout_s=1, read_timeout_s=1, targets={"main": main})


def test_key_file_without_cert_file_is_a_configuration_error(pki: Pki) -> None:
    main = target("https://127.0.0.1:9", name="main", key_file=pki.client.key)
    with pytest.raises(ConfigurationError, match=r"pabx\.main\.key_file: needs cert_file"):
        HttpPabx(pool_size=1, connect_timeout_s=1, read_timeout_s=1, targets={"main": main})


def test_unreadable_file_of_a_target_not_checked_up_front_fails_its_command(
    pabx: HttpPabx, https_sim: SimulatorThread, tmp_path: Path
) -> None:
    missing = target(https_sim.url, name="late", ca_file=tmp_path / "gone.pem")
    with pytest.raises(PabxTlsError, match=r"pabx\.late\.ca_file: cannot read"):
        pabx.redirect(missing, 17, BODY)
