"""``run --processes``: the option, the group's /metrics and /readyz, and the supervisor's
restarts and stops, on stand-in children (small Python processes, no broker)."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from tests.kit.events import MEMORY_URL
from tests.kit.processes import free_port, wait_until
from tests.kit.topology import private_settings
from worker import supervisor as supervision
from worker.cli import app
from worker.consume.observability import HealthServer, Metrics
from worker.contract.settings import Settings
from worker.supervisor import GroupMetrics, Supervisor, group_ready, parse_processes

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("clean_worker_env")


# -- the option ---------------------------------------------------------------------------


def test_auto_is_one_process_per_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert parse_processes("auto") == 6
    assert parse_processes("AUTO") == 6


@pytest.mark.parametrize(("value", "count"), [("1", 1), ("3", 3), (" 12 ", 12)])
def test_a_whole_number_is_that_many_processes(value: str, count: int) -> None:
    assert parse_processes(value) == count


@pytest.mark.parametrize("argv", [["--processes", "0"], ["--processes=-1"], ["--processes", "abc"]])
def test_a_bad_count_is_one_line_naming_the_option_and_exit_2(argv: list[str]) -> None:
    result = runner.invoke(app, ["run", *argv])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pabx-worker: --processes: "), result.stderr
    assert "PABX_WORKER_PABX_URL" not in result.stderr  # the option is checked first


def test_several_processes_check_the_settings_before_starting_any() -> None:
    result = runner.invoke(app, ["run", "--processes", "3"])
    assert result.exit_code == 2
    assert "PABX_WORKER_PABX_URL" in result.stderr and "Traceback" not in result.stderr


def test_run_help_names_the_option() -> None:
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0 and "--processes N" in result.stdout and "auto" in result.stdout


# -- the group's /metrics and /readyz -------------------------------------------------------


@pytest.fixture
def children() -> Iterator[list[tuple[Metrics, list[bool], HealthServer]]]:
    """Two children's endpoints: their metrics, a ready flag each, and the server."""
    with ExitStack() as stack:
        made = []
        for _ in range(2):
            metrics, ready = Metrics(), [True]
            server = HealthServer(
                host="127.0.0.1", port=0, metrics=metrics, ready=_reads(ready)
            ).start()
            stack.callback(server.stop)
            made.append((metrics, ready, server))
        yield made


def _reads(flag: list[bool]) -> Callable[[], bool]:
    return lambda: flag[0]


def test_group_metrics_label_each_childs_samples_and_keep_one_help_and_type(
    children: list[tuple[Metrics, list[bool], HealthServer]],
) -> None:
    children[0][0].commands.labels("accepted", "false").inc(3)
    children[1][0].commands.labels("accepted", "false").inc(4)
    group = GroupMetrics()
    group.ports = {str(i): server.port for i, (_, _, server) in enumerate(children)}
    group.restarts.inc()
    text = group.render().decode()

    for family in ("pabx_worker_commands_total", "pabx_worker_in_flight"):
        assert text.count(f"# HELP {family} ") == 1, family
        assert text.count(f"# TYPE {family} ") == 1, family
    families = {f.name: f for f in text_string_to_metric_families(text)}
    commands = {s.labels["process"]: s.value for s in families["pabx_worker_commands"].samples}
    assert commands == {"0": 3.0, "1": 4.0}
    assert all(
        s.labels.get("process") in {"0", "1"} for s in families["process_cpu_seconds"].samples
    )
    assert next(s.value for s in families["pabx_worker_process_restarts"].samples) == 1.0
    assert "process" not in families["pabx_worker_processes"].samples[0].labels


def test_a_child_that_does_not_answer_is_left_out_of_the_group_metrics(
    children: list[tuple[Metrics, list[bool], HealthServer]],
) -> None:
    group = GroupMetrics()
    group.ports = {"0": children[0][2].port, "1": _closed_port()}
    families = {f.name: f for f in text_string_to_metric_families(group.render().decode())}
    assert {s.labels["process"] for s in families["pabx_worker_ready"].samples} == {"0"}


def test_the_group_is_ready_only_when_every_child_is(
    children: list[tuple[Metrics, list[bool], HealthServer]],
) -> None:
    ports = {str(i): server.port for i, (_, _, server) in enumerate(children)}
    assert group_ready(ports, 2)
    children[1][1][0] = False
    assert not group_ready(ports, 2)
    children[1][1][0] = True
    assert not group_ready({"0": ports["0"], "1": _closed_port()}, 2)
    assert not group_ready({"0": ports["0"]}, 2)  # a child not running


def _closed_port() -> int:
    return free_port()  # nothing listens there


# -- restarts and stops, on stand-in children -------------------------------------------------


@pytest.fixture
def settings() -> Settings:
    return private_settings(MEMORY_URL, "http://pabx.invalid", shutdown_timeout_s=1.0)


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _start(supervisor: Supervisor) -> tuple[threading.Thread, list[int]]:
    status: list[int] = []
    thread = threading.Thread(target=lambda: status.append(supervisor.run()), daemon=True)
    thread.start()
    return thread, status


def test_a_child_that_dies_is_restarted_and_sigterm_stops_all_with_0(
    settings: Settings, tmp_path: Path
) -> None:
    # The first start of each child dies at once; the restarted one runs until SIGTERM.
    code = (
        "import os, signal, sys, time, pathlib\n"
        f"flag = pathlib.Path({str(tmp_path)!r}, os.environ['PABX_PROCESS_INDEX'])\n"
        "if not flag.exists():\n    flag.touch(); sys.exit(1)\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "flag.with_suffix('.up').touch()\n"
        "time.sleep(60)\n"
    )
    supervisor = Supervisor(settings, 2, command=_child(code))
    thread, status = _start(supervisor)
    assert wait_until(lambda: len(list(tmp_path.glob("*.up"))) == 2, 10)
    assert _restarts(supervisor) == 2 and len(supervisor.pids()) == 2
    pids = set(supervisor.pids().values())
    supervisor.stop()
    thread.join(10)
    assert status == [0]
    assert not any(_alive(pid) for pid in pids)


def test_a_child_with_a_configuration_error_stops_the_group_with_2(settings: Settings) -> None:
    code = (
        "import os, signal, sys, time\n"
        "if os.environ['PABX_PROCESS_INDEX'] == '1': sys.exit(2)\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        "time.sleep(60)\n"
    )
    supervisor = Supervisor(settings, 2, command=_child(code))
    thread, status = _start(supervisor)
    thread.join(10)
    assert status == [2]
    assert _restarts(supervisor) == 0 and supervisor.pids() == {}


#: A stand-in child that ignores SIGTERM (a drain that never ends), once it is set up.
STUBBORN = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
#: A stand-in child that exits 0 on SIGTERM, once it is set up.
OBEDIENT = "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"


def _stand_in(up: Path, handler: str, before: str = "") -> list[str]:
    """A child that sets ``handler``, then says it is up (a file in ``up``) and sleeps."""
    code = (
        "import os, pathlib, signal, sys, time\n"
        f"{before}{handler}"
        f"pathlib.Path({str(up)!r}, os.environ['PABX_PROCESS_INDEX']).touch()\n"
        "time.sleep(60)\n"
    )
    return _child(code)


def _up(up: Path, count: int) -> bool:
    return wait_until(lambda: len(list(up.iterdir())) == count, 10)


def test_children_that_overrun_the_shutdown_timeout_are_killed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(supervision, "KILL_MARGIN_S", 0.0)
    supervisor = Supervisor(settings, 2, command=_stand_in(tmp_path, STUBBORN))
    thread, status = _start(supervisor)
    assert _up(tmp_path, 2)
    pids = set(supervisor.pids().values())
    supervisor.stop()
    thread.join(10)
    assert status == [1]  # not a clean stop
    assert not any(_alive(pid) for pid in pids)


def test_a_second_stop_kills_at_once(tmp_path: Path) -> None:
    slow = private_settings(MEMORY_URL, "http://pabx.invalid", shutdown_timeout_s=60.0)
    supervisor = Supervisor(slow, 1, command=_stand_in(tmp_path, STUBBORN))
    thread, status = _start(supervisor)
    assert _up(tmp_path, 1)
    supervisor.stop()
    thread.join(0.5)
    assert thread.is_alive()  # waiting for the child to drain
    supervisor.stop()
    thread.join(5)
    assert status == [1]


def test_children_do_not_see_the_systemd_socket(settings: Settings, tmp_path: Path) -> None:
    up, out = tmp_path / "up", tmp_path / "env"
    up.mkdir()
    write = f"pathlib.Path({str(out)!r}).write_text(repr(sorted(os.environ)))\n"
    environ = {**os.environ, "NOTIFY_SOCKET": "@nowhere", "WATCHDOG_USEC": "30000000"}
    supervisor = Supervisor(settings, 1, command=_stand_in(up, OBEDIENT, write), environ=environ)
    thread, status = _start(supervisor)
    assert _up(up, 1)
    supervisor.stop()
    thread.join(10)
    seen = out.read_text()
    assert "NOTIFY_SOCKET" not in seen and "WATCHDOG_USEC" not in seen
    assert "PABX_WORKER_HTTP_PORT" in seen and "PABX_PROCESS_INDEX" in seen
    assert status == [0]


def _restarts(supervisor: Supervisor) -> float | None:
    registry = supervisor.metrics.registry
    return registry.get_sample_value("pabx_worker_process_restarts_total")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_systemd_hears_ready_once_every_child_runs(settings: Settings, tmp_path: Path) -> None:
    up = tmp_path / "up"
    up.mkdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(tmp_path / "notify"))
        systemd.settimeout(10)
        environ = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")}
        supervisor = Supervisor(settings, 2, command=_stand_in(up, OBEDIENT), environ=environ)
        thread, status = _start(supervisor)
        ready = systemd.recv(1024).decode()
        running = len(supervisor.pids())
        assert _up(up, 2)
        supervisor.stop()
        thread.join(10)
        stopping = systemd.recv(1024).decode()
    assert "READY=1" in ready.splitlines() and running == 2
    assert "STOPPING=1" in stopping.splitlines()
    assert status == [0]


def test_a_child_whose_port_was_taken_meanwhile_gets_another(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The first port handed out is free when picked, then taken before the child listens.
    squatter = socket.create_server((supervision.CHILD_HOST, 0))
    taken = squatter.getsockname()[1]
    picks = iter([taken])
    real = supervision._free_port
    monkeypatch.setattr(supervision, "_free_port", lambda: next(picks, None) or real())
    # A child listens on its port, as the worker's health server does, or exits 2.
    code = (
        "import os, pathlib, signal, socket, sys, time\n"
        "try:\n"
        "    s = socket.create_server(('127.0.0.1', int(os.environ['PABX_WORKER_HTTP_PORT'])))\n"
        "except OSError:\n"
        "    sys.exit(2)\n"
        f"{OBEDIENT}"
        f"pathlib.Path({str(tmp_path)!r}, os.environ['PABX_WORKER_HTTP_PORT']).touch()\n"
        "time.sleep(60)\n"
    )
    supervisor = Supervisor(settings.model_copy(update={"http_port": 1}), 1, command=_child(code))
    try:
        thread, status = _start(supervisor)
        assert wait_until(lambda: len(list(tmp_path.iterdir())) == 1, 10)
        (listening,) = (int(p.name) for p in tmp_path.iterdir())
        assert listening != taken and _restarts(supervisor) == 1
        supervisor.stop()
        thread.join(10)
        assert status == [0]
    finally:
        squatter.close()
