"""Command-line behaviour that needs no server: usage and configuration errors, exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from worker.cli import app

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("clean_worker_env")


def test_topology_export_matches_the_operators_definitions_file() -> None:
    result = runner.invoke(app, ["topology", "export"])
    assert result.exit_code == 0
    shipped = json.loads(Path("deploy/rabbitmq/definitions.json").read_text())
    assert json.loads(result.stdout) == shipped


def test_topology_export_has_quorum_queue_with_delivery_limit_and_dead_letters() -> None:
    exported = json.loads(runner.invoke(app, ["topology", "export"]).stdout)
    queues = {q["name"]: q["arguments"] for q in exported["queues"]}
    assert queues["pabx.redirect"] == {
        "x-queue-type": "quorum",
        "x-delivery-limit": 10,
        "x-dead-letter-exchange": "pabx.dead",
    }
    assert "x-max-length" in queues["pabx.unrouted"]
    retry = [name for name in queues if name.startswith("pabx.retry.")]
    assert retry and all(queues[n]["x-dead-letter-routing-key"] == "pabx.redirect" for n in retry)
    exchanges = {e["name"]: e for e in exported["exchanges"]}
    assert exchanges["pabx.results"]["arguments"] == {"alternate-exchange": "pabx.unrouted"}


def test_run_without_pabx_settings_names_them_and_exits_2() -> None:
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 2
    assert "PABX_WORKER_PABX_URL" in result.stderr and "Traceback" not in result.stderr


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PABX_WORKER_CONCURRENCY", "many")
    result = runner.invoke(app, ["run"])
    assert result.exit_code == 2 and "PABX_WORKER_CONCURRENCY" in result.stderr


def test_config_file_values_and_environment_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "worker.toml"
    config.write_text('command_queue = "from-file"\nresults_exchange = "file.results"\n')
    monkeypatch.setenv("PABX_WORKER_RESULTS_EXCHANGE", "env.results")
    result = runner.invoke(app, ["topology", "export", "--config", str(config)])
    assert result.exit_code == 0, result.stderr
    exported = json.loads(result.stdout)
    assert "from-file" in {q["name"] for q in exported["queues"]}
    assert "env.results" in {e["name"] for e in exported["exchanges"]}


def test_missing_config_file_is_a_usage_error(tmp_path: Path) -> None:
    result = runner.invoke(app, ["topology", "export", "--config", str(tmp_path / "nope.toml")])
    assert result.exit_code == 2 and "--config" in result.stderr


def test_send_invalid_json_exits_2_without_traceback() -> None:
    result = runner.invoke(app, ["send", "-"], input="{not json")
    assert result.exit_code == 2 and "not JSON" in result.stderr


def test_simulate_requires_an_api_key() -> None:
    result = runner.invoke(app, ["simulate"])
    assert result.exit_code == 2 and "--api-key" in result.stderr


@pytest.mark.parametrize("command", [["send", "-"], ["batch", "rows.csv"]])
def test_negative_wait_is_a_usage_error(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--wait", "-1"], input="{}")
    assert result.exit_code == 2
    assert result.stderr == "pabx-worker: --wait: must be 0 or more seconds\n"


def test_toml_syntax_error_names_the_file_and_position(tmp_path: Path) -> None:
    config = tmp_path / "w.toml"
    config.write_text("concurrency = = 4\n")
    result = runner.invoke(app, ["topology", "export", "--config", str(config)])
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert f"--config {config}: invalid TOML" in line and "line 1, column" in line


def test_unknown_variable_names_the_closest_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PABX_WORKER_CONCURENCY", "4")
    result = runner.invoke(app, ["topology", "export"])
    assert result.exit_code == 2
    assert "PABX_WORKER_CONCURENCY" in result.stderr and "PABX_WORKER_CONCURRENCY?" in result.stderr


def test_unreadable_secret_file_is_one_line_naming_variable_and_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unreadable = tmp_path / "missing"
    monkeypatch.setenv("PABX_WORKER_AMQP_URL_FILE", str(unreadable))
    result = runner.invoke(app, ["topology", "export"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "pabx-worker: configuration error: PABX_WORKER_AMQP_URL_FILE:"
        f" cannot read {unreadable}: No such file or directory"
    ]


def test_version_is_the_installed_distributions() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"pabx-worker {version('pabx-worker')}\n"


def test_schemas_check_outside_a_checkout_checks_the_installed_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.contract.schemas import installed_directory

    monkeypatch.chdir(tmp_path)  # no ./schemas here
    result = runner.invoke(app, ["schemas", "check"])
    assert result.exit_code == 0, result.output
    assert f"up to date ({installed_directory()})" in result.output
    assert (installed_directory() / "redirect-outcome.v1.json").is_file()


# -- help, completion --------------------------------------------------------------------


def _leaf_commands() -> list[list[str]]:
    """The argv prefix of every command that does something (``parked replay`` …)."""
    import typer

    def walk(command: Any, path: list[str]) -> list[list[str]]:
        if hasattr(command, "commands"):  # a group
            return [
                leaf
                for name, sub in sorted(command.commands.items())
                for leaf in walk(sub, [*path, name])
            ]
        return [path]

    return walk(typer.main.get_command(app), [])


@pytest.mark.parametrize("argv", _leaf_commands(), ids=" ".join)
def test_help_names_settings_and_exit_codes_without_type_labels(argv: list[str]) -> None:
    import re

    result = runner.invoke(app, [*argv, "--help"], prog_name="pabx-worker", terminal_width=100)
    assert result.exit_code == 0
    text = result.stdout
    assert "Settings:" in text and "Exit codes:" in text, text
    assert not re.search(r"<(bool|str|int|float|path|list\[\w+\])>", text), text
    assert "TEXT" not in text and "FLOAT" not in text and "INTEGER" not in text, text
    # every option that takes a value names what it takes
    for option in re.findall(r"^\s+(--[\w-]+)( [A-Z_]+)?\s", text, flags=re.MULTILINE):
        assert option[0] in FLAGS or option[1], (argv, option[0], text)


#: Options that take no value.
FLAGS = {
    "--help",
    "--json",
    "--dry-run",
    "--no-declare",
    "--skip-invalid",
    "--validate",
    "--install-completion",
    "--show-completion",
    "--version",
    "--trace",
}


def test_completion_is_enabled_and_completes_commands() -> None:
    import os
    import subprocess
    import sys

    def complete(words: str) -> list[str]:
        env = {
            **os.environ,
            "_PABX_WORKER_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - 1),
        }
        done = subprocess.run(
            [sys.executable, "-m", "worker"], env=env, capture_output=True, text=True, timeout=60
        )
        return done.stdout.split()

    assert complete("pabx-worker par") == ["parked"]
    assert set(complete("pabx-worker parked d")) == {"discard"}
    assert "--older-than" in complete("pabx-worker parked replay --o")
    script = subprocess.run(
        [sys.executable, "-m", "worker", "--show-completion", "bash"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert script.returncode == 0 and "_PABX_WORKER_COMPLETE" in script.stdout


def test_topology_export_json_is_the_definitions() -> None:
    plain = runner.invoke(app, ["topology", "export"])
    as_json = runner.invoke(app, ["topology", "export", "--json"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout) == json.loads(plain.stdout)
