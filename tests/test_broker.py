"""worker.adapters.broker: URL checks, TLS files and the mapping of broker errors (SPEC §1, §9)."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import amqp.exceptions
import kombu.exceptions
import pytest
from amqp.basic_message import Message
from amqp.exceptions import (
    AccessRefused,
    AMQPError,
    ChannelError,
    ConnectionForced,
    IrrecoverableChannelError,
    MessageNacked,
    NotAllowed,
    NotFound,
    PreconditionFailed,
    error_for_code,
)
from kombu import Connection

from tests.certs import Authority
from worker.adapters.broker import (
    BROKER_ERROR_MAP,
    TlsFiles,
    broker_errors,
    connect,
    home_node_down,
    parse_urls,
)
from worker.contract.errors import BrokerError, ConfigurationError, PabxWorkerError

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


# -- errors met on an open connection: broker_errors() ---------------------------------------


def exception_classes(*modules: object) -> set[type[Exception]]:
    """Every public exception class a module defines or re-exports (warnings are not raised)."""
    return {
        value
        for module in modules
        for name, value in vars(module).items()
        if not name.startswith("_")
        and isinstance(value, type)
        and issubclass(value, Exception)
        and not issubclass(value, Warning)
    }


def os_error_classes() -> set[type[Exception]]:
    """OSError and all its subclasses from the builtins, ``socket`` and ``ssl``."""
    found: set[type[Exception]] = set()
    todo: list[type[Exception]] = [OSError]
    while todo:
        cls = todo.pop()
        if cls.__module__ in ("builtins", "socket", "ssl"):
            found.add(cls)
        todo.extend(cls.__subclasses__())
    return found


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


#: What the worker can meet from py-amqp, kombu and the socket layer.
BROKER_EXCEPTIONS = sorted(
    exception_classes(amqp.exceptions, kombu.exceptions, socket, ssl) | os_error_classes(),
    key=qualified,
)

#: What broker_errors() deliberately raises unchanged, and why.
PASSED_THROUGH: dict[type[Exception], str] = {
    AMQPError: "base class; py-amqp raises its subclasses",
    ChannelError: "a channel error the broker names by a code py-amqp does not know",
    IrrecoverableChannelError: "base class of the channel errors below",
    AccessRefused: "403 on a channel: Topology.declare makes it a ConfigurationError",
    NotFound: "404, a missing queue or exchange (unless home_node_down): Topology.check"
    " makes it a ConfigurationError",
    PreconditionFailed: "406, a declaration that does not match: Topology makes it a"
    " ConfigurationError",
    MessageNacked: "py-amqp's confirm_publish, which the worker does not use",
    **dict.fromkeys(
        (
            cls
            for cls in exception_classes(kombu.exceptions)
            if not issubclass(cls, AMQPError | OSError)  # py-amqp's, socket's: mapped above
        ),
        "kombu's own layer (ensure, serializers, HTTP), which the worker does not call",
    ),
}


def instance(cls: type[Exception]) -> Exception:
    if issubclass(cls, AMQPError):
        return cls("boom", (50, 10))  # as py-amqp raises them: reply text and method
    return cls("boom")


def raised_through(exc: BaseException) -> BaseException:
    """What comes out of ``broker_errors()`` when ``exc`` is raised inside it."""
    try:
        with broker_errors():
            raise exc
    except BaseException as out:
        return out
    raise AssertionError("broker_errors() swallowed an exception")


def test_the_enumeration_finds_what_the_worker_meets() -> None:
    names = {qualified(cls) for cls in BROKER_EXCEPTIONS}
    assert {
        "amqp.exceptions.ConnectionForced",
        "amqp.exceptions.ResourceLocked",
        "amqp.exceptions.NotFound",
        "kombu.exceptions.OperationalError",
        "kombu.exceptions.InconsistencyError",
        "builtins.ConnectionResetError",
        "builtins.TimeoutError",
        "socket.gaierror",
        "ssl.SSLEOFError",
        "ssl.SSLCertVerificationError",
    } <= names
    assert set(PASSED_THROUGH) <= set(BROKER_EXCEPTIONS)  # no stale entry


@pytest.mark.parametrize("cls", BROKER_EXCEPTIONS, ids=qualified)
def test_every_broker_exception_is_mapped_or_deliberately_passed_through(
    cls: type[Exception],
) -> None:
    raised = instance(cls)
    out = raised_through(raised)
    if cls in PASSED_THROUGH:
        assert out is raised
        return
    assert isinstance(out, PabxWorkerError)
    assert type(out) is BrokerError
    assert str(out) == f"{cls.__name__}: {raised}"
    assert out.__cause__ is raised


HOME_NODE_DOWN = (
    "NOT_FOUND - home node 'rabbit@node2' of durable queue 'pabx.commands' in vhost '/'"
    " is down or inaccessible"
)


def test_a_classic_queue_whose_node_is_down_is_a_broker_error() -> None:
    raised = error_for_code(404, HOME_NODE_DOWN, (50, 10), ChannelError)  # as off the wire
    assert isinstance(raised, NotFound) and home_node_down(raised)
    out = raised_through(raised)
    assert type(out) is BrokerError
    assert str(out) == f"NotFound: Queue.declare: (404) {HOME_NODE_DOWN}"
    assert out.__cause__ is raised


@pytest.mark.parametrize(
    "raised",
    [
        NotFound("NOT_FOUND - no queue 'pabx.parked' in vhost '/'", (50, 10)),
        PreconditionFailed(HOME_NODE_DOWN, (50, 10)),  # the text alone is not enough
        ConfigurationError("a topology mismatch, already ours"),
        BrokerError("already ours"),
        RuntimeError("a bug"),
        KeyboardInterrupt(),
    ],
    ids=lambda exc: type(exc).__name__,
)
def test_other_errors_come_out_unchanged(raised: BaseException) -> None:
    assert not home_node_down(raised)
    assert raised_through(raised) is raised


def test_no_row_of_the_map_is_hidden_by_an_earlier_one() -> None:
    for i, earlier in enumerate(BROKER_ERROR_MAP):
        for later in BROKER_ERROR_MAP[i + 1 :]:
            if earlier.when is None:
                assert not issubclass(later.raised, earlier.raised), (earlier, later)


def test_broker_errors_keeps_the_value_of_the_block() -> None:
    with broker_errors():
        value = int("42")
    assert value == 42


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


@pytest.mark.integration
def test_publishing_does_not_read_the_socket_first(amqp_url: str) -> None:
    """No ``connection.blocked`` notices asked for: py-amqp's read before each publish is off."""
    connection = connect(amqp_url)
    try:
        amqp = connection.connection
        assert amqp.client_properties["capabilities"]["connection.blocked"] is False
        channel = connection.channel()
        reads: list[float] = []
        drain = amqp.drain_events
        amqp.drain_events = lambda timeout=None: reads.append(timeout) or drain(timeout=timeout)
        channel.basic_publish(Message(b"{}"), exchange="", routing_key="no-such-queue-7f3a")
        assert reads == []
    finally:
        connection.release()
