"""The bench's results as typed records, and their JSON form.

The JSON written to ``bench/results`` keeps the shape it always had: a field whose metadata is
:data:`OMIT_NONE` is left out of the JSON while it is None (the key was absent), one whose
metadata is ``omit_unless(NAME)`` while the field ``NAME`` is None; every other field is
written, None as ``null``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter

__all__ = [
    "BatchMethod",
    "BatchResult",
    "BenchResults",
    "Failed",
    "IdleResult",
    "Meta",
    "Ratio",
    "RunResult",
    "ScalePoint",
    "ScaleResult",
    "SlowRequest",
    "SoakResult",
    "Summary",
    "Target",
    "as_json",
    "load_json",
]

_OMIT = "omit_when_none"


#: Metadata of a field left out of the JSON while it is None.
OMIT_NONE: dict[str, Any] = {_OMIT: True}


def omit_unless(name: str) -> dict[str, Any]:
    """Metadata of a field left out of the JSON while the field ``name`` is None."""
    return {_OMIT: name}


def as_json(value: Any) -> Any:
    """``value`` as JSON types: records as objects (without their absent fields), recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            omit = f.metadata.get(_OMIT)
            if omit is True and item is None:
                continue
            if isinstance(omit, str) and getattr(value, omit) is None:
                continue
            out[f.name] = as_json(item)
        return out
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_json(v) for v in value]
    return value


@dataclass
class Failed:
    """A part of the bench that raised: only its error."""

    error: str


@dataclass
class Summary:
    """Latencies in milliseconds: how many, p50/p90/p99 and the largest (None when none)."""

    n: int
    p50: float | None
    p90: float | None
    p99: float | None
    max: float | None


@dataclass
class SlowRequest:
    """One of the slowest publish → PABX latencies, and when that command was published."""

    published_at_s: float
    ms: float
    #: The same command's publish → delivery latency at the broker probe (``--probe``).
    probe_ms: float | None = field(default=None, metadata=OMIT_NONE)


@dataclass(kw_only=True)
class RunResult:
    """One drain or paced run of one consumer kind (or what is left of a run that raised)."""

    scenario: str
    kind: str
    name: str
    latency_ms_pabx: float
    store: str | None
    processes: int | None = field(default=None, metadata=OMIT_NONE)
    concurrency: int | None = field(default=None, metadata=OMIT_NONE)
    commands: int
    target_rate: float | None = field(default=None, metadata=OMIT_NONE)
    prefix: str | None = field(default=None, metadata=OMIT_NONE)
    fill_s: float | None = field(default=None, metadata=OMIT_NONE)
    published_rate: float | None = field(default=None, metadata=OMIT_NONE)
    error: str | None = None
    outcomes: int = 0
    statuses: dict[str, int] | None = field(default=None, metadata=OMIT_NONE)
    latency_ms: dict[str, Summary] = field(default_factory=dict)
    first_outcome: float | None = field(default=None, metadata=OMIT_NONE)
    last_outcome: float | None = field(default=None, metadata=OMIT_NONE)
    duration_s: float | None = field(default=None, metadata=omit_unless("first_outcome"))
    throughput: float | None = field(default=None, metadata=omit_unless("first_outcome"))
    slowest_publish_to_pabx: list[SlowRequest] | None = field(default=None, metadata=OMIT_NONE)
    pabx_requests: int | None = field(default=None, metadata=OMIT_NONE)
    pabx_repeated: int | None = field(default=None, metadata=OMIT_NONE)
    complete: bool = False
    peak_rss_mb: dict[str, float | None] | None = field(default=None, metadata=OMIT_NONE)
    #: CPU seconds per second of the measured window, per sampled process.
    cpu_cores_used: dict[str, float | None] | None = field(default=None, metadata=OMIT_NONE)
    consumer_cpu_ms_per_command: float | None = field(default=None, metadata=OMIT_NONE)
    main_thread_cpu_ms_per_command: float | None = field(default=None, metadata=OMIT_NONE)
    #: The throughput of every repeat, when this is the best of them.
    throughput_runs: list[float | None] | None = field(default=None, metadata=OMIT_NONE)

    @property
    def measured(self) -> bool:
        """Complete, with a throughput (a run that counts in ratios)."""
        return bool(self.throughput) and self.complete


@dataclass
class ScalePoint:
    """The worker's drain with ``processes`` processes: commands/s and CPU ms per command."""

    processes: int
    #: None when the run did not complete.
    throughput: float | None
    #: All the processes' CPU time per command.
    cpu_ms_per_command: float | None

    @classmethod
    def of(cls, run: RunResult) -> ScalePoint:
        return cls(
            processes=run.processes or 1,
            throughput=run.throughput if run.measured else None,
            cpu_ms_per_command=run.consumer_cpu_ms_per_command,
        )


@dataclass
class ScaleResult:
    """The worker drained by 1, 2, … processes in turn, on a shared store.

    ``one`` and ``two`` are the runs with 1 and 2 processes (None: not asked for),
    ``more`` those with other counts; ``points`` sums up every run, fewest processes first.
    """

    store: str
    latency_ms_pabx: float
    one: RunResult | None
    two: RunResult | None
    scaling_factor: float | None
    more: list[RunResult] = field(default_factory=list)
    points: list[ScalePoint] = field(default_factory=list)

    def runs(self) -> list[RunResult]:
        """Every run, fewest processes first."""
        found = [r for r in (self.one, self.two, *self.more) if r is not None]
        return sorted(found, key=lambda r: r.processes or 1)


@dataclass(kw_only=True)
class IdleResult:
    """RSS of each consumer kind consuming an empty queue."""

    scenario: str = "idle"
    store: str
    rss_mb: dict[str, float] = field(default_factory=dict)
    error: str | None = field(default=None, metadata=OMIT_NONE)


@dataclass
class BatchMethod:
    """One way of publishing a batch: seconds and commands/s, or the error."""

    seconds: float | None = field(default=None, metadata=OMIT_NONE)
    rate: float | None = field(default=None, metadata=OMIT_NONE)
    error: str | None = field(default=None, metadata=OMIT_NONE)


@dataclass(kw_only=True)
class BatchResult:
    """Publishing with pipelined confirms, per ``Producer`` method; the best rate."""

    scenario: str = "batch"
    commands: int
    methods: dict[str, BatchMethod] = field(default_factory=dict)
    rate: float | None = field(default=None, metadata=OMIT_NONE)
    error: str | None = field(default=None, metadata=OMIT_NONE)


@dataclass(kw_only=True)
class SoakResult:
    """The worker's RSS after each chunk of a long drain."""

    scenario: str = "soak"
    commands: int
    store: str
    #: (commands done, RSS in MB) after each chunk, the first before any command.
    rss_mb: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = field(default=None, metadata=OMIT_NONE)
    seconds: float | None = field(default=None, metadata=OMIT_NONE)
    growth_after_first_chunk_mb: float | None = field(default=None, metadata=OMIT_NONE)
    peak_mb: float | None = field(default=None, metadata=OMIT_NONE)
    outcomes: int = 0


@dataclass
class Ratio:
    """A worker kind's drain throughput over each peer's, at one PABX latency."""

    latency_ms_pabx: float
    kind: str
    rate: float | None
    pika: float | None
    vs_pika: float | None
    faststream: float | None
    vs_faststream: float | None


@dataclass
class Target:
    """One of the issue's targets against what the run measured (``ok`` None: not measured)."""

    target: str
    wanted: str
    measured: Any
    ok: bool | None


@dataclass
class Meta:
    """When and where the bench ran, and with which options."""

    run_id: str
    started_at: float
    cpus: int | None
    python: str
    options: dict[str, Any]
    seconds: float | None = field(default=None, metadata=OMIT_NONE)


@dataclass
class BenchResults:
    """Everything one ``python -m bench`` measured."""

    meta: Meta
    drains: list[RunResult] = field(default_factory=list)
    paced: list[RunResult] = field(default_factory=list)
    scale: list[ScaleResult] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    idle: IdleResult | Failed | None = field(default=None, metadata=OMIT_NONE)
    soak: SoakResult | Failed | None = field(default=None, metadata=OMIT_NONE)
    batch: BatchResult | Failed | None = field(default=None, metadata=OMIT_NONE)
    ratios: list[Ratio] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def runs(self) -> list[RunResult]:
        """Every drain, paced and scaling run."""
        scaled = [run for row in self.scale for run in row.runs()]
        return [*self.drains, *self.paced, *scaled]


def load_json(doc: Any) -> BenchResults:
    """The records back from the JSON :func:`as_json` made of them (absent fields: defaults)."""
    return TypeAdapter(BenchResults).validate_python(doc)
