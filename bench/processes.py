"""The processes the bench starts (the simulator, consumers, profilers), each stopped by its pid."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import requests

from bench.commands import API_KEY
from bench.options import REPO, BenchError
from tests.kit.processes import free_port

__all__ = ["PYTHON", "Child", "Simulator", "child_env", "quietly"]

PYTHON = sys.executable


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without PABX_WORKER_* (children get exactly what we set)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PABX_WORKER_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class Child:
    """A process we started; stopped by its pid (SIGTERM, then SIGKILL)."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.ps = psutil.Process(self.proc.pid)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 30.0, signum: int = signal.SIGTERM) -> int | None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def quietly(action: Callable[[], Any], log: Callable[[str], None]) -> None:
    """Run a clean-up step; a failure is logged, never hides what came before."""
    try:
        action()
    except Exception as exc:
        log(f"  (clean-up step failed: {type(exc).__name__}: {exc})")


class Simulator:
    """``python -m worker simulate`` in its own process, with the admin API at hand."""

    def __init__(self, latency_ms: float, log_dir: Path) -> None:
        self.latency_ms = latency_ms
        self.http = requests.Session()
        for attempt in range(3):
            port = free_port()
            child = Child(
                f"simulator-{latency_ms:g}ms-{attempt}",
                [
                    PYTHON,
                    "-m",
                    "worker",
                    "simulate",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--api-key",
                    API_KEY,
                    "--latency-ms",
                    f"{latency_ms:g}",
                ],
                log_dir,
                child_env(),
            )
            self.url = f"http://127.0.0.1:{port}"
            if self._wait_healthy(child, 20.0):
                self.child = child
                return
            child.stop(5)
        raise BenchError(f"the simulator did not start: {child.log_tail()}")

    def _wait_healthy(self, child: Child, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and child.alive():
            with contextlib.suppress(requests.RequestException):
                if self.http.get(f"{self.url}/_sim/health", timeout=1).status_code == 200:
                    return True
            time.sleep(0.1)
        return False

    def clear(self) -> None:
        self.http.delete(f"{self.url}/_sim/requests", timeout=30).raise_for_status()

    def requests(self) -> list[dict[str, Any]]:
        reply = self.http.get(f"{self.url}/_sim/requests", timeout=120)
        reply.raise_for_status()
        return list(reply.json()["requests"])

    def stop(self) -> None:
        self.child.stop(10)
        self.http.close()
