"""Private RabbitMQ nodes with a TLS listener each, started in parallel and thrown away.

Built on :class:`tests.cluster.rabbit_cluster.RabbitCluster` for its isolation from the shared
``rabbit@localhost`` (own node names, loopback-only ports, private HOME and cookie, data and
logs under DIR, teardown that signals only the process groups it started), but the nodes are
*not* clustered: each is one scenario, e.g. a plain TLS listener and one that requires client
certificates. In tests::

    listeners = [TlsListener(server_leaf), TlsListener(server_leaf, require_client_cert=True)]
    with tls_nodes(tmp_dir, authority.cert, listeners) as rabbit:
        rabbit.amqps_url(1)         # amqps://guest:guest@localhost:PORT/%2F

Ports: a random base in [BASE_MIN, BASE_MAX) so that concurrent runs rarely meet (a taken port
or name moves on to another base): AMQP ``base + i - 1``, AMQPS that ``+ AMQPS_OFFSET``,
distribution ``+ 20000``, CLI ``+ 30000``. Readiness is the TLS port accepting connections:
listeners open last in RabbitMQ's boot, and polling it spares a CLI call (about 1 s each).
"""

from __future__ import annotations

import contextlib
import random
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.certs import Leaf
from tests.cluster.rabbit_cluster import (
    RESERVED_PORTS,
    ClusterError,
    Node,
    RabbitCluster,
    SlotBusy,
    port_in_use,
    start_in_free_slot,
)

__all__ = ["TlsListener", "TlsNodes", "tls_nodes"]

#: AMQPS port = the node's AMQP port + this.
AMQPS_OFFSET = 100
#: Range of random base ports (their +20000 and +30000 stay below 65536, clear of 5672-5710).
BASE_MIN, BASE_MAX = 7000, 14000
#: How many random bases to try when ports or names are taken.
ATTEMPTS = 5


@dataclass(frozen=True)
class TlsListener:
    """One node's TLS listener: its certificate, and whether clients must show one."""

    server: Leaf
    require_client_cert: bool = False


class TlsNodes(RabbitCluster):
    """One unclustered node per :class:`TlsListener`; see the module docstring."""

    def __init__(
        self,
        base_dir: Path,
        ca_file: Path,
        listeners: Sequence[TlsListener],
        base_port: int,
        prefix: str,
    ) -> None:
        super().__init__(base_dir, len(listeners), base_port, prefix=prefix)
        self.ca_file = ca_file
        self.listeners = list(listeners)
        for node in self.nodes:
            if self.amqps_port(node) in RESERVED_PORTS:
                raise ValueError(f"{node.name}: AMQPS port clashes with the shared node")

    def amqps_port(self, which: int | str | Node) -> int:
        return self.node(which).amqp_port + AMQPS_OFFSET

    def amqps_url(self, which: int | str | Node, host: str = "localhost") -> str:
        return f"amqps://guest:guest@{host}:{self.amqps_port(which)}/%2F"

    def start(self) -> None:
        """Boot every node in parallel and wait until each TLS listener accepts connections."""
        began = self.boot()
        self.formed_in_s = time.monotonic() - began
        self._save_state()
        self.log(f"{len(self.nodes)} TLS node(s) up in {self.formed_in_s:.1f}s under {self.dir}")

    def _prepare(self) -> None:
        for node in self.nodes:
            if port_in_use(self.amqps_port(node)):
                raise SlotBusy(f"{node.name}: port {self.amqps_port(node)} is in use")
        super()._prepare()
        for node, listener in zip(self.nodes, self.listeners, strict=True):
            verify = "verify_peer" if listener.require_client_cert else "verify_none"
            lines = [
                f"listeners.ssl.default = 127.0.0.1:{self.amqps_port(node)}",
                f"ssl_options.cacertfile = {self.ca_file}",
                f"ssl_options.certfile = {listener.server.cert}",
                f"ssl_options.keyfile = {listener.server.key}",
                f"ssl_options.verify = {verify}",
                f"ssl_options.fail_if_no_peer_cert = {str(listener.require_client_cert).lower()}",
                "",
            ]
            with (node.home / "rabbitmq.conf").open("a") as conf:
                conf.write("\n".join(lines))

    def _await_boot(self, node: Node, deadline: float) -> None:
        proc = self._procs.get(node.name)
        while not port_in_use(self.amqps_port(node)):
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"{node.name} exited {proc.returncode}: {self._tail(node)}")
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{node.name} did not open port {self.amqps_port(node)} in time: "
                    f"{self._tail(node)}"
                )
            time.sleep(0.1)


@contextlib.contextmanager
def tls_nodes(tmp_dir: Path, ca_file: Path, listeners: Sequence[TlsListener]) -> Iterator[TlsNodes]:
    """Start one node per listener under ``tmp_dir``, yield them, always stop them."""

    def at_random_ports(attempt: int) -> TlsNodes:
        prefix = f"pabxtls{secrets.token_hex(3)}"
        base = random.randrange(BASE_MIN, BASE_MAX)
        return TlsNodes(tmp_dir / prefix, ca_file, listeners, base, prefix)

    nodes = start_in_free_slot(at_random_ports, ATTEMPTS)
    try:
        yield nodes
    finally:
        nodes.stop()
