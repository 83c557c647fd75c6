"""``worker.adapters.broker.connect`` over real TLS: verification, host names, client certs."""

from __future__ import annotations

import socket
import ssl

import pytest
from kombu import Connection

from tests.tls.conftest import Pki, TlsBrokers
from worker.adapters.broker import broker_errors, connect
from worker.contract.errors import BrokerError, ConfigurationError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]  # the first one boots nodes


def tls_socket(connection: Connection) -> ssl.SSLSocket:
    sock = connection.connection.transport.sock
    assert isinstance(sock, ssl.SSLSocket)
    return sock


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_the_right_ca_connects_with_the_host_name_checked(
    tls_brokers: TlsBrokers, pki: Pki
) -> None:
    connection = connect(tls_brokers.verified, ca_file=pki.ca)
    try:
        sock = tls_socket(connection)
        assert sock.context.verify_mode == ssl.CERT_REQUIRED
        assert sock.context.check_hostname
        assert sock.server_hostname == "localhost"  # as written, not kombu's 127.0.0.1
        with broker_errors():
            channel = connection.channel()
        name, _, _ = channel.queue_declare("", exclusive=True)
        assert name
    finally:
        connection.release()


def test_an_ip_address_is_checked_against_the_ip_san(tls_brokers: TlsBrokers, pki: Pki) -> None:
    connection = connect(tls_brokers.nodes.amqps_url(1, host="127.0.0.1"), ca_file=pki.ca)
    try:
        assert tls_socket(connection).server_hostname == "127.0.0.1"
    finally:
        connection.release()


def test_a_certificate_for_another_host_name_is_refused(tls_brokers: TlsBrokers, pki: Pki) -> None:
    with pytest.raises(ConfigurationError) as caught:
        connect(tls_brokers.other_host, ca_file=pki.ca)
    message = str(caught.value)
    assert message.startswith("PABX_WORKER_AMQP_URL: TLS to localhost:")
    assert "certificate verify failed: Hostname mismatch" in message
    assert "'localhost'" in message
    assert isinstance(caught.value.__cause__, ssl.SSLCertVerificationError)


def test_the_system_cas_do_not_trust_a_private_ca(tls_brokers: TlsBrokers) -> None:
    with pytest.raises(ConfigurationError, match="certificate verify failed") as caught:
        connect(tls_brokers.verified)
    assert "PABX_WORKER_AMQP_CA_FILE" in str(caught.value)


def test_a_ca_that_did_not_sign_the_broker_is_refused(tls_brokers: TlsBrokers, pki: Pki) -> None:
    with pytest.raises(ConfigurationError, match="certificate verify failed") as caught:
        connect(tls_brokers.verified, ca_file=pki.stranger_ca)
    assert str(pki.stranger_ca) in str(caught.value)


def test_a_client_certificate_when_the_broker_requires_one(
    tls_brokers: TlsBrokers, pki: Pki
) -> None:
    connection = connect(
        tls_brokers.mutual, ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key
    )
    try:
        assert tls_socket(connection).server_hostname == "localhost"
        with broker_errors():
            connection.channel()
    finally:
        connection.release()


#: With TLS 1.3 the broker's verdict on our certificate races py-amqp's first write: without
#: connect()'s look for the alert about half of these attempts saw a bare EOF.
ATTEMPTS = 10


def test_no_client_certificate_is_refused_clearly(tls_brokers: TlsBrokers, pki: Pki) -> None:
    for _ in range(ATTEMPTS):
        with pytest.raises(ConfigurationError) as caught:
            connect(tls_brokers.mutual, ca_file=pki.ca)
        message = str(caught.value)
        assert "TLS to localhost:" in message
        assert "CERTIFICATE_REQUIRED: the broker requires a client certificate" in message
        assert "PABX_WORKER_AMQP_CERT_FILE" in message


def test_a_client_certificate_from_another_ca_is_refused(tls_brokers: TlsBrokers, pki: Pki) -> None:
    stranger = pki.stranger_client
    for _ in range(ATTEMPTS):
        with pytest.raises(ConfigurationError, match="UNKNOWN_CA: the broker refused our client"):
            connect(
                tls_brokers.mutual, ca_file=pki.ca, cert_file=stranger.cert, key_file=stranger.key
            )


def test_failover_passes_over_a_node_whose_certificate_fails(
    tls_brokers: TlsBrokers, pki: Pki
) -> None:
    url = f"{tls_brokers.other_host};{tls_brokers.verified}"
    connection = connect(url, ca_file=pki.ca)
    try:
        port = tls_brokers.nodes.amqps_port(1)
        assert tls_socket(connection).getpeername()[1] == port
    finally:
        connection.release()


def test_a_certificate_failure_outranks_a_node_that_is_down(
    tls_brokers: TlsBrokers, pki: Pki
) -> None:
    down = f"amqps://guest:guest@localhost:{closed_port()}/%2F"
    with pytest.raises(ConfigurationError, match="Hostname mismatch"):
        connect(f"{down};{tls_brokers.other_host}", ca_file=pki.ca)
    with pytest.raises(BrokerError, match="refused"):
        connect(down, ca_file=pki.ca)


def test_plain_amqp_on_the_tls_port_is_not_a_tls_connection(tls_brokers: TlsBrokers) -> None:
    plain = tls_brokers.verified.replace("amqps://", "amqp://")
    with pytest.raises(BrokerError):
        connect(plain)
