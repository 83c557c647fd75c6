"""The ``pabx-worker`` command line (SPEC §1).

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error. Help is plain
text (click's layout): each value names what it takes (``--wait SECONDS``), no Python types,
and each command's help names the settings it reads and its exit codes.
"""

from __future__ import annotations

import contextlib
import json
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import typer.core

from worker.contract.errors import (
    BatchFileError,
    BrokerError,
    ConfigurationError,
    InvalidCommand,
    PabxWorkerError,
)
from worker.contract.settings import Settings, load_settings

__all__ = ["app", "main"]

#: The name completion scripts and usage lines use, also under ``python -m worker``.
PROG_NAME = "pabx-worker"


class Command(typer.core.TyperCommand):
    """A command whose help lists arguments by name, without typer's ``<str>`` type labels."""

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((param.metavar or (param.name or "").upper(), record[1]))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _typer(**options: Any) -> typer.Typer:
    return typer.Typer(no_args_is_help=True, rich_markup_mode=None, **options)


app = _typer(
    pretty_exceptions_enable=False,
    help="Relay redirect commands from RabbitMQ to a Dígitro PABX.",
    epilog=(
        "Settings are PABX_WORKER_* variables, or their keys in a --config TOML file;"
        " see README.md, Configuration. Exit codes: 0 success, 1 runtime failure,"
        " 2 usage or configuration error."
    ),
)
topology_app = _typer(help="Declare or export the broker topology.")
schemas_app = _typer(help="Write or check schemas/*.json.")
parked_app = _typer(help="Inspect, export, replay and discard parked commands.")
app.add_typer(topology_app, name="topology")
app.add_typer(schemas_app, name="schemas")
app.add_typer(parked_app, name="parked")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"pabx-worker {version('pabx-worker')}")
        raise typer.Exit()


@app.callback()
def _root(
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    pass


ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", metavar="FILE", help="TOML file with settings (environment variables win)."
    ),
]
NoDeclareOption = Annotated[
    bool,
    typer.Option(
        "--no-declare",
        help="Do not declare the topology (needs no configure permission): check it passively.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="One JSON object on stdout, for scripts.")]
T = TypeVar("T")


TraceOption = Annotated[
    bool,
    typer.Option(
        "--trace",
        help="Start a trace per command (W3C traceparent in its AMQP headers); spans go to"
        " the OTLP exporter when OTEL_* variables are set. Needs pabx-worker[otel].",
    ),
]


@contextlib.contextmanager
def _tracing(trace: bool) -> Any:
    """``--trace``: OpenTelemetry for this command, shut down (spans flushed) at the end."""
    from worker.tracing import NO_TRACING, tracing_from_env

    if not trace:
        yield NO_TRACING
        return
    from worker.logs import SERVICE, package_version

    try:
        tracing = tracing_from_env(service=SERVICE, version=package_version(), force=True)
    except ImportError:
        raise _fail(2, "--trace: OpenTelemetry is not installed (pabx-worker[otel])") from None
    try:
        yield tracing
    finally:
        tracing.shutdown()


def _fail(code: int, message: str) -> typer.Exit:
    """Print ``message`` as one line on stderr; the exit to raise with ``code``."""
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    typer.echo(f"pabx-worker: {one_line}", err=True)
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


ProcessesOption = Annotated[
    str,
    typer.Option(
        "--processes",
        metavar="N",
        help="Worker processes: a number, or auto (one per CPU). Above 1, a supervisor runs"
        " them, restarts any that dies and serves one /metrics (a process label), /healthz and"
        " /readyz for all.",
    ),
]


@app.command(cls=Command)
def run(config: ConfigOption = None, processes: ProcessesOption = "1") -> None:
    """Consume commands, call the PABX, publish outcomes; stops on SIGTERM/SIGINT.

    Settings: PABX_WORKER_AMQP_URL, PABX_WORKER_PABX_URL, PABX_WORKER_PABX_API_KEY and
    PABX_WORKER_PABX_CHANNEL_ID (or [pabx.NAME] targets), PABX_WORKER_STORE_URL; the rest
    have defaults. Under systemd Type=notify it reports readiness and pings the watchdog.
    With --processes N each process has PABX_WORKER_CONCURRENCY threads and its own broker
    connection; SIGTERM drains them all.

    Exit codes: 0 stopped by a signal, 1 runtime failure, 2 configuration error (also a
    topology mismatch or refused broker credentials).
    """
    from worker.supervisor import parse_processes

    try:
        count = parse_processes(processes)
    except ValueError as exc:
        raise _fail(2, f"--processes: {exc}") from None
    settings = _settings(config)
    _guard(settings.require_targets)
    if count == 1:
        from worker.runtime import run_worker

        _guard(lambda: run_worker(settings))
        return
    from worker.supervisor import run_group

    raise typer.Exit(_guard(lambda: run_group(settings, count, config)))


@app.command(cls=Command)
def simulate(
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to listen on.")] = 8080,
    api_key: Annotated[
        str, typer.Option("--api-key", metavar="KEY", help="The x-api-key it accepts.")
    ] = "",
    latency_ms: Annotated[
        float, typer.Option("--latency-ms", metavar="MS", help="Initial latency.")
    ] = 0,
    tls_cert: Annotated[
        Path | None,
        typer.Option("--tls-cert", metavar="FILE", help="Serve HTTPS with this certificate (PEM)."),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option("--tls-key", metavar="FILE", help="Private key of --tls-cert (PEM)."),
    ] = None,
    client_ca: Annotated[
        Path | None,
        typer.Option(
            "--client-ca", metavar="FILE", help="Require client certificates signed by this CA."
        ),
    ] = None,
) -> None:
    """Serve the PABX simulator (vendor API + /_sim admin API) until SIGTERM/SIGINT.

    Settings: none (options only).

    Exit codes: 0 stopped, 1 cannot listen, 2 bad options.
    """
    from worker.tools.simulator import run_simulator

    if not api_key:
        raise _fail(2, "--api-key: required and must not be empty")
    try:
        run_simulator(
            host=host,
            port=port,
            api_key=api_key,
            latency_ms=latency_ms,
            tls_cert=tls_cert,
            tls_key=tls_key,
            client_ca=client_ca,
        )
    except ValueError as exc:
        raise _fail(2, str(exc)) from None
    except OSError as exc:
        raise _fail(1, f"cannot listen on {host}:{port}: {exc}") from None


@app.command(cls=Command)
def demo(config: ConfigOption = None) -> None:
    """Start the simulator and a worker, send sample commands, print their outcomes.

    Settings: PABX_WORKER_AMQP_URL (a local RabbitMQ).

    Exit codes: 0 every outcome as expected, 1 otherwise or no broker, 2 configuration error.
    """
    from worker.tools.demo import run_demo

    raise typer.Exit(_guard(lambda: run_demo(config)))


@app.command(cls=Command)
def send(
    file: Annotated[
        str, typer.Argument(metavar="FILE", help="JSON command file, or - for stdin.")
    ] = "-",
    wait: Annotated[
        float, typer.Option(metavar="SECONDS", help="Seconds to wait for the outcome; 0: don't.")
    ] = 0,
    validate: Annotated[bool, typer.Option(help="Validate before publishing.")] = True,
    no_declare: NoDeclareOption = False,
    as_json: JsonOption = False,
    trace: TraceOption = False,
    config: ConfigOption = None,
) -> None:
    """Publish one command with publisher confirms; --wait prints its outcome.

    Settings: PABX_WORKER_AMQP_URL (a user that may publish to the commands exchange).
    --json prints {"command_id", "published", "outcome"} (outcome null without --wait).

    Exit codes: 0 published (with --wait: accepted), 1 broker error, no outcome in time or
    an outcome other than accepted, 2 invalid command or configuration error.
    """
    from worker.contract.messages import Delivery, decode_command, parse_json
    from worker.produce.producer import Producer

    if wait < 0:
        raise _fail(2, "--wait: must be 0 or more seconds")
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
    else:  # published as it is, JSON or not
        with contextlib.suppress(InvalidCommand):
            data = parse_json(body)
            if isinstance(data, dict) and isinstance(data.get("command_id"), str):
                message_id = data["command_id"]
    settings = _settings(config)

    def publish() -> dict[str, Any] | None:
        with (
            _tracing(trace) as tracing,
            Producer(settings, declare=not no_declare, tracing=tracing) as producer,
        ):
            producer.publish([(body, message_id)], reply=wait > 0)
            if wait <= 0:
                return None
            return producer.wait_outcomes({message_id}, wait).get(message_id)

    outcome = _guard(publish)
    typer.echo(f"published {message_id}", err=True)
    if as_json:
        summary = {"command_id": message_id, "published": True, "outcome": outcome}
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    if wait > 0:
        if outcome is None:
            raise _fail(1, f"no outcome for {message_id} within {wait:g} s")
        if not as_json:
            typer.echo(json.dumps(outcome, indent=2, ensure_ascii=False))
        raise typer.Exit(0 if outcome["data"]["status"] == "accepted" else 1)


@app.command(cls=Command)
def batch(
    file: Annotated[
        Path,
        typer.Argument(metavar="FILE", help="CSV (vendor field names as header) or JSON Lines."),
    ],
    wait: Annotated[
        float, typer.Option(metavar="SECONDS", help="Seconds to wait for the outcomes; 0: don't.")
    ] = 0,
    results: Annotated[
        Path | None,
        typer.Option(
            "--results",
            metavar="FILE",
            help="Write command_id,status,error_code,attempts (CSV) here.",
        ),
    ] = None,
    skip_invalid: Annotated[
        bool, typer.Option("--skip-invalid", help="Publish the valid rows, report the others.")
    ] = False,
    no_declare: NoDeclareOption = False,
    as_json: JsonOption = False,
    trace: TraceOption = False,
    config: ConfigOption = None,
) -> None:
    """Publish many commands from a CSV or JSON Lines file, with publisher confirms.

    Settings: PABX_WORKER_AMQP_URL (a user that may publish to the commands exchange).
    --json prints the summary as one object: rows, commands, merged_rows, invalid_rows,
    published, outcomes (counts by status, null without --wait), error, exit_code.

    Exit codes: 0 all published (with --wait: all accepted), 1 otherwise or broker error,
    2 invalid rows (without --skip-invalid), unreadable file or configuration error.
    """
    from worker.produce.batch import load_batch

    if wait < 0:
        raise _fail(2, "--wait: must be 0 or more seconds")
    settings = _settings(config)
    try:
        loaded = load_batch(file)
    except BatchFileError as exc:
        raise _fail(2, f"{file}: {exc}") from None
    for error in loaded.errors:
        typer.echo(f"{file}: {error}", err=True)
    if loaded.errors and not skip_invalid:
        raise _fail(
            2,
            f"{loaded.invalid_rows} of {loaded.rows} rows are invalid; nothing was published"
            " (fix them, or pass --skip-invalid)",
        )
    if not loaded.commands:
        raise _fail(2, f"{file}: no valid command to publish")
    out = _open_for_writing(results, "--results")
    try:
        code = _run_batch(
            settings,
            file,
            loaded,
            wait,
            out,
            declare=not no_declare,
            as_json=as_json,
            trace=trace,
        )
    finally:
        if out is not None:
            out.close()
    raise typer.Exit(code)


def _open_for_writing(path: Path | None, option: str) -> Any:
    if path is None:
        return None
    try:
        return path.open("w", encoding="utf-8", newline="")
    except OSError as exc:
        raise _fail(2, f"{option}: cannot write {path}: {exc.strerror or exc}") from None


def _run_batch(
    settings: Settings,
    file: Path,
    loaded: Any,
    wait: float,
    out: Any,
    *,
    declare: bool = True,
    as_json: bool = False,
    trace: bool = False,
) -> int:
    from worker.produce.batch import (
        NOT_PUBLISHED,
        BatchRun,
        CommandResult,
        make_progress,
        run_batch,
    )
    from worker.produce.batch import write_results as write
    from worker.produce.producer import Producer

    def publish() -> BatchRun:
        with (
            _tracing(trace) as tracing,
            Producer(settings, declare=declare, tracing=tracing) as producer,
        ):
            return run_batch(producer, loaded.commands, wait=wait, progress=make_progress())

    try:
        run = _guard(publish)
    except typer.Exit:
        if out is not None:
            write(out, (CommandResult(c.command_id, NOT_PUBLISHED) for c in loaded.commands))
        raise
    except KeyboardInterrupt:
        raise _fail(1, "interrupted; running the same file again sends no command twice") from None
    if out is not None:
        write(out, run.results)
    if as_json:
        typer.echo(json.dumps(_batch_summary(file, loaded, run), indent=2))
    else:
        _print_batch_summary(file, loaded, run)
    if run.error:
        typer.echo(
            f"pabx-worker: publishing stopped: {run.error}; running the same file again"
            " sends no command twice",
            err=True,
        )
    return run.exit_code


def _batch_summary(file: Path, loaded: Any, run: Any) -> dict[str, Any]:
    """What ``batch --json`` prints."""
    return {
        "file": str(file),
        "rows": loaded.rows,
        "commands": len(loaded.commands),
        "merged_rows": loaded.merged_rows,
        "invalid_rows": loaded.invalid_rows,
        "published": run.published,
        "outcomes": dict(sorted(run.counts().items())) if run.waited else None,
        "error": run.error,
        "exit_code": run.exit_code,
    }


def _print_batch_summary(file: Path, loaded: Any, run: Any) -> None:
    merged = f", {loaded.merged_rows} duplicate rows merged" if loaded.merged_rows else ""
    skipped = f", {loaded.invalid_rows} invalid rows skipped" if loaded.invalid_rows else ""
    typer.echo(f"{file}: {loaded.rows} rows, {len(loaded.commands)} commands{merged}{skipped}")
    typer.echo(f"published {run.published} of {len(run.results)} commands")
    if run.waited:
        counts = run.counts()
        typer.echo("outcomes: " + ", ".join(f"{k} {counts[k]}" for k in sorted(counts)))


CodeOption = Annotated[
    list[str] | None,
    typer.Option("--code", metavar="CODE", help="Only messages with this error code (repeatable)."),
]
OlderOption = Annotated[
    str | None,
    typer.Option(
        "--older-than",
        metavar="AGE",
        help="Only messages parked longer ago (seconds, 90s, 15m, 2h).",
    ),
]
NewerOption = Annotated[
    str | None,
    typer.Option(
        "--newer-than", metavar="AGE", help="Only messages parked more recently (seconds, 15m …)."
    ),
]


LimitOption = Annotated[int | None, typer.Option(min=1, metavar="N", help="At most this many.")]
RateOption = Annotated[
    float | None,
    typer.Option(min=0.001, metavar="PER_S", help="At most this many messages per second."),
]


def _parked_filter(code: list[str] | None, older: str | None, newer: str | None) -> Any:
    from worker.produce.parked import ParkedFilter, parse_duration

    ages: dict[str, float | None] = {}
    for option, value in (("--older-than", older), ("--newer-than", newer)):
        try:
            ages[option] = None if value is None else parse_duration(value)
        except ValueError as exc:
            raise _fail(2, f"{option}: {exc}") from None
    return ParkedFilter(frozenset(code or ()), ages["--older-than"], ages["--newer-than"])


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    whole = int(seconds)
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if whole >= size:
            return f"{whole // size}{unit}{(whole % size) // sub_size:02d}{sub}"
    return f"{whole // 60}m{whole % 60:02d}s" if whole >= 60 else f"{whole}s"


def _browse(
    settings: Settings, where: Any, limit: int | None, *, declare: bool = True
) -> tuple[int, list[Any]]:
    from worker.produce.parked import ParkedQueue

    def browse() -> tuple[int, list[Any]]:
        with _producer(settings, declare=declare) as producer:
            return ParkedQueue(producer).browse(where=where, limit=limit)

    return _guard(browse)


def _producer(settings: Settings, *, declare: bool) -> Any:
    """A Producer for the parked tools: without declaring, the parked queue is checked too."""
    from worker.produce.producer import Producer

    return Producer(settings, declare=declare, needs=() if declare else (settings.parked_queue,))


@parked_app.command("list", cls=Command)
def parked_list(
    code: CodeOption = None,
    older_than: OlderOption = None,
    newer_than: NewerOption = None,
    limit: Annotated[int, typer.Option(min=1, metavar="N", help="Show at most this many.")] = 100,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON array on stdout, for scripts.")
    ] = False,
    no_declare: NoDeclareOption = False,
    config: ConfigOption = None,
) -> None:
    """List parked commands with reason, age and attempts (without consuming them).

    Settings: PABX_WORKER_AMQP_URL, PABX_WORKER_PARKED_QUEUE (default pabx.parked).

    Exit codes: 0 listed, 1 broker error, 2 bad option or configuration error.
    """
    from datetime import UTC, datetime

    where = _parked_filter(code, older_than, newer_than)
    settings = _settings(config)
    depth, found = _browse(settings, where, limit, declare=not no_declare)
    now = datetime.now(UTC)
    if as_json:
        typer.echo(json.dumps([m.summary(now) for m in found], indent=2, ensure_ascii=False))
        return
    typer.echo(f"{len(found)} shown of {depth} parked in {settings.parked_queue}", err=True)
    if found:
        typer.echo(
            f"{'#':>5}  {'command_id':<40} {'status':<9}{'code':<21}{'att':>3}  {'age':>7}  reason"
        )
    for m in found:
        attempts = "-" if m.attempts is None else str(m.attempts)
        typer.echo(
            f"{m.position:>5}  {(m.command_id or '-'):<40} {(m.status or '-'):<9}"
            f"{m.error_code:<21}{attempts:>3}  {_age(m.age(now)):>7}  {m.reason[:100]}"
        )


@parked_app.command("show", cls=Command)
def parked_show(
    command_id: Annotated[
        str,
        typer.Argument(metavar="COMMAND_ID", help="Command id (or AMQP message/correlation id)."),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="JSON, for scripts.")] = False,
    no_declare: NoDeclareOption = False,
    config: ConfigOption = None,
) -> None:
    """Show the parked copies of one command: why, when, attempts, headers and body.

    Settings: PABX_WORKER_AMQP_URL, PABX_WORKER_PARKED_QUEUE (default pabx.parked).
    Passwords in the body are masked.

    Exit codes: 0 shown, 1 not parked or broker error, 2 configuration error.
    """
    from datetime import UTC, datetime

    from worker.produce.parked import ParkedFilter

    settings = _settings(config)
    depth, every = _browse(settings, ParkedFilter(), None, declare=not no_declare)
    ids = ("message_id", "correlation_id")
    found = [
        m
        for m in every
        if command_id == m.command_id or command_id in (str(m.properties.get(k)) for k in ids)
    ]
    if not found:
        raise _fail(1, f"no parked message with id {command_id!r} among {depth} parked")
    now = datetime.now(UTC)
    if as_json:
        typer.echo(json.dumps([_shown(m, now) for m in found], indent=2, ensure_ascii=False))
        return
    for m in found:
        for name, value in _shown(m, now).items():
            if name != "body":
                typer.echo(f"{name + ':':<16}{value}")
        typer.echo("body:")
        typer.echo(_shown(m, now)["body"])


def _shown(message: Any, now: Any) -> dict[str, Any]:
    from worker.produce.parked import pretty_body

    summary = message.summary(now)
    summary["age"] = _age(summary.pop("age_s"))
    props = {k: v for k, v in message.properties.items() if k != "delivery_mode"}
    return {
        **summary,
        "properties": {k: _plain(v) for k, v in props.items()},
        "headers": {k: _plain(v) for k, v in message.headers.items()},
        "body": pretty_body(message.body),
    }


def _plain(value: Any) -> Any:
    """AMQP header values as JSON can show them."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


@parked_app.command("replay", cls=Command)
def parked_replay(
    code: CodeOption = None,
    older_than: OlderOption = None,
    newer_than: NewerOption = None,
    limit: LimitOption = None,
    rate: RateOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would move.")] = False,
    no_declare: NoDeclareOption = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Move parked commands back to the commands exchange; ack each once confirmed.

    Settings: PABX_WORKER_AMQP_URL, PABX_WORKER_PARKED_QUEUE (default pabx.parked),
    PABX_WORKER_COMMANDS_EXCHANGE. --json prints one object: dry_run, scanned, selected,
    replayed (command ids), failed ({command_id, reason}), error.

    Exit codes: 0 every matching command moved, 1 some did not (they stay parked) or
    broker error, 2 bad option or configuration error.
    """
    from datetime import UTC, datetime

    from worker.produce.parked import ParkedMessage, ParkedQueue, ReplayReport

    where = _parked_filter(code, older_than, newer_than)
    settings = _settings(config)
    now = datetime.now(UTC)

    def said(m: ParkedMessage, ok: bool, reason: str | None) -> None:
        if as_json:
            return
        what = f"{m.command_id or '-'} ({m.error_code}, parked {_age(m.age(now))} ago)"
        typer.echo(f"replayed {what}" if ok else f"NOT replayed {what}: {reason}")

    def replay() -> ReplayReport:
        with _producer(settings, declare=not no_declare) as producer:
            return ParkedQueue(producer).replay(
                where=where, limit=limit, rate=rate, dry_run=dry_run, on_replayed=said
            )

    try:
        report = _guard(replay)
    except KeyboardInterrupt:
        raise _fail(1, "interrupted; what was not moved is still parked") from None
    if as_json:
        typer.echo(json.dumps(_replay_summary(report), indent=2, ensure_ascii=False))
    elif dry_run:
        for m in report.selected:
            typer.echo(f"would replay {m.command_id or '-'} ({m.error_code}, {_age(m.age(now))})")
    verb = "would replay" if dry_run else "replayed"
    moved = len(report.selected) if dry_run else len(report.replayed)
    typer.echo(
        f"{verb} {moved} of {len(report.selected)} matching ({report.scanned} looked at)"
        f" from {settings.parked_queue} to {settings.commands_exchange}",
        err=True,
    )
    if report.error:
        typer.echo(f"pabx-worker: replay stopped: {report.error}; nothing was lost", err=True)
    raise typer.Exit(0 if report.ok else 1)


@parked_app.command("discard", cls=Command)
def parked_discard(
    archive: Annotated[
        Path | None,
        typer.Option(
            "--archive",
            metavar="FILE",
            help="JSON Lines file each message is appended to before it is removed (0600).",
        ),
    ] = None,
    code: CodeOption = None,
    older_than: OlderOption = None,
    newer_than: NewerOption = None,
    limit: LimitOption = None,
    rate: RateOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would go.")] = False,
    no_declare: NoDeclareOption = False,
    config: ConfigOption = None,
) -> None:
    """Remove parked commands for good, each written to --archive before it is acked.

    Settings: PABX_WORKER_AMQP_URL, PABX_WORKER_PARKED_QUEUE (default pabx.parked).
    The archive is appended to, one JSON object a line, bodies unmasked.

    Exit codes: 0 every matching command discarded, 1 stopped early (the rest stay parked)
    or broker error, 2 bad option, unwritable archive or configuration error.
    """
    from datetime import UTC, datetime

    from worker.produce.archive import ArchiveWriter, open_archive
    from worker.produce.parked import DiscardReport, ParkedMessage, ParkedQueue

    where = _parked_filter(code, older_than, newer_than)
    if archive is None and not dry_run:
        raise _fail(2, "--archive: required (where removed messages are kept), or --dry-run")
    settings = _settings(config)
    out = None if dry_run else _open_archive(archive, open_archive)
    now = datetime.now(UTC)

    def said(m: ParkedMessage) -> None:
        typer.echo(f"discarded {m.command_id or '-'} ({m.error_code}, {_age(m.age(now))})")

    def discard() -> DiscardReport:
        with _producer(settings, declare=not no_declare) as producer:
            writer = None if out is None else ArchiveWriter(out)
            return ParkedQueue(producer).discard(
                writer, where=where, limit=limit, rate=rate, dry_run=dry_run, on_discarded=said
            )

    try:
        report = _guard(discard)
    except KeyboardInterrupt:
        raise _fail(1, "interrupted; what was not archived is still parked") from None
    finally:
        if out is not None:
            out.close()
    for m in report.selected if dry_run else ():
        typer.echo(f"would discard {m.command_id or '-'} ({m.error_code}, {_age(m.age(now))})")
    verb = "would discard" if dry_run else "discarded"
    gone = len(report.selected) if dry_run else len(report.discarded)
    where_to = "" if archive is None or dry_run else f", archived in {archive}"
    typer.echo(
        f"{verb} {gone} of {len(report.selected)} matching ({report.scanned} looked at)"
        f" from {settings.parked_queue}{where_to}",
        err=True,
    )
    if report.error:
        typer.echo(f"pabx-worker: discard stopped: {report.error}; nothing was lost", err=True)
    raise typer.Exit(0 if report.ok else 1)


def _open_archive(path: Path | None, opener: Callable[..., Any], *, append: bool = True) -> Any:
    if path is None:
        return None
    try:
        return opener(path, append=append)
    except OSError as exc:
        raise _fail(2, f"cannot write {path}: {exc.strerror or exc}") from None


@parked_app.command("export", cls=Command)
def parked_export(
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", metavar="FILE", help="JSON Lines file; default stdout."),
    ] = None,
    code: CodeOption = None,
    older_than: OlderOption = None,
    newer_than: NewerOption = None,
    limit: LimitOption = None,
    no_declare: NoDeclareOption = False,
    config: ConfigOption = None,
) -> None:
    """Write parked commands as JSON Lines, bodies unmasked, without consuming them.

    Settings: PABX_WORKER_AMQP_URL, PABX_WORKER_PARKED_QUEUE (default pabx.parked).

    Exit codes: 0 written, 1 broker error, 2 bad option, unwritable file or configuration
    error.
    """
    from worker.produce.archive import ArchiveWriter, open_archive
    from worker.produce.parked import ParkedQueue

    where = _parked_filter(code, older_than, newer_than)
    settings = _settings(config)
    out = sys.stdout if output is None else _open_archive(output, open_archive, append=False)

    def export() -> tuple[int, int]:
        with _producer(settings, declare=not no_declare) as producer:
            return ParkedQueue(producer).export(ArchiveWriter(out), where=where, limit=limit)

    try:
        depth, written = _guard(export)
    finally:
        if output is not None:
            out.close()
    typer.echo(f"exported {written} of {depth} parked in {settings.parked_queue}", err=True)


def _replay_summary(report: Any) -> dict[str, Any]:
    """What ``parked replay --json`` prints."""
    return {
        "dry_run": report.dry_run,
        "scanned": report.scanned,
        "selected": [m.command_id for m in report.selected],
        "replayed": [m.command_id for m in report.replayed],
        "failed": [{"command_id": m.command_id, "reason": why} for m, why in report.failed],
        "error": report.error,
    }


@topology_app.command("declare", cls=Command)
def topology_declare(config: ConfigOption = None) -> None:
    """Declare every exchange and queue on the broker (idempotent).

    Settings: PABX_WORKER_AMQP_URL (a user with configure permission) and the topology
    names (PABX_WORKER_COMMANDS_EXCHANGE, PABX_WORKER_COMMAND_QUEUE …).

    Exit codes: 0 declared, 1 broker error, 2 configuration error or a mismatching queue.
    """
    from worker.produce.producer import Producer

    settings = _settings(config)
    _guard(lambda: Producer(settings).close())
    typer.echo("topology declared", err=True)


@topology_app.command("export", cls=Command)
def topology_export(
    vhost: Annotated[str, typer.Option(metavar="VHOST", help="Virtual host to name.")] = "/",
    as_json: Annotated[
        bool, typer.Option("--json", help="The same JSON (the default), named for scripts.")
    ] = True,
    config: ConfigOption = None,
) -> None:
    """Print the topology as RabbitMQ definitions JSON (rabbitmqctl import_definitions).

    Settings: the topology names (PABX_WORKER_COMMANDS_EXCHANGE, PABX_WORKER_COMMAND_QUEUE
    …); no broker is contacted.

    Exit codes: 0 printed, 2 configuration error.
    """
    from worker.contract.topology import Topology

    definitions = Topology.from_settings(_settings(config)).definitions(vhost)
    typer.echo(json.dumps(definitions, indent=2))


SchemasDir = Annotated[
    Path, typer.Option("--dir", metavar="DIR", help="Where the schema files live.")
]


@schemas_app.command("export", cls=Command)
def schemas_export(directory: SchemasDir = Path("schemas")) -> None:
    """Write schemas/*.json from the models.

    Settings: none. Exit codes: 0 written, 1 cannot write.
    """
    from worker.contract.schemas import export_schemas

    for path in export_schemas(directory):
        typer.echo(f"wrote {path}", err=True)


@schemas_app.command("check", cls=Command)
def schemas_check(
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            metavar="DIR",
            help="Where the schema files live [default: ./schemas, else the installed copy]",
        ),
    ] = None,
) -> None:
    """Fail (exit 1) when schemas/*.json differ from the models.

    Settings: none. Exit codes: 0 up to date, 1 out of date.
    """
    from worker.contract.schemas import check_schemas, default_directory

    directory = directory or default_directory()
    drifted = check_schemas(directory)
    if drifted:
        raise _fail(1, f"out of date: {', '.join(drifted)}; run `pabx-worker schemas export`")
    typer.echo(f"schemas up to date ({directory})", err=True)


def main() -> None:
    """Console-script entry point."""
    app(prog_name=PROG_NAME)
