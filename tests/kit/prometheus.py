"""A private Prometheus for the tests: Debian's ``prometheus`` package (``prometheus`` and
``promtool``), installed by the set-up when missing, started on a port and a directory of its
own so it never meets a Prometheus the machine may run."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest
import requests
import yaml

from tests.conftest import IN_CI
from tests.kit.processes import free_port, wait_until

__all__ = ["DEPLOY", "PrometheusServer", "prometheus", "promtool"]

#: The shipped dashboard and alert rules.
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
#: Debian's invoke-rc.d asks this script whether a package may start its service; 101: no.
_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


def _unavailable(reason: str) -> NoReturn:
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: the Prometheus tests may not skip)")
    pytest.skip(reason)


def _install() -> str | None:
    """``apt-get install prometheus`` without starting its service; the error, or None."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    sudo: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return "not root and no sudo"
        sudo = ["sudo", "-n"]
    # The package would start a Prometheus on :9090; a policy-rc.d answering 101 stops that.
    own_policy = not _POLICY_RC_D.exists()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    apt = [*sudo, "apt-get", "-o", "DPkg::Lock::Timeout=300", "-q", "-y"]
    try:
        if own_policy:
            _sudo_run([*sudo, "sh", "-c", f"printf '#!/bin/sh\\nexit 101\\n' > {_POLICY_RC_D}"])
            _sudo_run([*sudo, "chmod", "755", str(_POLICY_RC_D)])
        done = subprocess.run(
            [*apt, "install", "--no-install-recommends", "prometheus"],
            env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if done.returncode != 0:
            subprocess.run([*apt, "update"], env=env, capture_output=True, timeout=600)
            done = subprocess.run(
                [*apt, "install", "--no-install-recommends", "prometheus"],
                env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
        if done.returncode != 0:
            return f"apt-get install prometheus failed: {done.stderr[-2000:]}"
    finally:
        if own_policy:
            subprocess.run([*sudo, "rm", "-f", str(_POLICY_RC_D)], capture_output=True)
    if shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
        # Nor at boot: the tests start their own.
        subprocess.run([*sudo, "systemctl", "disable", "--now", "prometheus"], capture_output=True)
    return None


def _sudo_run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        error = _install()
        found = shutil.which(name)
        if found is None:
            _unavailable(error or f"{name} is still missing after installing prometheus")
    return found


def promtool() -> str:
    """Path of ``promtool``, installing Debian's ``prometheus`` package if needed."""
    return _tool("promtool")


def prometheus() -> str:
    """Path of ``prometheus``, installing Debian's ``prometheus`` package if needed."""
    return _tool("prometheus")


class PrometheusServer:
    """``prometheus`` on 127.0.0.1:<free port>, its config and storage under ``directory``.

    ``targets`` maps a job name to its scrape settings (``targets``, and optionally
    ``metrics_path`` and ``params``); every job is scraped and rules evaluated each ``interval``.
    """

    def __init__(
        self,
        directory: Path,
        targets: Mapping[str, Mapping[str, Any]],
        rule_files: Sequence[Path] = (),
        interval: str = "1s",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(spec["targets"])}]}
                | {k: v for k, v in spec.items() if k != "targets"}
                for job, spec in targets.items()
            ],
        }
        config_file = directory / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self._log = (directory / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                prometheus(),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
        self._log_path = directory / "prometheus.log"
        if not wait_until(self._ready, 60, 0.2):
            self.close()
            raise AssertionError(f"prometheus did not start:\n{self.log[-3000:]}")

    @property
    def log(self) -> str:
        return self._log_path.read_text(errors="replace")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log[-3000:]}")
        try:
            return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def _api(self, path: str, **params: Any) -> Any:
        reply = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = reply.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def query_range(self, expr: str, start: float, step: str = "1s") -> list[dict[str, Any]]:
        """Every series ``expr`` had from ``start`` to now."""
        data = self._api("query_range", query=expr, start=start, end=time.time(), step=step)
        return list(data["result"])

    def alerts(self) -> list[dict[str, Any]]:
        """The pending and firing alerts."""
        return list(self._api("alerts")["alerts"])

    def targets_up(self) -> bool:
        active = self._api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
