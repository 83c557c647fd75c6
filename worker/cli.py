"""The ``pabx-worker`` command line (SPEC §1).

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from worker.errors import BrokerError, ConfigurationError, InvalidCommand, PabxWorkerError
from worker.settings import Settings, load_settings

__all__ = ["app", "main"]

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Relay redirect commands from RabbitMQ to a Dígitro PABX.",
)
topology_app = typer.Typer(no_args_is_help=True, help="Declare or export the broker topology.")
schemas_app = typer.Typer(no_args_is_help=True, help="Write or check schemas/*.json.")
app.add_typer(topology_app, name="topology")
app.add_typer(schemas_app, name="schemas")

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="TOML file with settings (environment variables win)."),
]
T = TypeVar("T")


def _fail(code: int, message: str) -> typer.Exit:
    typer.echo(f"pabx-worker: {message}", err=True)
    return typer.Exit(code)


def _guard(action: Callable[[], T]) -> T:
    """Run a command body, turning our errors into messages and exit codes."""
    try:
        return action()
    except ConfigurationError as exc:
        raise _fail(2, f"configuration error: {exc}") from None
    except BrokerError as exc:
        raise _fail(
            1,
            f"broker error: {exc}. Is RabbitMQ running at PABX_WORKER_AMQP_URL?"
            " (start it with `rabbitmq-server -detached`)",
        ) from None
    except PabxWorkerError as exc:
        raise _fail(1, str(exc)) from None


def _settings(config: Path | None, **values: Any) -> Settings:
    return _guard(lambda: load_settings(config, **values))


@app.command()
def run(config: ConfigOption = None) -> None:
    """Consume commands, call the PABX, publish outcomes; stops on SIGTERM/SIGINT."""
    from worker.app import run_worker

    settings = _settings(config)
    _guard(settings.require_targets)
    _guard(lambda: run_worker(settings))


@app.command()
def simulate(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    api_key: Annotated[str, typer.Option("--api-key", help="The x-api-key it accepts.")] = "",
    latency_ms: Annotated[float, typer.Option("--latency-ms", help="Initial latency.")] = 0,
) -> None:
    """Serve the PABX simulator (vendor API + /_sim admin API)."""
    from worker.simulator import run_simulator

    if not api_key:
        raise _fail(2, "--api-key: required and must not be empty")
    try:
        run_simulator(host=host, port=port, api_key=api_key, latency_ms=latency_ms)
    except ValueError as exc:
        raise _fail(2, str(exc)) from None
    except OSError as exc:
        raise _fail(1, f"cannot listen on {host}:{port}: {exc}") from None


@app.command()
def demo(config: ConfigOption = None) -> None:
    """Start the simulator and a worker, send sample commands, print their outcomes."""
    from worker.demo import run_demo

    raise typer.Exit(_guard(lambda: run_demo(config)))


@app.command()
def send(
    file: Annotated[str, typer.Argument(help="JSON command file, or - for stdin.")] = "-",
    wait: Annotated[float, typer.Option(help="Seconds to wait for the outcome; 0: don't.")] = 0,
    validate: Annotated[bool, typer.Option(help="Validate before publishing.")] = True,
    config: ConfigOption = None,
) -> None:
    """Publish one command with publisher confirms; --wait prints its outcome."""
    from worker.messages import Delivery, decode_command, parse_json
    from worker.producer import Producer

    try:
        body = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    except OSError as exc:
        raise _fail(2, f"cannot read {file}: {exc}") from None
    message_id = uuid.uuid4().hex
    if validate:
        try:
            command = decode_command(Delivery(body=body, message_id=message_id))
        except InvalidCommand as exc:
            raise _fail(2, f"invalid command: {exc}") from None
        message_id = command.command_id or message_id
    else:
        data = _guard(lambda: parse_json(body))
        if isinstance(data, dict) and isinstance(data.get("command_id"), str):
            message_id = data["command_id"]
    settings = _settings(config)

    def publish() -> dict[str, Any] | None:
        with Producer(settings) as producer:
            producer.publish([(body, message_id)], reply=wait > 0)
            if wait <= 0:
                return None
            return producer.wait_outcomes({message_id}, wait).get(message_id)

    outcome = _guard(publish)
    typer.echo(f"published {message_id}", err=True)
    if wait > 0:
        if outcome is None:
            raise _fail(1, f"no outcome for {message_id} within {wait:g} s")
        typer.echo(json.dumps(outcome, indent=2, ensure_ascii=False))
        raise typer.Exit(0 if outcome["data"]["status"] == "accepted" else 1)


@topology_app.command("declare")
def topology_declare(config: ConfigOption = None) -> None:
    """Declare every exchange and queue on the broker (idempotent)."""
    from worker.producer import Producer

    settings = _settings(config)
    _guard(lambda: Producer(settings).close())
    typer.echo("topology declared", err=True)


@topology_app.command("export")
def topology_export(
    vhost: Annotated[str, typer.Option(help="Virtual host to name.")] = "/",
    config: ConfigOption = None,
) -> None:
    """Print the topology as RabbitMQ definitions JSON."""
    from worker.topology import Topology

    definitions = Topology.from_settings(_settings(config)).definitions(vhost)
    typer.echo(json.dumps(definitions, indent=2))


SchemasDir = Annotated[Path, typer.Option("--dir", help="Where the schema files live.")]


@schemas_app.command("export")
def schemas_export(directory: SchemasDir = Path("schemas")) -> None:
    """Write schemas/*.json from the models."""
    from worker.schemas import export_schemas

    for path in export_schemas(directory):
        typer.echo(f"wrote {path}", err=True)


@schemas_app.command("check")
def schemas_check(directory: SchemasDir = Path("schemas")) -> None:
    """Fail (exit 1) when schemas/*.json differ from the models."""
    from worker.schemas import check_schemas

    drifted = check_schemas(directory)
    if drifted:
        raise _fail(1, f"out of date: {', '.join(drifted)}; run `pabx-worker schemas export`")
    typer.echo("schemas up to date", err=True)


def main() -> None:
    """Console-script entry point."""
    app()
