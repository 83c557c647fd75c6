"""Certificates made here, and private TLS nodes started once for the whole session."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.certs import Authority, Leaf
from tests.conftest import IN_CI
from tests.kit.processes import find_sbin
from tests.tls.rabbit_tls import TlsListener, TlsNodes, tls_nodes

#: Names the broker's certificate is valid for; the tests connect to ``localhost``.
BROKER_HOSTS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Pki:
    """Our CA with its certificates, and a stranger CA nobody here trusts."""

    ca: Path
    server: Leaf
    other_host: Leaf
    client: Leaf
    stranger_ca: Path
    stranger_client: Leaf


@dataclass(frozen=True)
class TlsBrokers:
    """``amqps://`` URLs (host ``localhost``) of the three private nodes."""

    verified: str  # certificate for localhost and 127.0.0.1; no client certificate asked
    other_host: str  # certificate for other.example only
    mutual: str  # like ``verified``, but a client certificate signed by our CA is required
    nodes: TlsNodes


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority(directory / "ours")
    stranger = Authority(directory / "stranger", name="stranger CA")
    return Pki(
        ca=ca.cert,
        server=ca.issue("broker", hosts=BROKER_HOSTS),
        other_host=ca.issue("other broker", hosts=("other.example",)),
        client=ca.issue("pabx-worker client", client=True),
        stranger_ca=stranger.cert,
        stranger_client=stranger.issue("stranger client", client=True),
    )


@pytest.fixture(scope="session")
def tls_brokers(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBrokers]:
    """Three private nodes, booted in parallel, stopped at the end of the session."""
    if find_sbin() is None:
        message = "rabbitmq-server is not installed: cannot start a private TLS node"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: integration tests may not skip)")
        pytest.skip(message)
    listeners = [
        TlsListener(pki.server),
        TlsListener(pki.other_host),
        TlsListener(pki.server, require_client_cert=True),
    ]
    with tls_nodes(tmp_path_factory.mktemp("rabbit-tls"), pki.ca, listeners) as nodes:
        yield TlsBrokers(
            verified=nodes.amqps_url(1),
            other_host=nodes.amqps_url(2),
            mutual=nodes.amqps_url(3),
            nodes=nodes,
        )
