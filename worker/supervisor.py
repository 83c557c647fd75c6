"""``pabx-worker run --processes N``: one supervisor over N worker processes on one host.

Each child is ``python -m worker run`` with the supervisor's settings and environment, its
own ``/metrics`` and ``/readyz`` on a free port of 127.0.0.1 (none when ``HTTP_PORT=0``), and
no systemd socket. Its output is the supervisor's, so the logs stay one stream; each of its
log lines names its place (``process_index``). The supervisor:

- restarts a child that dies, after 0.5 s doubling to 10 s while it keeps dying, back to
  0.5 s once a child ran 30 s; a child that exits 2 (configuration error) is not restarted:
  the supervisor stops the others and exits 2, unless the port picked for it was taken by
  another program before the child could listen on it (then it is restarted on another);
- on SIGTERM or SIGINT sends SIGTERM to every child and waits for them to drain, at most
  ``SHUTDOWN_TIMEOUT_S`` plus :data:`KILL_MARGIN_S`; then, or on a second signal, SIGKILL;
- serves the group on ``HTTP_HOST:HTTP_PORT``: ``/metrics`` (every child's samples with a
  ``process`` label, a child that does not answer left out, and ``pabx_worker_processes``,
  ``pabx_worker_process_restarts_total``), ``/healthz``, and ``/readyz`` (200 when every
  child's is);
- under systemd says ``READY=1`` once every child is ready, and pings the watchdog.

A supervisor killed outright (SIGKILL) leaves no child behind on Linux: each child asked the
kernel for SIGTERM when its parent dies (:func:`~worker.runtime.end_with_supervisor`), and
drains and stops as on the supervisor's own SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import Metric

from worker.adapters.systemd import Notifier
from worker.consume.observability import HealthServer, merge_expositions
from worker.contract.settings import ENV_PREFIX, Settings
from worker.logs import configure_logging
from worker.runtime import PROCESS_INDEX_ENV, SUPERVISOR_PID_ENV, secrets_of, serve_health

__all__ = [
    "GroupMetrics",
    "Supervisor",
    "fetch",
    "fetch_all",
    "group_ready",
    "parse_processes",
    "run_group",
]

log = logging.getLogger("pabx_worker.supervisor")

#: First wait before a dead child is started again; doubled while it keeps dying.
RESTART_MIN_S = 0.5
#: Longest wait before a dead child is started again.
RESTART_MAX_S = 10.0
#: A child that ran this long before it died is restarted after RESTART_MIN_S again.
STABLE_S = 30.0
#: Time beyond SHUTDOWN_TIMEOUT_S that children get to exit after SIGTERM, before SIGKILL.
KILL_MARGIN_S = 5.0
#: How often the supervisor looks at its children.
POLL_S = 0.2
#: How long the group endpoint waits for one child's /metrics or /readyz.
SCRAPE_TIMEOUT_S = 2.0
#: Exit status of a child that met a configuration error.
CONFIG_ERROR = 2
#: Where children listen for their own /metrics and /readyz.
CHILD_HOST = "127.0.0.1"
#: systemd variables children must not see: only the supervisor speaks to systemd.
_SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
# Children are on the loopback: never through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def parse_processes(value: str) -> int:
    """``--processes``: a whole number of at least 1, or ``auto`` (one per CPU)."""
    text = value.strip().lower()
    if text == "auto":
        return os.cpu_count() or 1
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"{value!r} is neither a whole number nor auto") from None
    if count < 1:
        raise ValueError(f"must be at least 1 (or auto), not {count}")
    return count


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((CHILD_HOST, 0))
        return int(sock.getsockname()[1])


def _taken(port: int) -> bool:
    """Another program listens on ``port`` of CHILD_HOST: the port picked for a child was
    taken before the child could listen on it."""
    if not port:
        return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the child's server
        try:
            sock.bind((CHILD_HOST, port))
        except OSError:
            return True
    return False


def fetch(port: int, path: str) -> bytes | None:
    """The body of a child's 200 answer on ``path``; None for any other answer or none."""
    try:
        with _OPENER.open(f"http://{CHILD_HOST}:{port}{path}", timeout=SCRAPE_TIMEOUT_S) as reply:
            return bytes(reply.read())
    except (OSError, urllib.error.URLError):  # HTTPError (503) is a URLError
        return None


def fetch_all(ports: Mapping[str, int], path: str) -> dict[str, bytes | None]:
    """:func:`fetch` from every child at once, by its index."""
    if not ports:
        return {}
    with ThreadPoolExecutor(len(ports), thread_name_prefix="pabx-scrape") as pool:
        bodies = pool.map(lambda port: fetch(port, path), ports.values())
        return dict(zip(ports, bodies, strict=True))


def group_ready(ports: Mapping[str, int], count: int) -> bool:
    """All ``count`` children have a port and answer 200 on it to ``/readyz``."""
    if len(ports) < count:
        return False
    return all(body is not None for body in fetch_all(ports, "/readyz").values())


class GroupMetrics:
    """The group's ``/metrics``: the supervisor's two metrics and every child's, labelled."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.processes = Gauge(
            "pabx_worker_processes",
            "Worker processes running under the supervisor.",
            registry=self.registry,
        )
        self.restarts = Counter(
            "pabx_worker_process_restarts",
            "Worker processes started again after they died.",
            registry=self.registry,
        )
        self.ports: Mapping[str, int] = {}

    def render(self) -> bytes:
        bodies = fetch_all(self.ports, "/metrics")
        texts = {index: body.decode() for index, body in bodies.items() if body is not None}
        children = _Families(merge_expositions(texts, "process"))
        return generate_latest(self.registry) + generate_latest(children)


@dataclass
class _Families:
    """A ready-made list of families, in the shape ``generate_latest`` collects from."""

    families: list[Metric]

    def collect(self) -> Iterable[Metric]:
        return self.families


@dataclass
class _Child:
    """One worker process's place in the group; ``proc`` is None while it waits to restart."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    started: float = 0.0
    delay_s: float = RESTART_MIN_S
    due: float = 0.0


class Supervisor:
    """Starts, restarts and stops N worker processes; :meth:`run` returns the exit status."""

    def __init__(
        self,
        settings: Settings,
        count: int,
        *,
        command: Sequence[str],
        environ: Mapping[str, str] | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self._settings = settings
        self._command = list(command)
        env = dict(os.environ if environ is None else environ)
        self._env = {k: v for k, v in env.items() if k not in _SYSTEMD_VARIABLES}
        self._children = [_Child(i) for i in range(count)]
        self._notifier = notifier or Notifier(env)
        self._said_ready = False
        self._stop = threading.Event()
        self._kill = threading.Event()
        self._status = 0
        self.metrics = GroupMetrics()
        self.metrics.processes.set_function(lambda: len(self.pids()))

    def pids(self) -> dict[int, int]:
        """The pid of every running child, by index."""
        return {c.index: proc.pid for c, proc in self._running()}

    def ready(self) -> bool:
        """Every child is running and its ``/readyz`` answers 200."""
        return group_ready(self._ports(), len(self._children))

    def stop(self) -> None:
        """Stop the group (SIGTERM to every child); asked again, kill it (SIGKILL)."""
        if self._stop.is_set():
            self._kill.set()
        self._stop.set()

    def run(self) -> int:
        """Start the children, tend them until stopped; 0 when all stopped cleanly."""
        try:
            for child in self._children:
                self._start(child)
            while not self._stop.wait(POLL_S):
                self._tend()
            return self._shut_down()
        finally:
            for child in self._children:
                if child.proc is not None and child.proc.poll() is None:
                    child.proc.kill()
                    child.proc.wait()
            self._notifier.close()

    def _running(self) -> list[tuple[_Child, subprocess.Popen[bytes]]]:
        # Also read by the HTTP threads: each child's ``proc`` is read once.
        pairs = [(c, c.proc) for c in self._children]
        return [(c, proc) for c, proc in pairs if proc is not None and proc.poll() is None]

    def _ports(self) -> dict[str, int]:
        return {str(c.index): c.port for c, _ in self._running() if c.port}

    def _start(self, child: _Child) -> None:
        child.port = 0 if self._settings.http_port == 0 else _free_port()
        env = {
            **self._env,
            f"{ENV_PREFIX}HTTP_HOST": CHILD_HOST,
            f"{ENV_PREFIX}HTTP_PORT": str(child.port),
            PROCESS_INDEX_ENV: str(child.index),
            SUPERVISOR_PID_ENV: str(os.getpid()),
        }
        if child.started:
            self.metrics.restarts.inc()
        child.proc = subprocess.Popen(self._command, env=env, stdin=subprocess.DEVNULL)
        child.started = time.monotonic()
        self.metrics.ports = self._ports()
        log.info(
            "process %d started (pid %d)",
            child.index,
            child.proc.pid,
            extra={"process_index": child.index, "pid": child.proc.pid, "port": child.port},
        )

    def _tend(self) -> None:
        """Restart the children that died and are due; tell systemd how the group is."""
        now = time.monotonic()
        for child in self._children:
            if child.proc is None:
                if now >= child.due:
                    self._start(child)
                continue
            code = child.proc.poll()
            if code is None:
                continue
            if code == CONFIG_ERROR and _taken(child.port):
                # The port was free when picked and taken before the child listened on
                # it: not a setting of ours. The restart picks another one.
                log.warning(
                    "process %d (pid %d) could not listen on port %d, taken meanwhile by"
                    " another program; it gets another port",
                    child.index,
                    child.proc.pid,
                    child.port,
                    extra={"process_index": child.index, "pid": child.proc.pid},
                )
                self._died(child, code, now)
                continue
            if code == CONFIG_ERROR:
                log.error(
                    "process %d (pid %d) exited 2 (configuration error); stopping the others",
                    child.index,
                    child.proc.pid,
                    extra={"process_index": child.index, "pid": child.proc.pid},
                )
                self._status = CONFIG_ERROR
                self._stop.set()
                return
            self._died(child, code, now)
        self._notify()

    def _died(self, child: _Child, code: int, now: float) -> None:
        if now - child.started >= STABLE_S:
            child.delay_s = RESTART_MIN_S
        child.due = now + child.delay_s
        pid = child.proc.pid if child.proc else 0
        log.warning(
            "process %d (pid %d) %s; restarting it in %.1f s",
            child.index,
            pid,
            _how_it_ended(code),
            child.delay_s,
            extra={"process_index": child.index, "pid": pid, "exit_status": code},
        )
        child.delay_s = min(child.delay_s * 2, RESTART_MAX_S)
        child.proc = None
        self.metrics.ports = self._ports()

    def _notify(self) -> None:
        self._notifier.watchdog()
        if self._said_ready or not self._notifier.enabled:
            return
        running = len(self.pids()) == len(self._children)
        if running and (self._settings.http_port == 0 or self.ready()):
            self._notifier.ready(f"{len(self._children)} processes consuming")
            self._said_ready = True

    def _shut_down(self) -> int:
        """SIGTERM every child and wait for it; SIGKILL the ones that take too long."""
        self._notifier.stopping()
        procs = [c.proc for c in self._children if c.proc is not None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._settings.shutdown_timeout_s + KILL_MARGIN_S
        while any(proc.poll() is None for proc in procs):
            if self._kill.is_set() or time.monotonic() >= deadline:
                left = [proc for proc in procs if proc.poll() is None]
                log.warning("killing %d processes that did not stop", len(left))
                for proc in left:
                    proc.kill()
                    proc.wait()
                break
            self._kill.wait(POLL_S)
        if self._status:
            return self._status
        return 0 if all(proc.returncode == 0 for proc in procs) else 1


def _how_it_ended(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def run_group(settings: Settings, count: int, config: Path | None) -> int:
    """``pabx-worker run --processes N`` (N > 1): supervise until SIGTERM or SIGINT."""
    configure_logging(
        fmt=settings.log_format, level=settings.log_level, secrets=secrets_of(settings)
    )
    command = [sys.executable, "-m", "worker", "run"]
    if config is not None:
        command += ["--config", str(config.resolve())]
    supervisor = Supervisor(settings, count, command=command)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("stopping %d processes", count, extra={"signal": signal.Signals(signum).name})
        supervisor.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = _group_server(settings, supervisor)
    try:
        status = supervisor.run()
    finally:
        if server is not None:
            server.stop()
    log.info("stopped", extra={"exit_status": status})
    return status


def _group_server(settings: Settings, supervisor: Supervisor) -> HealthServer | None:
    """The group's /metrics, /healthz, /readyz on HTTP_HOST:HTTP_PORT (0: not at all)."""
    if settings.http_port == 0:
        return None
    return serve_health(
        settings,
        supervisor.metrics,
        supervisor.ready,
        "serving /metrics, /healthz, /readyz for the group",
    )
