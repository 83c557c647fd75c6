"""Chaos harness: sizes, a TCP proxy that breaks connections, worker processes, and the tally.

Every scenario sends commands whose ``command_id`` is also their ``ID_CHAMADA`` and ``DADOS``,
so PABX requests recorded by the simulator can be counted per command, and reads every
outcome event from a durable queue bound to the results exchange with ``#``. The tally of a
scenario is printed as a table (visible with ``pytest -s``) and appended as one JSON line to
``bench/results/chaos.jsonl`` (git-ignored; ``PABX_CHAOS_RESULTS`` names another file).

``PABX_CHAOS_FULL=1`` (``make chaos``) selects the full sizes; without it the reduced ones,
which run inside ``make test``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pika
import pika.exceptions
import requests
from pydantic import SecretStr

from tests.integration.conftest import API_KEY, Peer, private_settings
from worker.settings import ENV_PREFIX, Settings
from worker.simulator import SimulatorThread
from worker.topology import Topology

FULL = os.environ.get("PABX_CHAOS_FULL", "").strip().lower() not in ("", "0", "false", "no")
MODE = "full" if FULL else "reduced"
ROOT = Path(__file__).resolve().parents[2]
RESULTS_FILE = Path(
    os.environ.get("PABX_CHAOS_RESULTS", ROOT / "bench" / "results" / "chaos.jsonl")
)


def size(reduced: Any, full: Any) -> Any:
    """The reduced value inside ``make test``, the full one under ``make chaos``."""
    return full if FULL else reduced


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# -- a TCP proxy that can break -----------------------------------------------------------


class _Link:
    """One relayed connection: the client's socket and ours to the target."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        self.dead = False

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]

    def cut(self) -> None:
        """Break both sides at once (reset, as a dropped network path looks to the peers)."""
        self.dead = True
        for sock in self.sockets():
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in self.sockets():
            with contextlib.suppress(OSError):
                sock.close()


def _reusable() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _listening(port: int) -> socket.socket:
    sock = _reusable()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    sock.settimeout(0.1)
    return sock


class TcpProxy:
    """Relays 127.0.0.1:``port`` to ``target``; can cut every connection and refuse new ones.

    ``refuse()``: cut everything and stop listening, so new connections are refused (a
    stopped server: the client gets ECONNREFUSED and knows nothing was sent).
    ``blackhole()``: cut everything; new connections are accepted and never answered
    (an unreachable host whose connect attempts time out). ``restore()`` relays again.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = _listening(0)
        self.port: int = self._listener.getsockname()[1]
        #: While refusing: bound, not listening, so the port stays ours and SYNs get RST.
        self._placeholder: socket.socket | None = None
        self.mode = "open"
        self.accepted = 0
        self.refused = 0
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._accept_loop, name="chaos-proxy", daemon=True)
        self._thread.start()

    @classmethod
    def for_url(cls, url: str, default_port: int) -> TcpProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or default_port)

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def live(self) -> int:
        with self._lock:
            return sum(1 for link in self._links if not link.dead)

    def cut(self) -> int:
        """Break every open connection; returns how many."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.cut()
        return len(links)

    def refuse(self) -> int:
        self.mode = "refuse"
        with self._lock:
            if self._placeholder is None:
                self._placeholder = _reusable()
                self._placeholder.bind(("127.0.0.1", self.port))
                self._listener.close()
        return self.cut()

    def blackhole(self) -> int:
        self.mode = "blackhole"
        return self.cut()

    def restore(self) -> None:
        with self._lock:
            if self._placeholder is not None:  # listen again on the same port
                self._listener = _listening(self.port)
                self._placeholder.close()
                self._placeholder = None
        self.mode = "open"
        with self._lock:
            held = [link for link in self._links if link.upstream is None]
        for link in held:
            link.cut()

    @contextlib.contextmanager
    def outage(self, mode: str = "refuse") -> Iterator[None]:
        self.refuse() if mode == "refuse" else self.blackhole()
        try:
            yield
        finally:
            self.restore()

    def close(self) -> None:
        self._closing = True
        self.cut()
        self._thread.join(5)
        with self._lock:
            self._listener.close()
            if self._placeholder is not None:
                self._placeholder.close()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed: refusing, or closing
                time.sleep(0.02)
                continue
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.mode == "refuse":
            self.refused += 1
            _Link(client, None).cut()
            client.close()
            return
        upstream = None
        if self.mode == "open":
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                return
            upstream.settimeout(None)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, upstream)
        with self._lock:
            self._links.add(link)
        self.accepted += 1
        threading.Thread(target=self._pump, args=(link,), daemon=True).start()

    def _pump(self, link: _Link) -> None:
        try:
            socks = link.sockets()
            while not link.dead and not self._closing:
                readable, _, _ = select.select(socks, [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if link.upstream is None:
                        continue  # blackholed: swallow everything
                    other = link.upstream if sock is link.client else link.client
                    other.sendall(data)
        except OSError:
            pass
        finally:
            if not link.dead:
                link.cut()
            link.close()
            with self._lock:
                self._links.discard(link)


# -- the worker as a separate process ---------------------------------------------------


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """``PABX_WORKER_*`` variables for every setting of ``settings``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None or name == "pabx":
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, tuple | list):
            value = json.dumps(list(value))
        env[f"{ENV_PREFIX}{name.upper()}"] = str(value)
    env.update(extra)
    return env


class WorkerProcess:
    """``python -m worker run`` with its log lines (stderr) collected as they come."""

    def __init__(self, settings: Settings, *args: str, **extra_env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", *args],
            env=worker_env(settings, **extra_env),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        self.lines: list[str] = []
        self.consuming = threading.Event()
        self.started_consuming = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            if _message(line) == "consuming":
                self.started_consuming += 1
                self.consuming.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def messages(self) -> list[str]:
        return [m for m in (_message(line) for line in self.lines) if m]

    def wait_ready(self, timeout: float = 30.0) -> None:
        if not wait_until(lambda: self.consuming.is_set() or self.proc.poll() is not None, timeout):
            raise AssertionError(f"worker not consuming after {timeout} s:\n{self.log[-3000:]}")
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log[-3000:]}")

    def kill(self) -> None:
        """``kill -9``."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._reader.join(5)

    def terminate(self, timeout: float) -> tuple[int | None, float]:
        """SIGTERM; returns the exit code (None if still running after ``timeout``) and time."""
        start = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - start

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _message(line: str) -> str | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry.get("message") if isinstance(entry, dict) else None


# -- commands, outcomes and PABX requests -----------------------------------------------

VENDOR_BODY = {
    "DISPOSITIVO": "1125000",
    "SENHA_DISPOSITIVO": "4567",
    "DISPOSITIVO_DESTINO": "1132000",
    "PRIORIDADE": "0",
    "FONTE_MUSICA": "1",
    "TEMPO_FILA": "23",
}


def command(command_id: str, **changes: Any) -> dict[str, Any]:
    """A valid command; its id is also its ``ID_CHAMADA`` and ``DADOS`` (to count requests)."""
    redirect = {
        **VENDOR_BODY,
        "ID_CHAMADA": command_id,
        "DADOS": command_id[:100],
        **changes.pop("redirect", {}),
    }
    return {
        "command_id": command_id,
        "type": "redirect",
        "version": 1,
        "issued_at": datetime.now(UTC).isoformat(),
        "redirect": redirect,
        **changes,
    }


def command_ids(scenario: str, count: int) -> list[str]:
    run = uuid.uuid4().hex[:8]
    return [f"{scenario}-{run}-{i:05d}" for i in range(count)]


@dataclass
class Seen:
    """One outcome event as received."""

    event: dict[str, Any]
    properties: Any
    raw: bytes
    at: float


class Rig:
    """One scenario's world: a simulator, a private topology, a reader of outcome events."""

    def __init__(self, amqp_url: str, *, api_key: str = API_KEY, **settings: Any) -> None:
        self.amqp_url = amqp_url
        self.sim = SimulatorThread(api_key=api_key).start()
        settings.setdefault("pabx_api_key", api_key)
        self.settings = private_settings(amqp_url, self.sim.url, **settings)
        self.topology = Topology.from_settings(self.settings)
        #: Retry queues declared by workers on variants of the settings, deleted at the end.
        self._extra_queues: set[str] = set()
        self.results_queue = self.settings.command_queue.replace(".redirect", ".chaos-results")
        self.seen: list[Seen] = []
        self._closers: list[Callable[[], None]] = []
        self._connect(declare=True)

    # -- broker side ----------------------------------------------------------------

    def _connect(self, declare: bool = False) -> None:
        params = pika.URLParameters(self.amqp_url)
        params.heartbeat = 600
        connection = pika.BlockingConnection(params)
        channel = connection.channel()
        channel.confirm_delivery()
        if declare:
            for ex in self.topology.exchanges:
                channel.exchange_declare(ex.name, ex.type, durable=True, arguments=ex.arguments)
            for q in self.topology.queues:
                channel.queue_declare(q.name, durable=True, arguments=q.arguments)
            for b in self.topology.bindings:
                channel.queue_bind(b.queue, b.exchange, b.routing_key)
            channel.queue_declare(self.results_queue, durable=True)
            channel.queue_bind(self.results_queue, self.settings.results_exchange, "#")
        self.peer = Peer(self.settings, connection, channel, self.results_queue)

    def reconnect(self, timeout: float = 120.0) -> None:
        """Open a new reader connection (after a broker restart)."""
        with contextlib.suppress(Exception):
            self.peer.connection.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._connect()
                return
            except pika.exceptions.AMQPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def variant(self, **updates: Any) -> Settings:
        """The rig's settings (same topology names) with ``updates``, cleaned up at the end."""
        settings = self.settings.model_copy(update=updates)
        self._extra_queues.update(Topology.from_settings(settings).retry_queues.values())
        return settings

    def publish(self, commands: Iterable[dict[str, Any]], **props: Any) -> None:
        for cmd in commands:
            cid = cmd["command_id"]
            self.peer.publish(cmd, correlation_id=cid, message_id=cid, **props)

    def queue_length(self, queue: str | None = None) -> int:
        return self.peer.queue_length(queue or self.settings.command_queue)

    def pending(self) -> dict[str, int]:
        """Messages ready in the command queue and in every retry queue."""
        names = [self.settings.command_queue, *self.topology.retry_queues.values()]
        return {name: self.queue_length(name) for name in names}

    def consumers(self) -> int:
        ok = self.peer.channel.queue_declare(self.settings.command_queue, passive=True)
        return int(ok.method.consumer_count)

    def drain(self, queue: str) -> list[tuple[Any, bytes]]:
        got: list[tuple[Any, bytes]] = []
        while True:
            method, props, body = self.peer.channel.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.append((props, body))

    # -- outcome events ---------------------------------------------------------------

    def poll(self) -> int:
        """Read every outcome event waiting in the results queue; returns how many."""
        got = 0
        while True:
            method, props, body = self.peer.channel.basic_get(self.results_queue, auto_ack=True)
            if method is None:
                return got
            self.seen.append(Seen(json.loads(body), props, body, time.monotonic()))
            got += 1

    def events(self) -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = {}
        for seen in self.seen:
            cid = seen.event["data"]["command_id"]
            found.setdefault(cid, []).append(seen.event)
        return found

    def finished(self) -> set[str]:
        self.poll()
        return {s.event["data"]["command_id"] for s in self.seen}

    def wait_outcomes(self, ids: Iterable[str], timeout: float) -> bool:
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            if wanted <= self.finished():
                return True
            if time.monotonic() > deadline:
                return False
            self.peer.connection.sleep(0.05)

    def settle(self, seconds: float = 0.5) -> None:
        """Let stragglers (re-published events, retry copies) arrive, then read them."""
        self.peer.connection.sleep(seconds)
        self.poll()

    # -- PABX side --------------------------------------------------------------------

    def faults(self, **faults: Any) -> None:
        requests.put(f"{self.sim.url}/_sim/faults", json=faults, timeout=5).raise_for_status()

    def pabx_requests(self) -> list[dict[str, Any]]:
        reply = requests.get(f"{self.sim.url}/_sim/requests", timeout=10)
        reply.raise_for_status()
        return list(reply.json()["requests"])

    def requests_by_command(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for record in self.pabx_requests():
            body = record.get("body")
            if isinstance(body, dict):
                counts[str(body.get("DADOS") or body.get("ID_CHAMADA"))] += 1
        return counts

    # -- clean-up ---------------------------------------------------------------------

    def on_close(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def close(self) -> None:
        for closer in reversed(self._closers):
            with contextlib.suppress(Exception):
                closer()
        with contextlib.suppress(Exception):
            self.reconnect(timeout=10)
        channel = self.peer.channel
        queues = {q.name for q in self.topology.queues} | self._extra_queues
        for q in [*sorted(queues), self.results_queue]:
            with contextlib.suppress(Exception):
                channel.queue_delete(q)
        for ex in self.topology.exchanges:
            with contextlib.suppress(Exception):
                channel.exchange_delete(ex.name)
        with contextlib.suppress(Exception):
            self.peer.connection.close()
        self.sim.stop()


# -- the tally ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What happened to one scenario's commands."""

    scenario: str
    sent: list[str]
    events: dict[str, list[dict[str, Any]]]
    requests: Counter[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, scenario: str, rig: Rig, sent: list[str], **extra: Any) -> Tally:
        rig.poll()
        mine = set(sent)
        events = {cid: evs for cid, evs in rig.events().items() if cid in mine}
        requests_ = Counter({cid: n for cid, n in rig.requests_by_command().items() if cid in mine})
        return cls(scenario, sent, events, requests_, extra)

    @property
    def statuses(self) -> Counter[str]:
        return Counter(evs[0]["data"]["status"] for evs in self.events.values())

    @property
    def lost(self) -> list[str]:
        return [cid for cid in self.sent if not self.events.get(cid)]

    @property
    def multiple_outcomes(self) -> list[str]:
        """Commands with more than one distinct event id: never allowed."""
        return [cid for cid, evs in self.events.items() if len({e["id"] for e in evs}) > 1]

    @property
    def republished(self) -> int:
        """Events received again with the same id (allowed: e.g. killed before the ack)."""
        return sum(len(evs) - 1 for evs in self.events.values())

    @property
    def only_as_duplicate(self) -> list[str]:
        """Commands whose every event says ``duplicate: true`` (the first one was never sent)."""
        return [cid for cid, evs in self.events.items() if all(e["data"]["duplicate"] for e in evs)]

    @property
    def surplus_requests(self) -> int:
        return sum(n - 1 for n in self.requests.values() if n > 1)

    @property
    def sent_twice(self) -> list[str]:
        return [cid for cid, n in self.requests.items() if n > 1]

    def row(self) -> dict[str, Any]:
        statuses = self.statuses
        return {
            "scenario": self.scenario,
            "mode": MODE,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "sent": len(self.sent),
            "outcomes": {
                s: statuses.get(s, 0) for s in ("accepted", "rejected", "failed", "expired")
            },
            "error_codes": dict(
                Counter(
                    (evs[0]["data"]["error"] or {}).get("code", "-")
                    for evs in self.events.values()
                    if evs[0]["data"]["error"]
                )
            ),
            "lost": len(self.lost),
            "multiple_outcomes": len(self.multiple_outcomes),
            "republished_same_id": self.republished,
            "outcome_only_as_duplicate": len(self.only_as_duplicate),
            "pabx_requests": sum(self.requests.values()),
            "surplus_pabx_requests": self.surplus_requests,
            "commands_sent_twice": len(self.sent_twice),
            **self.extra,
        }

    def report(self) -> dict[str, Any]:
        return report(self.row())


def report(row: dict[str, Any]) -> dict[str, Any]:
    """Print a scenario's table and append it to :data:`RESULTS_FILE` as one JSON line."""
    row = {"mode": MODE, "at": datetime.now(UTC).isoformat(timespec="seconds"), **row}
    print(format_table(row))
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS_FILE.open("a", encoding="utf-8") as out:
        out.write(json.dumps(row, default=str) + "\n")
    return row


def format_table(row: dict[str, Any]) -> str:
    title = f" chaos: {row['scenario']} [{row['mode']}] "
    lines = ["", f"+{title:-^74}+"]
    for key, value in row.items():
        if key in ("scenario", "mode", "at"):
            continue
        if isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, float):
            value = f"{value:.2f}"
        lines.append(f"| {key.replace('_', ' '):<30} {value!s:>41} |")
    lines.append("+" + "-" * 74 + "+")
    return "\n".join(lines)


class StateMonitor:
    """Samples a worker's state every few milliseconds and keeps the changes."""

    def __init__(self, worker: Any, every_s: float = 0.005) -> None:
        self._worker = worker
        self._every = every_s
        self.changes: list[tuple[float, bool, bool, bool]] = []
        #: (time, commands in flight) at every change.
        self.in_flight: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[bool, bool, bool]:
        state = self._worker.state
        return state.connected, state.consuming, self._worker.ready.is_set()

    def _run(self) -> None:
        last = None
        last_in_flight = -1
        while not self._stop.is_set():
            now = self._sample()
            if now != last:
                self.changes.append((time.monotonic(), *now))
                last = now
            in_flight = self._worker.state.in_flight
            if in_flight != last_in_flight:
                self.in_flight.append((time.monotonic(), in_flight))
                last_in_flight = in_flight
            self._stop.wait(self._every)

    def peak_in_flight(self, since: float) -> int:
        """The most commands in flight at once after ``since``."""
        return max((n for t, n in self.in_flight if t >= since), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, start: float, end: float) -> list[tuple[float, bool, bool, bool]]:
        """The state at ``start`` and every change up to ``end``."""
        before = [c for c in self.changes if c[0] <= start]
        return before[-1:] + [c for c in self.changes if start < c[0] <= end]

    def ready_flips(self) -> int:
        """How many times readiness went from true to false."""
        flips, was = 0, False
        for _, _, _, ready in self.changes:
            if was and not ready:
                flips += 1
            was = ready
        return flips
