"""Every wrong setting: exit 2 and one line on stderr that names it, never a traceback (SPEC §1).

One table of mistakes — the TOML file, values, unknown variables, secret files, store URLs
(met when ``run`` opens the store), broker URLs and credentials (met at connect) — run through
the real command line, ``python -m worker``, for each command that reads the settings.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.kit.processes import CLI, env_for
from tests.kit.samples import VENDOR_EXAMPLE
from worker.contract.settings import Settings

pytestmark = pytest.mark.integration

#: Each command that reads the settings, as typed ({command} and {batch}: files made here).
COMMANDS = {
    "run": ["run"],
    "send": ["send", "{command}"],
    "batch": ["batch", "{batch}"],
    "parked-list": ["parked", "list"],
    "topology-declare": ["topology", "declare"],
}
EVERY = frozenset(COMMANDS)
#: Longest a command may take to give up; a worker still running after it has not.
GIVE_UP_S = 25


@dataclass(frozen=True)
class Case:
    """A mistake, and what the one line about it must name."""

    names: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    #: Text of a ``--config`` file; ``{dir}`` is the test's directory.
    toml: str | None = None
    #: Files in ``$CREDENTIALS_DIRECTORY``: name -> text.
    credentials: dict[str, str] | None = None
    commands: frozenset[str] = EVERY
    #: Variables of the working environment that the case takes away.
    unset: tuple[str, ...] = ()


def broker_url(amqp_url: str, *, scheme: str = "", netloc: str = "", path: str = "") -> str:
    """The test broker's URL with one part changed."""
    parts = urlsplit(amqp_url)
    return urlunsplit(
        parts._replace(
            scheme=scheme or parts.scheme, netloc=netloc or parts.netloc, path=path or parts.path
        )
    )


def cases(amqp_url: str) -> dict[str, Case]:
    host = f"{urlsplit(amqp_url).hostname}:{urlsplit(amqp_url).port or 5672}"
    store = "PABX_WORKER_STORE_URL"
    return {
        "toml-syntax": Case(
            ("--config", "w.toml", "invalid TOML", "line 2, column 15"),
            toml='log_format = "json"\nconcurrency = \n',
        ),
        "toml-key-typo": Case(
            ("--config", "w.toml", "'concurency'", "'concurrency'"), toml="concurency = 4\n"
        ),
        "toml-key-file-missing": Case(
            ("--config", "amqp_url_file", "{dir}/nope"), toml='amqp_url_file = "nope"\n'
        ),
        "delays-not-json": Case(
            ("PABX_WORKER_RETRY_DELAYS_S: expected a JSON list",),
            env={"PABX_WORKER_RETRY_DELAYS_S": "notalist"},
        ),
        "delays-empty": Case(
            ("PABX_WORKER_RETRY_DELAYS_S: must list at least one delay",),
            env={"PABX_WORKER_RETRY_DELAYS_S": "[]"},
        ),
        "delays-unsorted": Case(
            ("PABX_WORKER_RETRY_DELAYS_S: must be in increasing order",),
            env={"PABX_WORKER_RETRY_DELAYS_S": "[30, 5]"},
        ),
        "unknown-variable": Case(
            ("PABX_WORKER_CONCURENCY", "did you mean PABX_WORKER_CONCURRENCY?"),
            env={"PABX_WORKER_CONCURENCY": "4"},
        ),
        "pabx-url-malformed": Case(
            ("PABX_WORKER_PABX_URL: not a valid URL",),
            env={"PABX_WORKER_PABX_URL": "http://pabx.example:notaport"},
        ),
        "secret-twice": Case(
            ("PABX_WORKER_AMQP_URL and PABX_WORKER_AMQP_URL_FILE",),
            env={"PABX_WORKER_AMQP_URL_FILE": "{dir}/amqp-url"},
        ),
        "secret-file-missing": Case(
            ("PABX_WORKER_PABX_API_KEY_FILE: cannot read {dir}/nope",),
            env={"PABX_WORKER_PABX_API_KEY_FILE": "{dir}/nope"},
            unset=("PABX_WORKER_PABX_API_KEY",),
        ),
        "secret-file-empty": Case(
            ("PABX_WORKER_STORE_URL_FILE: {dir}/empty is empty",),
            env={"PABX_WORKER_STORE_URL_FILE": "{dir}/empty"},
            unset=(store,),
        ),
        "credential-empty": Case(
            ("systemd credential PABX_WORKER_PABX_API_KEY", "is empty"),
            credentials={"PABX_WORKER_PABX_API_KEY": "\n"},
            unset=("PABX_WORKER_PABX_API_KEY",),
        ),
        "wait-negative": Case(
            ("--wait",), args=("--wait", "-1"), commands=frozenset({"send", "batch"})
        ),
        "store-sqlite-no-dir": Case(
            (store, "/nonexistent-dir"),
            env={store: "sqlite:////nonexistent-dir/x.db"},
            commands=frozenset({"run"}),
        ),
        "store-bad-port": Case(
            (store, "not a valid URL"),
            env={store: "redis://127.0.0.1:notaport/0"},
            commands=frozenset({"run"}),
        ),
        "store-scheme": Case(
            (store, "unsupported scheme 'mysql'"),
            env={store: "mysql://127.0.0.1/x"},
            commands=frozenset({"run"}),
        ),
        # Met at connect: worker/adapters/broker.py maps them to ConfigurationError.
        "broker-access-refused": Case(
            ("PABX_WORKER_AMQP_URL",),
            env={"PABX_WORKER_AMQP_URL": broker_url(amqp_url, netloc=f"guest:wrong-pw@{host}")},
        ),
        "broker-no-vhost": Case(
            ("PABX_WORKER_AMQP_URL",),
            env={"PABX_WORKER_AMQP_URL": broker_url(amqp_url, path="/no-such-vhost")},
        ),
        "broker-http-scheme": Case(
            ("PABX_WORKER_AMQP_URL",),
            env={"PABX_WORKER_AMQP_URL": broker_url(amqp_url, scheme="http")},
        ),
        "broker-unknown-scheme": Case(
            ("PABX_WORKER_AMQP_URL",),
            env={"PABX_WORKER_AMQP_URL": broker_url(amqp_url, scheme="amqpx")},
        ),
        "broker-bad-port": Case(
            ("PABX_WORKER_AMQP_URL",),
            env={
                "PABX_WORKER_AMQP_URL": broker_url(amqp_url, netloc="guest:guest@127.0.0.1:99999")
            },
        ),
    }


#: (case, command) pairs, from the table built on the default broker URL (ids only).
PAIRS = [
    (case, command)
    for case, spec in cases("amqp://guest:guest@127.0.0.1:5672/%2F").items()
    for command in COMMANDS
    if command in spec.commands
]


def files(directory: Path, settings: Settings) -> dict[str, str]:
    """The files the commands and the cases name, by placeholder."""
    body = {
        "command_id": f"cfg-{uuid.uuid4().hex}",
        "type": "redirect",
        "version": 1,
        "redirect": dict(VENDOR_EXAMPLE),
    }
    (directory / "command.json").write_text(json.dumps(body))
    (directory / "batch.jsonl").write_text(json.dumps(body) + "\n")
    (directory / "amqp-url").write_text(settings.amqp_url + "\n")
    (directory / "empty").write_text("")
    return {
        "command": str(directory / "command.json"),
        "batch": str(directory / "batch.jsonl"),
        "dir": str(directory),
    }


def not_a_log_record(line: str) -> bool:
    """``run`` logs JSON records on stderr; the error is the line that is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return True
    return not (isinstance(record, dict) and "level" in record)


@pytest.mark.timeout(GIVE_UP_S + 20)
@pytest.mark.parametrize(("case_id", "command"), PAIRS, ids=[f"{c}-{m}" for c, m in PAIRS])
def test_a_wrong_setting_is_one_line_and_exit_2(
    case_id: str, command: str, settings: Settings, tmp_path: Path
) -> None:
    case = cases(settings.amqp_url)[case_id]
    paths = files(tmp_path, settings)
    argv = [arg.format(**paths) for arg in COMMANDS[command]] + list(case.args)
    # What `run` needs to get as far as the store and the broker, then the case's mistake.
    working = {
        "PABX_WORKER_PABX_URL": "http://127.0.0.1:9",
        "PABX_WORKER_PABX_API_KEY": "k",
        "PABX_WORKER_PABX_CHANNEL_ID": "17",
        "PABX_WORKER_HTTP_PORT": "0",
        "PABX_WORKER_STORE_URL": f"sqlite:///{tmp_path / 'store.sqlite3'}",
    }
    mistake = {key: value.format(**paths) for key, value in case.env.items()}
    env = env_for(settings, **(working | mistake))
    for name in (*case.unset, "CREDENTIALS_DIRECTORY"):
        env.pop(name, None)
    if case.toml is not None:
        config = tmp_path / "w.toml"
        config.write_text(case.toml.format(**paths))
        argv += ["--config", str(config)]
    if case.credentials is not None:
        directory = tmp_path / "credentials"
        directory.mkdir()
        for name, text in case.credentials.items():
            (directory / name).write_text(text)
        env["CREDENTIALS_DIRECTORY"] = str(directory)
    try:
        done = subprocess.run(
            [*CLI, *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=GIVE_UP_S,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{' '.join(argv)} still running after {GIVE_UP_S} s: {exc.stderr!r}")
    lines = [line for line in done.stderr.splitlines() if not_a_log_record(line)]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr
    [line] = lines
    assert line.startswith("pabx-worker: ")
    for name in case.names:
        assert name.format(**paths) in line, line
