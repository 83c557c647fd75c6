"""A private, throw-away RabbitMQ cluster on this machine: N new nodes, clustered, torn down.

In tests::

    with local_cluster(tmp_path) as urls:      # ["amqp://guest:guest@127.0.0.1:5681/%2F", ...]
        urls.cluster.stop_app(2)              # the RabbitCluster behind the URLs
        urls.cluster.start_app(2)

From a shell (see deploy/rabbitmq/cluster/README.md)::

    python -m tests.cluster.rabbit_cluster up /tmp/pabx-cluster [--nodes 3] [--base-port 5681]
    python -m tests.cluster.rabbit_cluster status /tmp/pabx-cluster
    python -m tests.cluster.rabbit_cluster ctl /tmp/pabx-cluster 2 stop_app
    python -m tests.cluster.rabbit_cluster down /tmp/pabx-cluster

Isolation from any other RabbitMQ on the machine (e.g. a shared ``rabbit@localhost`` on 5672):

* the nodes are ``pabxc1@localhost``, ``pabxc2@localhost``, … (never ``rabbit@…``), with AMQP on
  ``127.0.0.1:base_port + i`` and Erlang distribution on ``127.0.0.1:base_port + 20000 + i``;
* every file (config, enabled plugins, Mnesia/Raft data, logs, pid files) lives under DIR;
* the nodes and the CLI calls made here use HOME=DIR/home, whose ``.erlang.cookie`` is a fresh
  random cookie: a ``rabbitmqctl -n rabbit@localhost …`` issued with this environment cannot
  even authenticate to another node, so it can never stop, reset or join it;
* only loopback addresses: listeners, distribution and epmd are bound to 127.0.0.1.

Every wait is bounded. Teardown runs ``rabbitmqctl -n NODE stop`` only for nodes this object
started (its process group, with that node name and this DIR's HOME, is still alive) and, should
one not go away, signals only that process group. Taken ports or node names (a concurrent run)
raise :class:`SlotBusy` before anything starts; ``local_cluster(..., slots=N)`` then moves on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "ClusterError",
    "ClusterURLs",
    "Node",
    "RabbitCluster",
    "SlotBusy",
    "find_sbin",
    "local_cluster",
    "start_in_free_slot",
]

#: Node names are PREFIX1@localhost, PREFIX2@localhost, ...
NODE_PREFIX = "pabxc"
#: Distribution port = AMQP port + this.
DIST_OFFSET = 20000
#: CLI tools' own distribution ports start at the node's distribution port + this.
CTL_DIST_OFFSET = 10000
#: With ``prometheus=True``: the rabbitmq_prometheus endpoint's port = AMQP port + this.
PROMETHEUS_OFFSET = 30000
#: Ports and names never to be used: the machine's shared node.
RESERVED_PORTS = frozenset({5672, 25672, 15672, 4369})
STATE_FILE = "cluster.json"

BOOT_TIMEOUT_S = 90.0
CTL_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 45.0


class ClusterError(RuntimeError):
    """The cluster could not be started, joined or stopped as asked."""


class SlotBusy(ClusterError):
    """A port or node name of the cluster is taken (e.g. by a concurrent run); nothing started."""


def find_sbin() -> Path | None:
    """The directory of the real RabbitMQ scripts, or None when RabbitMQ is not installed.

    ``PABX_RABBITMQ_SBIN`` wins. Debian's ``/usr/sbin/rabbitmq-server`` is a wrapper that
    ``su``'s to the rabbitmq user (and its HOME, cookie and permissions), so the scripts it
    wraps in ``/usr/lib/rabbitmq/bin`` are preferred when present.
    """
    override = os.environ.get("PABX_RABBITMQ_SBIN")
    if override:
        return Path(override) if (Path(override) / "rabbitmq-server").exists() else None
    on_path = shutil.which("rabbitmq-server")
    if on_path is None:
        return None
    debian = Path("/usr/lib/rabbitmq/bin")
    if (debian / "rabbitmq-server").exists():
        return debian
    return Path(on_path).resolve().parent


@dataclass(frozen=True)
class Node:
    index: int
    name: str
    amqp_port: int
    dist_port: int
    home: Path

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/%2F"

    @property
    def short(self) -> str:
        return self.name.split("@", 1)[0]

    @property
    def prometheus_port(self) -> int:
        """rabbitmq_prometheus's port (when the cluster was made with ``prometheus=True``)."""
        return self.amqp_port + PROMETHEUS_OFFSET


class ClusterURLs(list[str]):
    """The AMQP URLs of the nodes, in node order; ``.cluster`` is the cluster behind them."""

    cluster: RabbitCluster


class RabbitCluster:
    """N local RabbitMQ nodes under one directory; see the module docstring."""

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        nodes: int = 3,
        base_port: int = 5681,
        *,
        prefix: str = NODE_PREFIX,
        sbin: Path | None = None,
        log: Any = None,
        prometheus: bool = False,
    ) -> None:
        if nodes < 1:
            raise ValueError("nodes must be at least 1")
        if prefix == "rabbit" or not prefix.isidentifier():
            raise ValueError(f"refusing node name prefix {prefix!r}")
        self.dir = Path(base_dir).resolve()
        self.prefix = prefix
        #: Enable rabbitmq_prometheus on every node (on :attr:`Node.prometheus_port`).
        self.prometheus = prometheus
        self.sbin = sbin or find_sbin()
        self.log = log or (lambda msg: print(f"[cluster] {msg}", file=sys.stderr, flush=True))
        self.nodes = [
            Node(
                index=i,
                name=f"{prefix}{i}@localhost",
                amqp_port=base_port + i - 1,
                dist_port=base_port + i - 1 + DIST_OFFSET,
                home=self.dir / "nodes" / f"{prefix}{i}",
            )
            for i in range(1, nodes + 1)
        ]
        for node in self.nodes:
            if node.amqp_port in RESERVED_PORTS or node.dist_port in RESERVED_PORTS:
                raise ValueError(f"{node.name}: port clashes with the shared RabbitMQ node")
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._pids: dict[str, int] = {}
        self.formed_in_s: float | None = None

    # -- environment and CLI ------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def cookie_home(self) -> Path:
        return self.dir / "home"

    def node(self, which: int | str | Node) -> Node:
        """A node by 1-based index, name (``pabxc2`` or ``pabxc2@localhost``) or itself."""
        if isinstance(which, Node):
            return which
        for node in self.nodes:
            if which in (node.index, node.name, node.short):
                return node
        raise KeyError(which)

    def env(self, node: Node) -> dict[str, str]:
        """The environment of ``node``'s server and of CLI calls aimed at it."""
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RABBITMQ_", "ERL_")) and k not in ("HOME", "CONF_ENV_FILE")
        }
        h = node.home
        return {
            **base,
            "HOME": str(self.cookie_home),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # A CLI call that dies during teardown must not drop a dump in the caller's cwd.
            "ERL_CRASH_DUMP": str(self.dir / "erl_crash.dump"),
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": node.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(node.amqp_port),
            "RABBITMQ_DIST_PORT": str(node.dist_port),
            "RABBITMQ_CTL_DIST_PORT_MIN": str(node.dist_port + CTL_DIST_OFFSET),
            "RABBITMQ_CTL_DIST_PORT_MAX": str(node.dist_port + CTL_DIST_OFFSET + 10),
            "RABBITMQ_CONFIG_FILE": str(h / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(h / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(h / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(h / "plugins-expand"),
            "RABBITMQ_MNESIA_BASE": str(h / "mnesia"),
            "RABBITMQ_MNESIA_DIR": str(h / "mnesia" / node.short),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(h / "feature_flags"),
            "RABBITMQ_LOG_BASE": str(h / "log"),
            "RABBITMQ_LOGS": str(h / "log" / f"{node.short}.log"),
            "RABBITMQ_PID_FILE": str(h / f"{node.short}.pid"),
        }

    def ctl(
        self,
        node: int | str | Node,
        *args: str,
        tool: str = "rabbitmqctl",
        timeout: float = CTL_TIMEOUT_S,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``TOOL -n NODE ARGS`` (rabbitmqctl, rabbitmq-queues, rabbitmq-diagnostics)."""
        target = self.node(node)
        assert target in self.nodes and not target.name.startswith("rabbit@")
        command = [str(self._script(tool)), "-n", target.name, *args]
        try:
            done = subprocess.run(
                command,
                env=self.env(target),
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{' '.join(command[1:])}: no answer within {timeout:g}s") from exc
        if check and done.returncode != 0:
            raise ClusterError(
                f"{tool} {' '.join(command[1:])} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-1500:]}"
            )
        return done

    def ctl_json(self, node: int | str | Node, *args: str, **kwargs: Any) -> Any:
        out = self.ctl(node, *args, "--formatter", "json", **kwargs).stdout
        return json.loads(out)

    def _script(self, tool: str) -> Path:
        if self.sbin is None:
            raise ClusterError("rabbitmq-server is not installed (not on PATH)")
        return self.sbin / tool

    # -- lifecycle ----------------------------------------------------------------------

    def boot(self) -> float:
        """Prepare and start every node in parallel, wait until each boots; returns the start."""
        began = time.monotonic()
        self._prepare()
        for node in self.nodes:
            self._spawn(node)
        self._save_state()
        for node in self.nodes:
            self._await_boot(node, began + BOOT_TIMEOUT_S)
        return began

    def start(self) -> None:
        """Boot every node, join them to the first one, wait for all of them to run."""
        began = self.boot()
        booted = time.monotonic()
        self.log(f"{len(self.nodes)} nodes booted in {booted - began:.1f}s")
        first = self.nodes[0]
        for node in self.nodes[1:]:
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        self.wait_running([n.name for n in self.nodes], timeout=60)
        self.formed_in_s = time.monotonic() - began
        self._save_state()
        self.log(
            f"cluster of {len(self.nodes)} formed in {self.formed_in_s:.1f}s "
            f"(joining {time.monotonic() - booted:.1f}s) under {self.dir}: {', '.join(self.urls)}"
        )

    def _prepare(self) -> None:
        if (self.dir / STATE_FILE).exists():
            raise ClusterError(f"{self.dir} already holds a cluster: run 'down' on it first")
        for node in self.nodes:
            ports = (node.amqp_port, node.dist_port)
            for port in (*ports, node.prometheus_port) if self.prometheus else ports:
                if port_in_use(port):
                    raise SlotBusy(f"{node.name}: port {port} on 127.0.0.1 is in use")
            if node.short in _epmd_names():
                raise SlotBusy(f"a node named {node.name} is already running")
        self.cookie_home.mkdir(parents=True, exist_ok=True)
        cookie = self.cookie_home / ".erlang.cookie"
        if not cookie.exists():
            cookie.write_text(secrets.token_hex(20).upper())
        cookie.chmod(0o400)
        (self.dir / "rabbitmq-env.conf").write_text("# intentionally empty: see env()\n")
        for node in self.nodes:
            for sub in ("mnesia", "log", "plugins-expand"):
                (node.home / sub).mkdir(parents=True, exist_ok=True)
            plugins = "rabbitmq_prometheus" if self.prometheus else ""
            (node.home / "enabled_plugins").write_text(f"[{plugins}].\n")
            (node.home / "rabbitmq.conf").write_text(
                "\n".join(
                    [
                        *self._prometheus_config(node),
                        f"listeners.tcp.local = 127.0.0.1:{node.amqp_port}",
                        "loopback_users.guest = true",
                        "log.console = false",
                        "log.file.level = info",
                        "vm_memory_high_watermark.absolute = 1GB",
                        "disk_free_limit.absolute = 50MB",
                        "",
                    ]
                )
            )

    def _prometheus_config(self, node: Node) -> list[str]:
        if not self.prometheus:
            return []
        return ["prometheus.tcp.ip = 127.0.0.1", f"prometheus.tcp.port = {node.prometheus_port}"]

    def _spawn(self, node: Node) -> None:
        sink = (node.home / "log" / "startup.log").open("ab")
        try:
            proc = subprocess.Popen(
                [str(self._script("rabbitmq-server"))],
                env=self.env(node),
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=node.home,
                start_new_session=True,  # its own process group: teardown signals only that
            )
        finally:
            sink.close()
        self._procs[node.name] = proc
        self._pids[node.name] = proc.pid

    def _await_boot(self, node: Node, deadline: float) -> None:
        proc = self._procs.get(node.name)
        while not port_in_use(node.amqp_port):
            if proc is not None and proc.poll() is not None:
                raise ClusterError(f"{node.name} exited {proc.returncode}: {self._tail(node)}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.name} did not open port {node.amqp_port} in time")
            time.sleep(0.25)
        left = max(5.0, deadline - time.monotonic())
        self.ctl(node, "await_startup", "--timeout", str(int(left)), timeout=left + 15)

    def _tail(self, node: Node) -> str:
        texts = []
        for path in (node.home / "log" / "startup.log", node.home / "log" / f"{node.short}.log"):
            with contextlib.suppress(OSError):
                texts.append(path.read_text(errors="replace")[-1500:])
        return "\n".join(texts)

    def running_nodes(self, via: int | str | Node | None = None) -> list[str]:
        """Running cluster members as seen by ``via`` (default: the first node that answers)."""
        candidates = [self.node(via)] if via is not None else self.nodes
        last: Exception | None = None
        for node in candidates:
            try:
                status = self.ctl_json(node, "cluster_status", timeout=30)
                return sorted(status.get("running_nodes", []))
            except (ClusterError, ValueError) as exc:
                last = exc
        raise ClusterError(f"no node answered cluster_status: {last}")

    def wait_running(self, names: Sequence[str], timeout: float = 60.0) -> float:
        """Wait until every node of ``names`` runs in the cluster; the seconds it took."""
        began = time.monotonic()
        want = sorted(names)
        seen: list[str] = []
        while time.monotonic() - began < timeout:
            with contextlib.suppress(ClusterError):
                seen = self.running_nodes()
                if all(name in seen for name in want):
                    return time.monotonic() - began
            time.sleep(0.5)
        raise ClusterError(f"running nodes {seen} after {timeout:g}s, wanted {want}")

    def stop_app(self, which: int | str | Node) -> None:
        """``rabbitmqctl stop_app``: the node drops its clients and leaves the running set."""
        self.ctl(which, "stop_app")

    def start_app(self, which: int | str | Node, wait_s: float = 60.0) -> float:
        """``rabbitmqctl start_app`` and wait until it runs in the cluster again."""
        node = self.node(which)
        began = time.monotonic()
        self.ctl(node, "start_app", timeout=wait_s + 15)
        self.wait_running([node.name], timeout=wait_s)
        return time.monotonic() - began

    def queue_members(self, vhost_queue: str, via: int | str | Node = 1) -> list[str]:
        """Nodes holding a member of a quorum queue (``list_queues name type members``)."""
        rows = self.ctl_json(via, "list_queues", "name", "type", "members", "--quiet")
        for row in rows:
            if row.get("name") == vhost_queue:
                return sorted(row.get("members") or [])
        raise ClusterError(f"queue {vhost_queue!r} not found")

    def queue_leader(self, queue: str, via: int | str | Node = 1) -> str:
        """The node holding the leader of a quorum queue."""
        rows = self.ctl_json(via, "list_queues", "name", "leader", "--quiet")
        for row in rows:
            if row.get("name") == queue:
                return str(row.get("leader") or "")
        raise ClusterError(f"queue {queue!r} not found")

    def stop(self, remove: bool = True) -> None:
        """Stop every node (in parallel) and, with ``remove``, delete their directories."""
        self._load_pids()
        errors: list[str] = []
        threads = [
            threading.Thread(target=self._stop_node, args=(node, errors), daemon=True)
            for node in self.nodes
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(STOP_TIMEOUT_S + 30)
        if remove:
            shutil.rmtree(self.dir / "nodes", ignore_errors=True)
            shutil.rmtree(self.cookie_home, ignore_errors=True)
            for name in (STATE_FILE, "rabbitmq-env.conf"):
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / name).unlink()
        if errors:
            raise ClusterError("; ".join(errors))

    def _stop_node(self, node: Node, errors: list[str]) -> None:
        """Stop ``node`` if, and only if, the process group this cluster started for it lives.

        Nodes of the same name started by someone else (another DIR, a concurrent test run)
        are never addressed: their process group differs, and their cookie too.
        """
        pid = self._pids.get(node.name)
        if pid is None:
            return  # never started from here
        mine = (node.name, str(self.cookie_home))
        try:
            if _group_alive(pid, *mine):
                self.ctl(node, "stop", "--idempotent", timeout=STOP_TIMEOUT_S, check=False)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while _group_alive(pid, *mine) and time.monotonic() < deadline:
                time.sleep(0.25)
            if _group_alive(pid, *mine):
                errors.append(f"{node.name} ignored 'stop': killed its process group {pid}")
                _kill_group(pid, *mine)
        except Exception as exc:  # never leave a node behind because of one failure
            errors.append(f"{node.name}: {exc}")
            _kill_group(pid, *mine)
        finally:
            proc = self._procs.get(node.name)
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)

    # -- state for the command line -----------------------------------------------------

    def _save_state(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        state = {
            "prefix": self.prefix,
            "base_port": self.nodes[0].amqp_port,
            "formed_in_s": self.formed_in_s,
            "nodes": [
                {
                    "name": n.name,
                    "amqp_port": n.amqp_port,
                    "dist_port": n.dist_port,
                    "url": n.url,
                    "pgid": self._pids.get(n.name),
                }
                for n in self.nodes
            ],
        }
        (self.dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")

    def _load_pids(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            state = json.loads((self.dir / STATE_FILE).read_text())
            for entry in state["nodes"]:
                if entry.get("pgid") and entry["name"] not in self._pids:
                    self._pids[entry["name"]] = int(entry["pgid"])

    @classmethod
    def from_dir(cls, base_dir: str | os.PathLike[str]) -> RabbitCluster:
        path = Path(base_dir) / STATE_FILE
        if not path.is_file():
            raise ClusterError(f"{base_dir}: no cluster here (no {STATE_FILE})")
        state = json.loads(path.read_text())
        cluster = cls(
            base_dir, len(state["nodes"]), state["base_port"], prefix=state.get("prefix", "pabxc")
        )
        cluster.formed_in_s = state.get("formed_in_s")
        cluster._load_pids()
        return cluster


C = TypeVar("C", bound="RabbitCluster")


def start_in_free_slot(make: Callable[[int], C], slots: int) -> C:
    """``make(slot).start()`` for slot 0, 1, …: a taken slot (:class:`SlotBusy`) moves on.

    Whatever fails is stopped before the error goes on; the last slot's SlotBusy is raised.
    """
    for slot in range(slots):
        nodes = make(slot)
        try:
            nodes.start()
        except SlotBusy as exc:
            nodes.stop()
            if slot == slots - 1:
                raise
            nodes.log(f"{exc}; trying the next slot")
            continue
        except BaseException:
            nodes.stop()
            raise
        return nodes
    raise ValueError("slots must be at least 1")


@contextlib.contextmanager
def local_cluster(
    tmp_dir: str | os.PathLike[str],
    nodes: int = 3,
    base_port: int = 5681,
    *,
    slots: int = 1,
    prometheus: bool = False,
) -> Iterator[ClusterURLs]:
    """Start ``nodes`` clustered nodes under ``tmp_dir``, yield their AMQP URLs, tear down.

    With ``slots`` > 1, a taken slot (ports or node names in use, e.g. by a concurrent run of
    the same test) moves on to the next one: names ``pabxcb1…``, ``pabxcc1…`` and ports
    ``base_port + 10``, ``+ 20``…
    """

    def in_slot(slot: int) -> RabbitCluster:
        prefix = NODE_PREFIX + ("" if slot == 0 else chr(ord("a") + slot))
        return RabbitCluster(
            tmp_dir, nodes, base_port + 10 * slot, prefix=prefix, prometheus=prometheus
        )

    cluster = start_in_free_slot(in_slot, slots)
    try:
        urls = ClusterURLs(cluster.urls)
        urls.cluster = cluster
        yield urls
    finally:
        cluster.stop()


# -- helpers -----------------------------------------------------------------------------


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _epmd_names() -> set[str]:
    """Node names registered with the local epmd (empty when none runs)."""
    try:
        with socket.create_connection(("127.0.0.1", 4369), 2) as sock:
            sock.sendall(b"\x00\x01n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return set()
    names = set()
    for line in data[4:].decode(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "name":
            names.add(parts[1])
    return names


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _group_alive(pgid: int, node_name: str, home: str) -> bool:
    """Whether the process group still holds a process of ours for ``node_name``.

    Ours means: same process group, and the environment this module gave the node
    (its node name and its private HOME), so a reused pid or group is never taken for it.
    """
    wanted = (f"RABBITMQ_NODENAME={node_name}".encode(), f"HOME={home}".encode())
    for pid in _group_members(pgid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if all(item in environ for item in wanted):
            return True
    return False


def _kill_group(pgid: int, node_name: str, home: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _group_alive(pgid, node_name, home):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + 10
        while _group_alive(pgid, node_name, home) and time.monotonic() < deadline:
            time.sleep(0.2)


# -- command line ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster.rabbit_cluster",
        description="A private local RabbitMQ cluster (pabxcN@localhost) under DIR.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start and cluster the nodes; they keep running")
    up.add_argument("dir")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--base-port", type=int, default=5681)
    down = sub.add_parser("down", help="stop the nodes and delete their data")
    down.add_argument("dir")
    down.add_argument("--keep", action="store_true", help="keep data and logs")
    status = sub.add_parser("status", help="cluster_status and quorum queue members")
    status.add_argument("dir")
    ctl = sub.add_parser("ctl", help="run rabbitmqctl against node N: ctl DIR N ARGS...")
    ctl.add_argument("dir")
    ctl.add_argument("node")
    ctl.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)

    if args.command == "up":
        cluster = RabbitCluster(args.dir, args.nodes, args.base_port)
        if cluster.sbin is None:
            print("rabbitmq-server is not installed", file=sys.stderr)
            return 2
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            raise
        print(";".join(cluster.urls))
        print(f"formed in {cluster.formed_in_s:.1f}s", file=sys.stderr)
        return 0
    try:
        cluster = RabbitCluster.from_dir(args.dir)
    except ClusterError as exc:
        print(exc, file=sys.stderr)
        return 1
    if args.command == "down":
        cluster.stop(remove=not args.keep)
        return 0
    if args.command == "status":
        print(json.dumps({"running_nodes": cluster.running_nodes(), "urls": cluster.urls}))
        listing = cluster.ctl(1, "list_queues", "name", "type", "members", "leader", "--quiet")
        print(listing.stdout, end="")
        return 0
    node: int | str = int(args.node) if args.node.isdigit() else args.node
    done = cluster.ctl(node, *args.args, check=False)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
