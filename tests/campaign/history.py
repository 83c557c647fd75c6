"""The campaign history: one JSON object per line, written by the runner, read by the checker.

Every line has ``kind`` and ``t`` (epoch seconds). The first line is the ``config``; the others
are ``publish`` (a broker-confirmed publication), ``request`` (one request the PABX simulator
recorded), ``outcome`` (one outcome event read from ``pabx.results``) and ``fault`` (a nemesis
action). Field names here are the wire format: ``append`` writes ``dataclasses.asdict`` of an
event plus its ``kind``; ``load`` reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

__all__ = [
    "Config",
    "Event",
    "Fault",
    "History",
    "HistoryError",
    "Outcome",
    "Publish",
    "Request",
    "TargetConfig",
    "append",
    "load",
    "parse",
]


class HistoryError(ValueError):
    """The history cannot be read: bad JSON, a missing or mistyped field, no config line."""


@dataclass(frozen=True, slots=True)
class TargetConfig:
    rate_limit: float | None = None  # requests per second; None = unlimited


@dataclass(frozen=True, slots=True)
class Config:
    kind: ClassVar[str] = "config"
    t: float
    seed: int
    workers: int
    concurrency: int
    retry_ambiguous: bool
    command_ttl_s: float
    targets: dict[str, TargetConfig] = field(default_factory=dict)
    minutes: float | None = None  # optional: the campaign length asked for, for the replay line
    store: str = "redis"  # for the replay line too
    broker: str = "single"


@dataclass(frozen=True, slots=True)
class Publish:
    kind: ClassVar[str] = "publish"
    t: float
    key: str  # unique per published message
    command_id: str | None
    call: str | None  # "pabx:ID_CHAMADA"
    pabx: str | None
    order: float | None  # issued_at, epoch seconds
    deadline: float | None  # expires_at, or issued_at + ttl
    valid: bool
    copy: int = 0  # 0 = first publication of this command id, 1.. = re-sent copies
    destination: str | None = None


@dataclass(frozen=True, slots=True)
class Request:
    kind: ClassVar[str] = "request"
    t: float  # arrival at the simulator
    ended: float | None
    target: str
    command_id: str | None
    call: str | None  # "pabx:ID_CHAMADA", the same string as Publish.call
    status: int | None  # None = never answered (hang, reset, cut by the client)
    destination: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: ClassVar[str] = "outcome"
    t: float
    command_id: str | None
    key: str | None  # the publish key if known (correlation_id)
    event_id: str
    status: str  # accepted | rejected | failed | expired
    error_code: str | None
    error_message: str | None
    attempts: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Fault:
    kind: ClassVar[str] = "fault"
    t: float  # start
    end: float | None
    fault: str  # kill, sigterm, broker_cut, pabx_storm, rate_limit, ...
    detail: dict[str, Any] = field(default_factory=dict)


Event = Config | Publish | Request | Outcome | Fault


@dataclass(frozen=True, slots=True)
class History:
    config: Config
    publishes: list[Publish] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)


def append(dest: str | Path | IO[str], event: Event | Mapping[str, Any]) -> None:
    """Write one event as one JSON line (a single write, flushed)."""
    record = dict(event) if isinstance(event, Mapping) else {"kind": event.kind, **asdict(event)}
    line = json.dumps(record, separators=(",", ":"), sort_keys=False) + "\n"
    if isinstance(dest, str | Path):
        with open(dest, "a", encoding="utf-8") as fh:
            fh.write(line)
        return
    dest.write(line)
    dest.flush()


def load(path: str | Path) -> History:
    """Read a history file; raise HistoryError if it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise HistoryError(f"{path}: {exc}") from exc
    return parse(text.splitlines())


def parse(lines: Iterable[str]) -> History:
    """Build a History from JSON lines; blank lines and unknown kinds are skipped."""
    config: Config | None = None
    parsed: list[Publish | Request | Outcome | Fault] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = _event(json.loads(line))
        except (ValueError, TypeError, KeyError) as exc:
            raise HistoryError(f"line {number}: {exc}") from exc
        if isinstance(event, Config):
            config = config or event
        elif event is not None:
            parsed.append(event)
    if config is None:
        raise HistoryError("no config line")
    return History(
        config=config,
        publishes=[e for e in parsed if isinstance(e, Publish)],
        requests=[e for e in parsed if isinstance(e, Request)],
        outcomes=[e for e in parsed if isinstance(e, Outcome)],
        faults=[e for e in parsed if isinstance(e, Fault)],
    )


def _event(raw: Any) -> Event | None:
    fields = _Fields(raw)
    reader = _READERS.get(str(fields.raw.get("kind")))
    return reader(fields) if reader else None


class _Fields:
    """Typed access to one JSON object, naming the field on a mismatch."""

    def __init__(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            raise TypeError(f"expected a JSON object, got {raw!r}")
        self.raw: dict[str, Any] = raw

    def _get(self, name: str, types: tuple[type, ...], optional: bool) -> Any:
        value = self.raw.get(name)
        if value is None and optional:
            return None
        if isinstance(value, bool) and bool not in types:
            raise TypeError(f"{name}: expected {types[0].__name__}, got bool")
        if not isinstance(value, types):
            raise TypeError(f"{name}: expected {types[0].__name__}, got {value!r}")
        return value

    def num(self, name: str) -> float:
        return float(self._get(name, (float, int), False))

    def opt_num(self, name: str) -> float | None:
        value = self._get(name, (float, int), True)
        return None if value is None else float(value)

    def integer(self, name: str) -> int:
        return int(self._get(name, (int,), False))

    def opt_integer(self, name: str) -> int | None:
        value = self._get(name, (int,), True)
        return None if value is None else int(value)

    def text(self, name: str) -> str:
        return str(self._get(name, (str,), False))

    def opt_text(self, name: str) -> str | None:
        value = self._get(name, (str,), True)
        return None if value is None else str(value)

    def flag(self, name: str) -> bool:
        return bool(self._get(name, (bool,), False))

    def mapping(self, name: str) -> dict[str, Any]:
        value = self._get(name, (dict,), True)
        return {} if value is None else dict(value)


def _config(f: _Fields) -> Config:
    targets = {
        name: TargetConfig(rate_limit=_Fields(spec).opt_num("rate_limit"))
        for name, spec in f.mapping("targets").items()
    }
    return Config(
        t=f.num("t"),
        seed=f.integer("seed"),
        workers=f.integer("workers"),
        concurrency=f.integer("concurrency"),
        retry_ambiguous=f.flag("retry_ambiguous"),
        command_ttl_s=f.num("command_ttl_s"),
        targets=targets,
        minutes=f.opt_num("minutes"),
        store=f.opt_text("store") or "redis",
        broker=f.opt_text("broker") or "single",
    )


def _publish(f: _Fields) -> Publish:
    return Publish(
        t=f.num("t"),
        key=f.text("key"),
        command_id=f.opt_text("command_id"),
        call=f.opt_text("call"),
        pabx=f.opt_text("pabx"),
        order=f.opt_num("order"),
        deadline=f.opt_num("deadline"),
        valid=f.flag("valid"),
        copy=f.opt_integer("copy") or 0,
        destination=f.opt_text("destination"),
    )


def _request(f: _Fields) -> Request:
    return Request(
        t=f.num("t"),
        ended=f.opt_num("ended"),
        target=f.text("target"),
        command_id=f.opt_text("command_id"),
        call=f.opt_text("call"),
        status=f.opt_integer("status"),
        destination=f.opt_text("destination"),
    )


def _outcome(f: _Fields) -> Outcome:
    return Outcome(
        t=f.num("t"),
        command_id=f.opt_text("command_id"),
        key=f.opt_text("key"),
        event_id=f.text("event_id"),
        status=f.text("status"),
        error_code=f.opt_text("error_code"),
        error_message=f.opt_text("error_message"),
        attempts=f.integer("attempts"),
        duplicate=f.flag("duplicate"),
    )


def _fault(f: _Fields) -> Fault:
    return Fault(
        t=f.num("t"), end=f.opt_num("end"), fault=f.text("fault"), detail=f.mapping("detail")
    )


_READERS: dict[str, Callable[[_Fields], Event]] = {
    "config": _config,
    "publish": _publish,
    "request": _request,
    "outcome": _outcome,
    "fault": _fault,
}
