"""The campaign: three worker processes under load and a nemesis, written down as a history.

One run starts a private store (a ``redis-server`` or a PostgreSQL server of its own, or a
SQLite file), two simulator targets ``a`` (rate limit 20/s) and ``b`` (unlimited), each behind
a :class:`TcpProxy`, the broker (the machine's node, or a private three-node cluster) behind
another, and three ``pabx-worker run`` processes. It publishes a mix of commands for ~100 live
calls for ``minutes`` while the nemesis breaks things, then mends everything, lets the fleet
drain, and writes every publication, PABX request, outcome event and fault as one JSON line
each.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from tests.campaign.checker import check
from tests.campaign.history import load
from tests.campaign.nemesis import Nemesis
from tests.kit.processes import (
    ROOT,
    RabbitCluster,
    WorkerProcess,
    find_sbin,
    free_port,
    local_cluster,
    start_redis,
    wait_until,
)
from tests.kit.proxy import TcpProxy
from tests.kit.rig import Rig
from tests.kit.samples import API_KEY, CHANNEL, COUNTED_BODY
from worker.tools.simulator import SimulatorThread

__all__ = ["Options", "run"]

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
#: First AMQP port of the private cluster (``--broker cluster``); clear of the cluster tests'.
CLUSTER_BASE_PORT = int(os.environ.get("PABX_CAMPAIGN_CLUSTER_PORT", "5741"))
WORKERS = 3
CONCURRENCY = 8
COMMAND_TTL_S = 30.0
RATE_LIMITS: dict[str, float | None] = {"a": 20.0, "b": None}
#: Share of new commands sent to target ``a`` (rate limited to 20/s).
SHARE_A = 0.3
#: Simulator settings between faults: a little latency, as a real PABX has.
BASELINE_FAULTS = {"latency_ms": 2, "latency_max_ms": 25}
LIVE_CALLS = 100


@dataclass(frozen=True)
class Options:
    minutes: float
    seed: int
    store: str = "redis"
    broker: str = "single"
    history: Path | None = None
    rate: float = 50.0
    drain_s: float = 120.0

    @property
    def history_path(self) -> Path:
        return self.history or ROOT / "bench" / "results" / f"campaign-{self.seed}.jsonl"


def log(message: str) -> None:
    print(f"[campaign {datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


# -- stores -------------------------------------------------------------------------------


class Store:
    """The run's private store: a ``redis-server`` or PostgreSQL server of its own, or a file.

    The servers run in a process group of their own, so a pause (SIGSTOP of the group) stops
    every process of the server, PostgreSQL's backends included, and nothing else.
    """

    def __init__(self, kind: str, workdir: Path) -> None:
        self.kind = kind
        self.proc: subprocess.Popen[bytes] | None = None
        if kind == "redis":
            self.url = self._start_redis(workdir)
        elif kind == "sqlite":
            self.url = f"sqlite:///{workdir / 'store.sqlite3'}"
        elif kind == "postgres":
            self.url = self._start_postgres(workdir)
        else:
            raise ValueError(f"unknown store {kind!r}")

    def _start_redis(self, workdir: Path) -> str:
        port = free_port()
        self.proc = start_redis(workdir, port, own_session=True)
        return f"redis://127.0.0.1:{port}/0"

    def _start_postgres(self, workdir: Path) -> str:
        """``initdb`` a throw-away cluster under ``workdir`` and start its ``postgres``.

        As root, the server runs as the ``postgres`` user (it refuses root); durability is
        off (``fsync``), since the data dies with the run.
        """
        bindir = _postgres_bindir()
        data = workdir / "postgres"
        data.mkdir()
        user: str | None = None
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(data, owner.pw_uid, owner.pw_gid)
            workdir.chmod(0o755)
            user = "postgres"
        subprocess.run(
            [
                *(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"),
                *("-E", "UTF8", "--no-sync"),
            ],
            user=user,
            check=True,
            capture_output=True,
        )
        port = free_port()
        log_file = (workdir / "postgres.log").open("wb")
        self.proc = subprocess.Popen(
            [
                *(str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(data)),
                *("-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"),
                *("-c", "synchronous_commit=off", "-c", "full_page_writes=off"),
            ],
            user=user,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        if not wait_until(lambda: _pg_ready(url), 30):
            raise RuntimeError("private postgres did not answer")
        return url

    @property
    def pausable(self) -> bool:
        return self.proc is not None

    def _signal(self, signum: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc is None:
            return
        self.resume()
        # SIGINT is PostgreSQL's fast shutdown (SIGTERM waits for clients); Redis quits on it.
        self._signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(10)


def _postgres_bindir() -> Path:
    """Where ``initdb`` and ``postgres`` are (Debian keeps them off ``PATH``)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), reverse=True)
    if not candidates:
        raise RuntimeError("initdb not found: the PostgreSQL server package is needed")
    return candidates[0].parent


def _pg_ready(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=1) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


# -- the load -----------------------------------------------------------------------------


@dataclass
class Call:
    ident: str
    pabx: str
    left: int
    last_order: float = 0.0


class Load:
    """Commands for a pool of live calls, re-sent copies, invalid and short-lived ones."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(f"load-{seed}")
        self._run = f"{seed}-{uuid.uuid4().hex[:6]}"
        self._made = 0
        self._calls_made = 0
        self._destination = 7_000_000
        self._calls = [self._new_call() for _ in range(LIVE_CALLS)]
        #: (raw body, publish record) of every first publication, for re-sent copies.
        self._sent: list[tuple[bytes, dict[str, Any]]] = []
        self._copies: Counter[str] = Counter()

    def _new_call(self) -> Call:
        self._calls_made += 1
        pabx = "a" if self._rng.random() < SHARE_A else "b"
        return Call(f"call-{self._run}-{self._calls_made:05d}", pabx, self._rng.randint(2, 8))

    def next(self) -> tuple[bytes, dict[str, Any]]:
        """The next publication: raw body and its ``publish`` record (``t`` set on confirm)."""
        roll = self._rng.random()
        if roll < 0.06 and self._sent:
            raw, first = self._rng.choice(self._sent[-2000:])
            self._copies[first["command_id"]] += 1
            copy = self._copies[first["command_id"]]
            return raw, {**first, "key": f"{first['command_id']}#{copy}", "copy": copy}
        raw, record = self._fresh(invalid=roll < 0.09, short=0.09 <= roll < 0.15)
        self._sent.append((raw, record))
        return raw, record

    def _fresh(self, *, invalid: bool, short: bool) -> tuple[bytes, dict[str, Any]]:
        index = self._rng.randrange(len(self._calls))
        call = self._calls[index]
        call.left -= 1
        if call.left <= 0:
            self._calls[index] = self._new_call()
        self._made += 1
        self._destination += 1
        command_id = f"cmd-{self._run}-{self._made:06d}"
        order = max(time.time(), call.last_order + 0.001)
        call.last_order = order
        deadline = order + COMMAND_TTL_S
        body: dict[str, Any] = {
            "command_id": command_id,
            "type": "redirect",
            "version": 1,
            "issued_at": _iso(order),
            "pabx": call.pabx,
            "redirect": {
                **COUNTED_BODY,
                "ID_CHAMADA": call.ident,
                "DADOS": command_id,
                "DISPOSITIVO_DESTINO": str(self._destination),
                "PRIORIDADE": "25" if invalid else str(self._rng.randint(0, 19)),
            },
        }
        if short:
            deadline = order + self._rng.uniform(1.0, 4.0)
            body["expires_at"] = _iso(deadline)
        record = {
            "kind": "publish",
            "key": f"{command_id}#0",
            "command_id": command_id,
            "call": f"{call.pabx}:{call.ident}",
            "pabx": call.pabx,
            "order": order,
            "deadline": deadline,
            "valid": not invalid,
            "copy": 0,
            "destination": str(self._destination),
        }
        return json.dumps(body).encode(), record


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds")


# -- the world the nemesis breaks ---------------------------------------------------------


class Fleet:
    """Simulators, proxies, store and worker processes of one run (the nemesis's World)."""

    targets: tuple[str, ...] = ("a", "b")
    workers = WORKERS

    def __init__(self, options: Options, workdir: Path) -> None:
        self._closers: list[Any] = []
        self.store = Store(options.store, workdir)
        self._closers.append(self.store.close)
        self.store_pausable = self.store.pausable
        self.cluster: RabbitCluster | None = None
        node_urls = self._start_cluster(workdir) if options.broker == "cluster" else [AMQP_URL]
        #: Nodes the nemesis may stop: never the first, which the producer and reader use.
        self.broker_nodes = tuple(range(2, len(node_urls) + 1))
        self.broker = TcpProxy.for_url(node_urls[0], 5672)
        self._closers.append(self.broker.close)
        # Worker i starts on node i (through the proxy for node 1) and fails over in turn.
        first = [self.broker.url(node_urls[0]), *node_urls[1:]]
        self._amqp_urls = [
            ";".join(first[i % len(first) :] + first[: i % len(first)]) for i in range(WORKERS)
        ]
        self.rig = Rig(
            node_urls[0],
            api_key=API_KEY,
            pabx_url=None,
            pabx_api_key=None,
            store_url=self.store.url,
            concurrency=CONCURRENCY,
            lease_s=6.0,
            command_ttl_s=COMMAND_TTL_S,
            pabx_connect_timeout_s=0.5,
            pabx_read_timeout_s=1.5,
            retry_delays_s=(0.2, 0.5, 1.0),
        )
        self._closers.append(self.rig.close)
        sim_b = SimulatorThread(api_key=API_KEY).start()
        self._closers.append(sim_b.stop)
        self.sims = {"a": self.rig.sim, "b": sim_b}
        self.proxies = {name: TcpProxy.for_url(sim.url, 80) for name, sim in self.sims.items()}
        self._closers.extend(proxy.close for proxy in self.proxies.values())
        for name in self.targets:
            self.clear_faults(name)
        #: Each target's rate limit now: the nemesis changes them with a rolling restart.
        self.rates: dict[str, float | None] = dict(RATE_LIMITS)
        self._env = {"PABX_WORKER_PABX": self._targets_env()}
        self.all_workers: list[WorkerProcess] = []
        self.fleet: list[WorkerProcess | None] = [None] * WORKERS
        self._lock = threading.Lock()
        #: One lock per worker place, held while it is (re)started.
        self._places = [threading.Lock() for _ in range(WORKERS)]

    def _start_cluster(self, workdir: Path) -> list[str]:
        """A private three-node RabbitMQ cluster for this run, torn down at the end."""
        if find_sbin() is None:
            raise RuntimeError("--broker cluster: rabbitmq-server is not on PATH")
        started = local_cluster(workdir / "rabbit", 3, CLUSTER_BASE_PORT, slots=4)
        urls = started.__enter__()
        self._closers.append(lambda: started.__exit__(None, None, None))
        self.cluster = urls.cluster
        log(f"private cluster up: {', '.join(urls)}")
        return list(urls)

    def _targets_env(self) -> str:
        return json.dumps(
            {
                name: {
                    "url": f"http://127.0.0.1:{self.proxies[name].port}",
                    "api_key": API_KEY,
                    "channel_id": CHANNEL,
                    **({"rate_limit": self.rates[name]} if self.rates[name] else {}),
                }
                for name in self.targets
            }
        )

    def set_rate_limit(self, target: str, rate: float | None) -> None:
        """Restart every worker, one at a time, with a new rate limit for ``target``."""
        self.rates[target] = rate
        self._env = {**self._env, "PABX_WORKER_PABX": self._targets_env()}
        for index in range(self.workers):
            self.terminate_worker(index)
            self.start_worker(index)

    # -- workers ------------------------------------------------------------------------

    def start_worker(self, index: int) -> None:
        """Start worker ``index``; one still running in that place is stopped first.

        Otherwise a restart racing another (a kill during a rolling restart) would leave an
        orphan running with the settings of its day, such as an old rate limit.
        """
        with self._places[index]:
            self.terminate_worker(index)
            env = {**self._env, "PABX_WORKER_AMQP_URL": self._amqp_urls[index]}
            worker = WorkerProcess(self.rig.settings, **env)
            with self._lock:
                self.all_workers.append(worker)
                self.fleet[index] = worker
            worker.wait_ready(60)

    def kill_worker(self, index: int) -> int:
        worker = self.fleet[index]
        if worker is None or worker.proc.poll() is not None:
            return -1
        worker.kill()
        return worker.proc.pid

    def terminate_worker(self, index: int) -> int | None:
        worker = self.fleet[index]
        if worker is None or worker.proc.poll() is not None:
            return None
        code, _ = worker.terminate(self.rig.settings.shutdown_timeout_s + 5)
        if code is None:
            worker.close()
        return code

    def ensure_workers(self) -> None:
        for index, worker in enumerate(self.fleet):
            if worker is None or worker.proc.poll() is not None:
                log(f"worker {index} was down at the end: restarting it")
                self.start_worker(index)

    # -- broker, PABX, store ------------------------------------------------------------

    def broker_cut(self) -> int:
        return self.broker.cut()

    def node_stop(self, node: int) -> None:
        """``rabbitmqctl stop_app`` on a node of the private cluster: its clients are cut."""
        assert self.cluster is not None
        self.cluster.stop_app(node)

    def node_start(self, node: int) -> float:
        """``rabbitmqctl start_app``, waiting until the node runs in the cluster again."""
        assert self.cluster is not None
        return self.cluster.start_app(node, wait_s=90)

    def set_faults(self, target: str, **faults: Any) -> None:
        url = f"{self.sims[target].url}/_sim/faults"
        requests.put(url, json=faults, timeout=5).raise_for_status()

    def clear_faults(self, target: str) -> None:
        self.set_faults(target, **BASELINE_FAULTS)

    def target_down(self, target: str) -> None:
        self.proxies[target].refuse()

    def target_up(self, target: str) -> None:
        self.proxies[target].restore()

    def store_pause(self) -> None:
        self.store.pause()

    def store_resume(self) -> None:
        self.store.resume()

    def mend(self) -> None:
        """Undo every fault that may still hold, and bring the fleet back to three workers."""
        self.store.resume()
        self.broker.restore()
        if self.cluster is not None:
            for node in self.broker_nodes:
                with contextlib.suppress(Exception):
                    self.cluster.start_app(node, wait_s=90)
        for name in self.targets:
            self.proxies[name].restore()
            self.clear_faults(name)
        self.ensure_workers()

    def requests(self) -> list[dict[str, Any]]:
        found = []
        for name, sim in self.sims.items():
            reply = requests.get(f"{sim.url}/_sim/requests", timeout=30)
            reply.raise_for_status()
            for record in reply.json()["requests"]:
                body = record.get("body")
                body = body if isinstance(body, dict) else {}
                found.append(
                    {
                        "kind": "request",
                        "t": record["arrived"],
                        "ended": record.get("ended"),
                        "target": name,
                        "command_id": body.get("DADOS"),
                        "call": f"{name}:{body.get('ID_CHAMADA')}",
                        "status": record.get("status"),
                        "destination": body.get("DISPOSITIVO_DESTINO"),
                    }
                )
        return found

    def close(self, logs: Path) -> None:
        with contextlib.suppress(Exception):
            self.store.resume()
        for worker in self.all_workers:
            with contextlib.suppress(Exception):
                if worker.proc.poll() is None:
                    worker.terminate(15)
            worker.close()
        with contextlib.suppress(OSError), logs.open("w", encoding="utf-8") as out:
            for n, worker in enumerate(self.all_workers):
                out.write(f"==== worker process {n} (pid {worker.proc.pid}) ====\n{worker.log}")
        for closer in reversed(self._closers):
            try:
                closer()
            except Exception as exc:
                log(f"tear-down step failed: {exc!r}")


# -- publishing and reading outcomes ------------------------------------------------------


class Wire:
    """The producer and outcome reader: one pika connection straight to the broker."""

    def __init__(self, rig: Rig, history: list[dict[str, Any]]) -> None:
        self._rig = rig
        self._history = history
        self.keys: set[str] = set()
        self.answered: set[str] = set()
        self._peer = rig.peer
        self._peer.channel.basic_consume(rig.results_queue, self._on_outcome, auto_ack=True)

    def publish(self, raw: bytes, record: dict[str, Any]) -> None:
        self._peer.publish(raw, correlation_id=record["key"], message_id=record["command_id"])
        self.keys.add(record["key"])
        self._history.append({**record, "t": time.time()})

    def _on_outcome(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        event = json.loads(body)
        data = event.get("data") or {}
        error = data.get("error") or {}
        key = props.correlation_id if props.correlation_id in self.keys else None
        if key is not None:
            self.answered.add(key)
        self._history.append(
            {
                "kind": "outcome",
                "t": time.time(),
                "command_id": data.get("command_id"),
                "key": key,
                "event_id": event.get("id"),
                "status": data.get("status"),
                "error_code": error.get("code"),
                "error_message": error.get("message"),
                "attempts": data.get("attempts"),
                "duplicate": data.get("duplicate"),
            }
        )

    def pump(self, seconds: float) -> None:
        self._peer.connection.process_data_events(time_limit=max(seconds, 0))

    @property
    def missing(self) -> int:
        return len(self.keys - self.answered)


# -- the run --------------------------------------------------------------------------------


def _load(wire: Wire, load: Load, options: Options) -> float:
    """Publish at ``options.rate`` for ``options.minutes``; returns the real rate."""
    start = time.monotonic()
    end = start + options.minutes * 60
    interval = 1.0 / options.rate
    next_at = start
    published = 0
    last_report = start
    while (now := time.monotonic()) < end:
        if now >= next_at:
            wire.publish(*load.next())
            published += 1
            next_at += interval
            if next_at < now - 1.0:  # fell behind by a second: do not burst to catch up
                next_at = now
        else:
            wire.pump(min(next_at - now, 0.05))
        if now - last_report >= 15:
            last_report = now
            log(
                f"{published} published ({published / (now - start):.1f}/s),"
                f" {wire.missing} awaiting an outcome"
            )
    return published / (time.monotonic() - start)


def _drain(wire: Wire, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while wire.missing and time.monotonic() < deadline:
        wire.pump(0.2)
    wire.pump(1.0)  # stragglers: re-published events, copies
    return wire.missing == 0


def _config(options: Options, started: float) -> dict[str, Any]:
    return {
        "kind": "config",
        "t": started,
        "seed": options.seed,
        "workers": WORKERS,
        "concurrency": CONCURRENCY,
        "retry_ambiguous": False,
        "command_ttl_s": COMMAND_TTL_S,
        "targets": {name: {"rate_limit": rate} for name, rate in RATE_LIMITS.items()},
        "store": options.store,
        "broker": options.broker,
        "rate": options.rate,
        "minutes": options.minutes,
    }


def write_history(path: Path, config: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        out.write(json.dumps(config) + "\n")
        for entry in sorted(entries, key=lambda e: e["t"]):
            out.write(json.dumps(entry) + "\n")


def run(options: Options) -> int:
    """Run one campaign; 0 when the checker finds no violation, else 1."""
    log(
        f"seed {options.seed}, {options.minutes} min at {options.rate}/s,"
        f" store {options.store}, broker {options.broker}"
    )
    history: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix=f"campaign-{options.seed}-"))
    started = time.time()
    config = _config(options, started)
    path = options.history_path
    fleet: Fleet | None = None
    try:
        fleet = Fleet(options, workdir)
        for index in range(WORKERS):
            fleet.start_worker(index)
        log(f"{WORKERS} workers consuming; store {options.store}; load starts")
        wire = Wire(fleet.rig, history)
        nemesis = Nemesis(fleet, options.seed, history.append, log)
        nemesis.start()
        try:
            rate = _load(wire, Load(options.seed), options)
        finally:
            log("stopping the nemesis")
            nemesis.stop()
        config["real_rate"] = round(rate, 2)
        fleet.mend()
        log(f"load over at {rate:.1f}/s; draining ({wire.missing} publications awaiting)")
        drained = _drain(wire, options.drain_s)
        config["drained"] = drained
        log("drained" if drained else f"NOT drained: {wire.missing} publications lack an outcome")
        history.extend(fleet.requests())
    finally:
        if fleet is not None:
            fleet.close(path.with_suffix(".workers.log"))
        shutil.rmtree(workdir, ignore_errors=True)
    write_history(path, config, history)
    _summary(history, config, path)
    return _check(path)


def _summary(history: list[dict[str, Any]], config: dict[str, Any], path: Path) -> None:
    kinds = Counter(entry["kind"] for entry in history)
    faults = Counter(entry["fault"] for entry in history if entry["kind"] == "fault")
    statuses = Counter(
        (e["status"], e["error_code"])
        for e in history
        if e["kind"] == "outcome" and not e["duplicate"]
    )
    log(f"history: {path}")
    log(f"counts: {dict(kinds)}; real rate {config.get('real_rate')}/s")
    log(f"faults: {dict(faults)}")
    log(f"first outcomes: {dict(statuses)}")


def _check(path: Path) -> int:
    report = check(load(path))
    print(report.table())
    return 0 if report.ok else 1
