"""The processes a test runs: the simulator (its admin API), the worker in a thread or as
``python -m worker``, its ``PABX_WORKER_*`` environment, and private RabbitMQ nodes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests
from pydantic import SecretStr

from tests.cluster.rabbit_cluster import ClusterURLs, RabbitCluster, find_sbin, local_cluster
from worker.adapters.channel import Connect
from worker.consume.consumer import Worker
from worker.contract.settings import ENV_PREFIX, Settings
from worker.runtime import build_processor
from worker.tools.simulator import SimulatorThread
from worker.tracing import NO_TRACING, Tracing

__all__ = [
    "CLI",
    "ROOT",
    "ClusterURLs",
    "RabbitCluster",
    "RunningWorker",
    "SimulatorThread",
    "WorkerProcess",
    "env_for",
    "find_sbin",
    "free_port",
    "local_cluster",
    "redis_answers",
    "reset_sim",
    "set_faults",
    "sim_requests",
    "start_redis",
    "wait_until",
    "worker_env",
]

#: The repository (the working directory of worker processes).
ROOT = Path(__file__).resolve().parents[2]
#: The command line, as operators run it.
CLI = [sys.executable, "-m", "worker"]

#: The settings that name the topology (what :func:`env_for` passes on).
_TOPOLOGY_SETTINGS = (
    "amqp_url",
    "commands_exchange",
    "command_queue",
    "results_exchange",
    "unrouted_exchange",
    "dead_exchange",
    "parked_queue",
    "retry_queue_prefix",
)


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout`` passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- a private redis-server ---------------------------------------------------------------


def redis_answers(port: int) -> bool:
    """A Redis on ``port`` answers a PING (``NOAUTH`` from one with a password counts)."""
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


def start_redis(
    directory: Path, port: int, *, password: str | None = None, own_session: bool = False
) -> subprocess.Popen[bytes]:
    """A ``redis-server`` of the caller's own (no persistence), once it answers.

    ``own_session``: in a process group of its own, so that group can be paused.
    """
    args = ["--port", str(port), "--bind", "127.0.0.1"]
    if password is not None:
        args += ["--requirepass", password]
    args += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
    proc = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=own_session,
    )
    if not wait_until(lambda: redis_answers(port), 10):
        proc.kill()
        proc.wait(10)
        raise RuntimeError(f"a private redis-server did not answer on {port}")
    return proc


# -- the simulator's admin API ------------------------------------------------------------


def reset_sim(sim: SimulatorThread) -> SimulatorThread:
    """The simulator with no faults and no recorded requests."""
    requests.put(f"{sim.url}/_sim/faults", json={}, timeout=5).raise_for_status()
    requests.delete(f"{sim.url}/_sim/requests", timeout=5).raise_for_status()
    return sim


def sim_requests(sim: SimulatorThread, timeout: float = 5) -> list[dict[str, Any]]:
    """The PABX requests the simulator recorded."""
    reply = requests.get(f"{sim.url}/_sim/requests", timeout=timeout)
    reply.raise_for_status()
    return list(reply.json()["requests"])


def set_faults(sim: SimulatorThread, **faults: Any) -> None:
    requests.put(f"{sim.url}/_sim/faults", json=faults, timeout=5).raise_for_status()


# -- the worker in a thread ---------------------------------------------------------------


class RunningWorker:
    """A worker consuming in a thread of the test process (ready when constructed)."""

    def __init__(
        self, settings: Settings, connect: Connect | None = None, tracing: Tracing = NO_TRACING
    ) -> None:
        self._processor_cm = build_processor(settings, tracing=tracing)
        self.processor = self._processor_cm.__enter__()
        self.worker = Worker(settings, self.processor, connect=connect)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.worker.ready.wait(15):
            self.stop()
            raise RuntimeError(f"worker did not start: {self.error!r}")

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.worker.stop()
        self.thread.join(30)
        self._processor_cm.__exit__(None, None, None)


# -- the worker as a process --------------------------------------------------------------


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """This environment without ``PABX_WORKER_*``, plus the topology names of ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(ENV_PREFIX)}
    env.pop("CREDENTIALS_DIRECTORY", None)
    for name in _TOPOLOGY_SETTINGS:
        env[f"{ENV_PREFIX}{name.upper()}"] = str(getattr(settings, name))
    env[f"{ENV_PREFIX}RETRY_DELAYS_S"] = json.dumps(list(settings.retry_delays_s))
    env.update(extra)
    return env


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
            [*CLI, "run", *args],
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
        # A reader still blocked in read() holds the stream's lock: closing it would wait
        # for ever (a process the worker started may still hold the pipe's other end).
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()


def _message(line: str) -> str | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry.get("message") if isinstance(entry, dict) else None
