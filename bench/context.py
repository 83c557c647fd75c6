"""The context of a bench run: private scenarios, their stores, consumers and samplers."""

from __future__ import annotations

import contextlib
import functools
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.broker import Broker
from bench.commands import API_KEY, CHANNEL_ID
from bench.options import BenchError, Options, is_worker
from bench.processes import PYTHON, Child, Simulator, child_env, quietly
from bench.sampling import Sampler
from tests.kit.topology import private_names
from worker.contract.settings import Settings, load_settings
from worker.contract.topology import Topology

__all__ = ["Context", "Scenario"]


@dataclass
class Scenario:
    """One scenario's private topology (``bench.<prefix>.*``) and idempotency store."""

    prefix: str
    settings: Settings
    topology: Topology
    store: str
    #: The settings as given, for the worker's PABX_WORKER_* environment.
    values: dict[str, Any]


@dataclass
class Context:
    """What every scenario of one run shares: the options, the broker, the simulator, the
    processes started (so none outlives the run)."""

    options: Options
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    seq: int = 0
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pabx-bench-")))
    broker: Broker | None = None
    sim: Simulator | None = None
    rabbit: psutil.Process | None = None
    #: Every process started for a scenario, so none outlives the run.
    children: list[Child] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(name, argv, self.options.log_dir / self.run_id, env)
        self.children.append(child)
        return child

    def stop_leftovers(self) -> None:
        for child in self.children:
            if child.alive():
                self.log(f"  (stopping leftover {child.name}, pid {child.pid})")
                quietly(functools.partial(child.stop, 10), self.log)

    def log(self, message: str) -> None:
        self.options.progress(message)

    def new_scenario(self, store: str, **extra: Any) -> Scenario:
        self.seq += 1
        prefix = f"b{self.run_id}{self.seq:02d}"
        assert self.sim is not None
        values: dict[str, Any] = {
            "amqp_url": self.options.amqp_url,
            "pabx_url": self.sim.url,
            "pabx_api_key": API_KEY,
            "pabx_channel_id": CHANNEL_ID,
            "store_url": self.store_url(store, prefix),
            "concurrency": self.options.concurrency,
            "http_port": 0,
            # A drain of many commands may take longer than the default 120 s TTL.
            "command_ttl_s": 3600,
            "queue_type": self.options.queue_type,
            **private_names(f"bench.{prefix}"),
            **extra,
        }
        settings = load_settings(None, **values)
        return Scenario(prefix, settings, Topology.from_settings(settings), store, values)

    def store_url(self, store: str, prefix: str) -> str:
        if store == "sqlite":
            return f"sqlite:///{self.tmp / (prefix + '.sqlite3')}"
        if store == "memory":
            return "memory://"
        if store == "redis":
            return self.options.redis_url
        if store == "postgres":
            return self.options.postgres_url
        raise BenchError(f"unknown store {store!r}")

    def cleanup_store(self, scenario: Scenario) -> None:
        prefix = scenario.prefix
        if scenario.store == "sqlite":
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    (self.tmp / f"{prefix}.sqlite3{suffix}").unlink()
        elif scenario.store == "redis":
            import redis

            with redis.Redis.from_url(self.options.redis_url) as client:
                keys = list(client.scan_iter(match=f"pabx:cmd:{prefix}-*", count=1000))
                for i in range(0, len(keys), 1000):
                    client.delete(*keys[i : i + 1000])
        elif scenario.store == "postgres":
            import psycopg

            with psycopg.connect(self.options.postgres_url, autocommit=True) as conn:
                exists = conn.execute("SELECT to_regclass('pabx_commands')").fetchone()
                if exists and exists[0]:
                    conn.execute(
                        "DELETE FROM pabx_commands WHERE command_id LIKE %s", (f"{prefix}-%",)
                    )

    @contextlib.contextmanager
    def topology(self, scenario: Scenario) -> Iterator[None]:
        assert self.broker is not None
        self.broker.declare(scenario.topology)
        try:
            yield
        finally:
            self.broker.delete(scenario.topology)
            try:
                self.cleanup_store(scenario)
            except Exception as exc:  # never hide the scenario's own result
                self.log(f"  (could not clean the {scenario.store} store: {exc})")

    def start_consumer(self, kind: str, scenario: Scenario, name: str) -> Child:
        s = scenario.settings
        if is_worker(kind):
            env = child_env(
                {f"PABX_WORKER_{k.upper()}": str(v) for k, v in scenario.values.items()}
            )
            argv = [PYTHON, "-m", "worker", "run"]
            if kind != "worker":
                argv = [PYTHON, "-m", "bench.variants", kind.partition(":")[2]]
            return self.spawn(name, argv, env)
        argv = [
            PYTHON,
            "-m",
            "bench.peers",
            kind,
            "--amqp-url",
            s.amqp_url,
            "--queue",
            s.command_queue,
            "--results-exchange",
            s.results_exchange,
            "--pabx-url",
            s.pabx_url,
            "--api-key",
            API_KEY,
            "--concurrency",
            str(s.concurrency),
        ]
        if not self.options.peer_confirms:
            argv.append("--no-confirm")
        return self.spawn(name, argv, child_env())

    def start_profiler(self, child: Child, name: str) -> Child | None:
        out_dir = self.options.py_spy_dir
        if out_dir is None:
            return None
        out_dir.mkdir(parents=True, exist_ok=True)
        local = Path(PYTHON).parent / "py-spy"
        exe = str(local) if local.exists() else shutil.which("py-spy")
        if exe is None:
            raise BenchError("--py-spy: py-spy is not installed (pip install py-spy)")
        argv = [
            exe,
            "record",
            "--pid",
            str(child.pid),
            "--threads",
            "--format",
            "raw",
            "--output",
            str(out_dir / f"{name}.txt"),
            *self.options.py_spy_args,
        ]
        return self.spawn(f"py-spy-{name}", argv, child_env())

    def sampler_for(self, children: list[Child]) -> Sampler:
        processes = {c.name: c.ps for c in children}
        if self.sim is not None:
            processes["simulator"] = self.sim.child.ps
        if self.rabbit is not None:
            processes["rabbitmq"] = self.rabbit
        processes["bench"] = psutil.Process()
        workers = [c.name for c in children if "-worker" in c.name]
        return Sampler(processes, main_threads=workers)


# --------------------------------------------------------------------------- scenarios
