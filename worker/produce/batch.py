"""Batch files (SPEC §7): many commands from CSV or JSON Lines, published with confirms.

Every row is validated before anything is published. A row without ``command_id``
gets one derived from its normalised content (:func:`derive_command_id`), so running
the same file again, or an edited copy, sends no unchanged row twice: the worker sees
the same command id and answers with the stored outcome. Rows that come out as the
same command are merged into one.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from pydantic import ValidationError

from worker.contract.errors import BatchFileError, InvalidCommand
from worker.contract.messages import fingerprint, parse_json
from worker.contract.models import MAX_COMMAND_BYTES, RedirectBody, RedirectCommand
from worker.produce.producer import Outgoing, Producer

__all__ = [
    "CSV_OPTIONAL_COLUMNS",
    "RESULT_COLUMNS",
    "Batch",
    "BatchCommand",
    "BatchFileError",
    "BatchRun",
    "CommandResult",
    "PlainProgress",
    "Progress",
    "RowError",
    "derive_command_id",
    "load_batch",
    "make_progress",
    "parse_batch",
    "run_batch",
    "write_results",
]

#: Columns a CSV file may carry besides the vendor field names.
CSV_OPTIONAL_COLUMNS = ("command_id", "expires_at", "channel_id", "pabx")
#: The vendor fields, in the vendor's order.
VENDOR_FIELDS = tuple(RedirectBody.model_fields)
#: Vendor fields every row must have.
REQUIRED_VENDOR_FIELDS = tuple(n for n, f in RedirectBody.model_fields.items() if f.is_required())
#: Free text: the only cell whose surrounding spaces are kept.
_VERBATIM_FIELDS = frozenset({"DADOS"})
#: Columns of ``--results``.
RESULT_COLUMNS = ("command_id", "status", "error_code", "attempts")
#: Prefix of derived command ids.
DERIVED_PREFIX = "batch-"
_DIGITS = re.compile(r"[0-9]+")
_BOM = "\ufeff"


@dataclass(frozen=True)
class RowError:
    """One problem with one row: its line in the file and the field at fault."""

    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"line {self.line}: {where}{self.message}"


@dataclass
class BatchCommand:
    """One command to publish, from the first row that asked for it."""

    command_id: str
    body: bytes
    line: int
    fingerprint: str
    #: Later rows that turned out to be the same command.
    merged_lines: list[int] = field(default_factory=list)


@dataclass
class Batch:
    """A validated batch file."""

    format: str
    rows: int
    commands: list[BatchCommand]
    errors: list[RowError]

    @property
    def invalid_rows(self) -> int:
        return len({e.line for e in self.errors})

    @property
    def merged_rows(self) -> int:
        return sum(len(c.merged_lines) for c in self.commands)


def derive_command_id(command: RedirectCommand) -> str:
    """The command id of a row that has none: from the fingerprint fields only.

    Timestamps and the device password are not part of it, as for the worker's
    duplicate detection (SPEC §5).
    """
    return DERIVED_PREFIX + fingerprint(command)[:32]


# -- reading ---------------------------------------------------------------------------


@dataclass
class _Row:
    line: int
    data: dict[str, Any] | None
    errors: list[RowError] = field(default_factory=list)


def load_batch(path: Path) -> Batch:
    """Read and validate a batch file; a problem with the file as a whole raises."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise BatchFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_batch(raw, _format_of(path, raw))


def _format_of(path: Path, raw: bytes) -> str:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix in {".jsonl", ".ndjson", ".json"}:
        return "jsonl"
    start = raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    return "jsonl" if start == b"{" else "csv"


def parse_batch(raw: bytes, fmt: str) -> Batch:
    """Validate the rows of a file already read; ``fmt`` is ``csv`` or ``jsonl``."""
    if fmt == "csv":
        rows = list(_csv_rows(_decode(raw)))
    elif fmt == "jsonl":
        rows = list(_jsonl_rows(raw))
    else:
        raise BatchFileError(f"unknown batch format {fmt!r}: use csv or jsonl")
    return _collect(fmt, rows)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BatchFileError(f"the file is not UTF-8 (byte {exc.start})") from None


def _jsonl_rows(raw: bytes) -> Iterator[_Row]:
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    for number, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        if len(line) > MAX_COMMAND_BYTES:
            yield _Row(
                number, None, [RowError(number, "", f"longer than {MAX_COMMAND_BYTES} bytes")]
            )
            continue
        try:
            data = parse_json(line)
        except InvalidCommand as exc:
            yield _Row(number, None, [RowError(number, "", str(exc).removeprefix("body is "))])
            continue
        if not isinstance(data, dict):
            kind = type(data).__name__
            yield _Row(number, None, [RowError(number, "", f"a JSON {kind}, not a command object")])
            continue
        yield _Row(number, data)


def _csv_rows(text: str) -> Iterator[_Row]:
    delimiter = _delimiter(text)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise BatchFileError(f"line 1: {exc}") from None
    if header is None:
        return
    columns = _check_header(header)
    last = reader.line_num
    while True:
        start = last + 1
        try:
            cells = next(reader, None)
        except csv.Error as exc:
            yield _Row(start, None, [RowError(start, "", f"not valid CSV: {exc}")])
            return
        if cells is None:
            return
        last = reader.line_num
        if not any(cell.strip() for cell in cells):
            continue
        if len(cells) != len(columns):
            message = f"{len(cells)} cells, but the header has {len(columns)} columns"
            yield _Row(start, None, [RowError(start, "", message)])
            continue
        yield _Row(start, _csv_command(columns, cells))


def _delimiter(text: str) -> str:
    """``,``, or ``;`` when the header uses it (spreadsheets in pt-BR locales do)."""
    header = text.split("\n", 1)[0]
    return ";" if ";" in header and "," not in header else ","


def _check_header(header: list[str]) -> list[str]:
    columns = [name.strip().removeprefix(_BOM) for name in header]
    allowed = set(VENDOR_FIELDS) | set(CSV_OPTIONAL_COLUMNS)
    problems = []
    for name, count in Counter(columns).items():
        if name not in allowed:
            problems.append(f"{name or '(empty)'}: unknown column")
        elif count > 1:
            problems.append(f"{name}: column appears {count} times")
    problems += [
        f"{name}: required column missing" for name in REQUIRED_VENDOR_FIELDS if name not in columns
    ]
    if problems:
        expected = ", ".join((*VENDOR_FIELDS, *CSV_OPTIONAL_COLUMNS))
        raise BatchFileError(
            "line 1 (header): " + "; ".join(problems) + f". Columns may be: {expected}"
        )
    return columns


def _csv_command(columns: Sequence[str], cells: Sequence[str]) -> dict[str, Any]:
    """A command object from one CSV record; empty cells leave optional fields out."""
    data: dict[str, Any] = {}
    redirect: dict[str, Any] = {}
    for name, cell in zip(columns, cells, strict=True):
        value = cell if name in _VERBATIM_FIELDS else cell.strip()
        if name in VENDOR_FIELDS:
            if value or name in REQUIRED_VENDOR_FIELDS:
                redirect[name] = value
        elif value:
            data[name] = int(value) if name == "channel_id" and _DIGITS.fullmatch(value) else value
    command: dict[str, Any] = {}
    if "command_id" in data:
        command["command_id"] = data.pop("command_id")
    command.update(type="redirect", version=1, **data, redirect=redirect)
    return command


# -- validating ------------------------------------------------------------------------


def _field_name(loc: Iterable[int | str], fmt: str) -> str:
    parts = [str(p) for p in loc if "[" not in str(p)]
    if fmt == "csv" and parts[:1] == ["redirect"] and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts)


def _validate(row: _Row, data: dict[str, Any], fmt: str) -> RedirectCommand | None:
    try:
        return RedirectCommand.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False, include_input=False):
            name = _field_name(error["loc"], fmt)
            row.errors.append(RowError(row.line, name, error["msg"]))
        return None


def _collect(fmt: str, rows: list[_Row]) -> Batch:
    by_id: dict[str, BatchCommand] = {}
    errors: list[RowError] = []
    for row in rows:
        if row.data is not None and (command := _validate(row, row.data, fmt)) is not None:
            _add(by_id, row, row.data, command)
        errors.extend(row.errors)
    return Batch(fmt, len(rows), list(by_id.values()), errors)


def _add(
    by_id: dict[str, BatchCommand], row: _Row, fields: dict[str, Any], command: RedirectCommand
) -> None:
    command_id = command.command_id or derive_command_id(command)
    body_fp = fingerprint(command)
    earlier = by_id.get(command_id)
    if earlier is not None:
        if earlier.fingerprint == body_fp:
            earlier.merged_lines.append(row.line)
        else:
            message = (
                f"{command_id!r} is also the id of line {earlier.line}, with another redirect;"
                " the worker would reject the second as an idempotency conflict"
            )
            row.errors.append(RowError(row.line, "command_id", message))
        return
    data = fields if "command_id" in fields else {"command_id": command_id, **fields}
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    if len(body) > MAX_COMMAND_BYTES:
        row.errors.append(RowError(row.line, "", f"longer than {MAX_COMMAND_BYTES} bytes"))
        return
    by_id[command_id] = BatchCommand(command_id, body, row.line, body_fp)


# -- progress --------------------------------------------------------------------------


class Progress(Protocol):
    """Where a batch run reports how far it got."""

    def start(self, description: str, total: int) -> None: ...

    def update(self, completed: int) -> None: ...

    def stop(self) -> None: ...


class PlainProgress:
    """Plain lines (for logs and pipes): one at each tenth of the way, and at the end."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._description = ""
        self._total = 0
        self._shown = -1
        self._done = False

    def start(self, description: str, total: int) -> None:
        self._description, self._total = description, total
        self._shown, self._done = -1, False
        self.update(0)

    def update(self, completed: int) -> None:
        if completed >= self._total:
            if not self._done:
                self._done = True
                self._print(completed)
            return
        mark = completed * 10 // self._total
        if mark > self._shown:
            self._shown = mark
            self._print(completed)

    def _print(self, completed: int) -> None:
        print(f"{self._description}: {completed}/{self._total}", file=self._stream, flush=True)

    def stop(self) -> None:
        """Nothing to tidy up."""


class _RichProgress:
    """A progress bar on a terminal."""

    def __init__(self, stream: IO[str]) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as Bar

        self._bar = Bar(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(file=stream),
            transient=False,
        )
        self._task: Any = None

    def start(self, description: str, total: int) -> None:
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def update(self, completed: int) -> None:
        self._bar.update(self._task, completed=completed)

    def stop(self) -> None:
        self._bar.stop()


def make_progress(stream: IO[str] | None = None) -> Progress:
    """A progress bar when ``stream`` (stderr by default) is a terminal, else plain lines."""
    stream = stream or sys.stderr
    if stream.isatty():
        return _RichProgress(stream)
    return PlainProgress(stream)


# -- publishing ------------------------------------------------------------------------


@dataclass
class CommandResult:
    """One row of ``--results``."""

    command_id: str
    status: str
    error_code: str = ""
    attempts: int | None = None

    def row(self) -> list[str]:
        attempts = "" if self.attempts is None else str(self.attempts)
        return [self.command_id, self.status, self.error_code, attempts]


#: Status of a command the broker confirmed, when outcomes were not awaited.
PUBLISHED = "published"
#: Status of a command the broker did not confirm (refused, unroutable, connection lost).
NOT_PUBLISHED = "not_published"
#: Status of a published command whose outcome did not arrive within ``--wait``.
NO_OUTCOME = "no_outcome"


@dataclass
class BatchRun:
    """What a batch run did to each command."""

    results: list[CommandResult]
    waited: bool
    error: str | None = None

    def counts(self) -> Counter[str]:
        return Counter(r.status for r in self.results)

    @property
    def published(self) -> int:
        return sum(1 for r in self.results if r.status != NOT_PUBLISHED)

    @property
    def exit_code(self) -> int:
        """0 when all were published (and, if awaited, accepted), else 1."""
        wanted = "accepted" if self.waited else PUBLISHED
        return 0 if all(r.status == wanted for r in self.results) else 1


def run_batch(
    producer: Producer,
    commands: Sequence[BatchCommand],
    *,
    wait: float = 0.0,
    progress: Progress | None = None,
) -> BatchRun:
    """Publish the commands with pipelined confirms; with ``wait`` > 0 collect outcomes."""
    shown: Progress = progress or PlainProgress(sys.stderr)
    results = {c.command_id: CommandResult(c.command_id, NOT_PUBLISHED) for c in commands}
    confirmed = 0

    def settled(message: Outgoing, ok: bool, reason: str | None) -> None:
        nonlocal confirmed
        if ok:
            confirmed += 1
            results[message.context].status = PUBLISHED
        shown.update(confirmed)

    shown.start("publishing", len(commands))
    try:
        report = producer.publish_messages(
            (Outgoing.command(c.body, c.command_id, context=c.command_id) for c in commands),
            reply=wait > 0,
            on_settled=settled,
        )
    finally:
        shown.stop()
    run = BatchRun(list(results.values()), waited=wait > 0, error=report.error)
    if report.failed:
        run.error = run.error or report.failed[0][1]
    if wait > 0 and confirmed:
        _collect_outcomes(producer, run, wait, shown)
    return run


def _collect_outcomes(producer: Producer, run: BatchRun, wait: float, shown: Progress) -> None:
    awaited = [r for r in run.results if r.status == PUBLISHED]
    shown.start("outcomes", len(awaited))
    try:
        outcomes = producer.wait_for((r.command_id for r in awaited), wait, shown.update)
    finally:
        shown.stop()
    for result in awaited:
        event = outcomes.get(result.command_id)
        if event is None:
            result.status = NO_OUTCOME
            continue
        data = event.get("data") or {}
        result.status = str(data.get("status", "unknown"))
        result.error_code = str((data.get("error") or {}).get("code", ""))
        attempts = data.get("attempts")
        result.attempts = attempts if isinstance(attempts, int) else None


def write_results(stream: IO[str], results: Iterable[CommandResult]) -> None:
    """``command_id,status,error_code,attempts``, one row per command."""
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(RESULT_COLUMNS)
    writer.writerows(r.row() for r in results)
