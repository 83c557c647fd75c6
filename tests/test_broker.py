"""worker.broker: URL checks, TLS files and the mapping of connection errors (SPEC §1, §9)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from amqp.exceptions import AccessRefused, ConnectionForced, NotAllowed
from kombu import Connection

from tests.certs import Authority
from worker.broker import TlsFiles, connect, parse_urls
from worker.errors import BrokerError, ConfigurationError

PASSWORD = "s3cret-Pw-9"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def refused_url(scheme: str = "amqp") -> str:
    return f"{scheme}://guest:{PASSWORD}@127.0.0.1:{closed_port()}/%2F"


# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        (f"http://guest:{PASSWORD}@localhost:5672/", "unsupported scheme 'http'"),
        (f"amqpx://guest:{PASSWORD}@localhost/", "unsupported scheme 'amqpx'"),
        (f"amqp://guest:{PASSWORD}@localhost:99999/", "port is not a number in 1-65535"),
        (f"amqp://guest:{PASSWORD}@localhost:0/", "port is not a number in 1-65535"),
        (f"amqp://guest:{PASSWORD}@localhost:five/", "port is not a number in 1-65535"),
        (f"amqp://guest:{PASSWORD}@[::1/", "malformed URL"),
        ("amqp://guest:s3cret/Pw-9@localhost/", "percent-encode"),
        ("amqp://guest:s3cret#Pw-9@localhost/", "percent-encode"),
        ("amqp://guest:s3cret?Pw-9@localhost/", "percent-encode"),
        (f"guest:{PASSWORD}@localhost", "not a URL"),
        ("", "is empty"),
        (" ; ", "is empty"),
        (f"amqp://guest:{PASSWORD}@localhost/%2F?heartbeat=10", "not supported (heartbeat)"),
        (f"amqp://guest:{PASSWORD}@localhost/%2F#frag", "not supported"),
    ],
)
def test_a_bad_url_names_the_setting_never_the_password(url: str, why: str) -> None:
    with pytest.raises(ConfigurationError, match="PABX_WORKER_AMQP_URL") as caught:
        connect(url)
    assert why in str(caught.value)
    assert "s3cret" not in str(caught.value) and "Pw-9" not in str(caught.value)
    assert caught.value.__cause__ is None  # nothing of kombu's (or of the URL) underneath


def test_tls_query_arguments_point_to_the_ca_file_setting() -> None:
    with pytest.raises(ConfigurationError) as caught:
        connect(f"amqps://guest:{PASSWORD}@localhost/%2F?ssl_ca_certs=/etc/ca.pem&x=1")
    message = str(caught.value)
    assert "ssl_ca_certs" in message and "PABX_WORKER_AMQP_CA_FILE" in message


def test_a_bad_url_in_a_failover_list_is_named_by_position() -> None:
    with pytest.raises(ConfigurationError, match=r"\(URL 2 of 2\): unsupported scheme 'http'"):
        connect(f"{refused_url()};http://localhost/")


def test_urls_are_read_as_written() -> None:
    first, second, third = parse_urls(
        "amqps://u:p@broker.example/prod;amqp://u:p@10.0.0.2:5673/%2F;AMQP://h"
    )
    assert (first.scheme, first.host, first.port, first.vhost) == (
        "amqps",
        "broker.example",
        5671,
        "prod",
    )
    assert (second.port, second.vhost, second.tls) == (5673, "/", False)
    assert (third.scheme, third.vhost) == ("amqp", "/")
    assert "p@" not in str(first)


# -- TLS files -------------------------------------------------------------------------------


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path / "pki")


def test_tls_options_always_verify_the_host_as_written(authority: Authority) -> None:
    options = TlsFiles(ca_file=authority.cert).options("localhost")
    assert options["server_hostname"] == "localhost"  # kombu would connect to 127.0.0.1
    assert options["cert_reqs"] == ssl.CERT_REQUIRED
    assert options["ca_certs"] == str(authority.cert)
    assert options["certfile"] is None and options["keyfile"] is None


@pytest.mark.parametrize(
    ("files", "variable"),
    [
        ({"ca_file": "missing.pem"}, "PABX_WORKER_AMQP_CA_FILE: cannot read"),
        ({"ca_file": "."}, "PABX_WORKER_AMQP_CA_FILE: cannot read"),
        ({"ca_file": "garbage.pem"}, "PABX_WORKER_AMQP_CA_FILE: cannot load CA certificates"),
        ({"cert_file": "missing.crt", "key_file": "client.key"}, "PABX_WORKER_AMQP_CERT_FILE"),
        ({"cert_file": "client.crt", "key_file": "missing.key"}, "PABX_WORKER_AMQP_KEY_FILE"),
        ({"key_file": "client.key"}, "PABX_WORKER_AMQP_KEY_FILE is set but"),
        ({"cert_file": "client.crt", "key_file": "other.key"}, "cannot load the client cert"),
        ({"cert_file": "garbage.pem", "key_file": "client.key"}, "cannot load the client cert"),
    ],
)
def test_unusable_tls_files_name_their_setting(
    authority: Authority, files: dict[str, str], variable: str
) -> None:
    directory = authority.directory
    authority.issue("client", client=True)
    authority.issue("other", client=True)
    (directory / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64\n")
    paths: dict[str, Any] = {name: directory / file for name, file in files.items()}
    with pytest.raises(ConfigurationError, match=variable):
        connect(refused_url("amqps"), **paths)


def test_tls_files_are_not_read_for_plain_amqp(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="refused"):
        connect(refused_url(), ca_file=tmp_path / "missing.pem")


# -- errors met while connecting -------------------------------------------------------------


def test_a_refused_connection_is_a_broker_error() -> None:
    url = refused_url()
    with pytest.raises(BrokerError, match="ConnectionRefusedError") as caught:
        connect(url)
    assert PASSWORD not in str(caught.value)
    port = urlsplit(url).port
    assert f"127.0.0.1:{port}" in str(caught.value)


def failing_with(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def ensure_connection(self: Connection, *args: Any, **kwargs: Any) -> None:
        raise exc

    monkeypatch.setattr(Connection, "ensure_connection", ensure_connection)


def ssl_error(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    exc.reason = reason
    return exc


def verify_error(message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    exc.verify_message = message
    return exc


@pytest.mark.parametrize(
    ("raised", "expected", "words"),
    [
        (
            AccessRefused("ACCESS_REFUSED - Login was refused", (10, 40), "Connection.start_ok"),
            ConfigurationError,
            "PABX_WORKER_AMQP_URL: the broker refused the user name or password (ACCESS_REFUSED)",
        ),
        (
            NotAllowed("NOT_ALLOWED - vhost prod not found", (10, 40), "Connection.open"),
            ConfigurationError,
            "refused virtual host 'prod': NOT_ALLOWED - vhost prod not found",
        ),
        (
            NotAllowed(
                "NOT_ALLOWED - access to vhost 'prod' refused for user 'u': "
                "connection limit (10) is reached",
                (10, 40),
                "Connection.open",
            ),
            BrokerError,
            "connection limit",
        ),
        (ConnectionForced("CONNECTION_FORCED - shutdown"), BrokerError, "CONNECTION_FORCED"),
        (TimeoutError("timed out"), BrokerError, "timed out"),
        (
            verify_error("Hostname mismatch, certificate is not valid for 'localhost'."),
            ConfigurationError,
            "certificate verify failed: Hostname mismatch",
        ),
        (
            ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"),
            ConfigurationError,
            "the broker requires a client certificate",
        ),
        (ssl_error("WRONG_VERSION_NUMBER"), ConfigurationError, "is that port a TLS listener"),
        (ssl.SSLEOFError(8, "EOF occurred"), BrokerError, "TLS handshake interrupted"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
def test_connect_maps_what_it_met(
    monkeypatch: pytest.MonkeyPatch, raised: BaseException, expected: type, words: str
) -> None:
    failing_with(monkeypatch, raised)  # a dropped line is then probed for an alert: none
    with pytest.raises(expected) as caught:
        connect(f"amqps://guest:{PASSWORD}@localhost:{closed_port()}/prod")
    assert words in str(caught.value)
    assert PASSWORD not in str(caught.value)
    assert caught.value.__cause__ is raised


def test_an_unknown_error_is_not_disguised(monkeypatch: pytest.MonkeyPatch) -> None:
    failing_with(monkeypatch, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        connect("amqp://guest:guest@localhost/%2F")


def test_a_permanent_failure_wins_only_when_no_url_connected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failing_with(monkeypatch, AccessRefused("ACCESS_REFUSED", (10, 40), "Connection.start_ok"))
    with pytest.raises(ConfigurationError, match="ACCESS_REFUSED"):
        connect(f"{refused_url()};amqp://guest:guest@localhost/%2F")


# -- the machine's broker --------------------------------------------------------------------


def with_credentials(url: str, password: str, vhost: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port or 5672}"
    return urlunsplit((parts.scheme, netloc, vhost or parts.path, "", ""))


@pytest.mark.integration
def test_a_wrong_password_is_a_configuration_error(amqp_url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        connect(with_credentials(amqp_url, PASSWORD))
    assert str(caught.value) == (
        "PABX_WORKER_AMQP_URL: the broker refused the user name or password (ACCESS_REFUSED)"
    )


@pytest.mark.integration
def test_an_unknown_vhost_is_a_configuration_error(amqp_url: str) -> None:
    parts = urlsplit(amqp_url)
    url = urlunsplit((parts.scheme, parts.netloc, "/no-such-vhost-7f3a", "", ""))
    with pytest.raises(ConfigurationError, match="virtual host 'no-such-vhost-7f3a'"):
        connect(url)


@pytest.mark.integration
def test_failover_moves_past_a_node_that_is_down(amqp_url: str) -> None:
    connection = connect(f"{refused_url()};{amqp_url}")
    try:
        assert connection.connected
    finally:
        connection.release()
