"""Printing the bench results (rich tables) and writing them as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.results import (
    BatchResult,
    BenchResults,
    IdleResult,
    RunResult,
    ScalePoint,
    ScaleResult,
    SoakResult,
    Summary,
    as_json,
)
from bench.verdicts import drain_rate

__all__ = ["print_report", "write_json"]


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _pair(summary: Summary | None) -> str:
    if summary is None or summary.n == 0:
        return "—"
    return f"{_fmt(summary.p50)} / {_fmt(summary.p99)}"


def _ratio(rate: float | None, peer: float | None) -> str:
    return f"{rate / peer:.2f}x" if rate and peer else "—"


def _rss(run: RunResult) -> str:
    peaks = [v for v in (run.peak_rss_mb or {}).values() if v is not None]
    return " + ".join(_fmt(v) for v in peaks) if peaks else "—"


def _row(results: BenchResults, run: RunResult, label: str | None = None) -> list[str]:
    latency = run.latency_ms_pabx
    rate = run.throughput
    kind = run.kind
    vs_pika = _ratio(rate, drain_rate(results, "pika", latency)) if kind != "pika" else "1.00x"
    vs_fs = (
        _ratio(rate, drain_rate(results, "faststream", latency))
        if kind != "faststream"
        else "1.00x"
    )
    if run.scenario == "paced":  # a paced run is not a throughput measurement
        vs_pika = vs_fs = ""
    name = label or run.name
    if run.store:
        name += f" ({run.store})"
    if not run.complete:
        name += f" (INCOMPLETE {run.outcomes}/{run.commands})"
    return [
        escape(name),
        _fmt(latency, 0),
        str(run.commands),
        _fmt(rate),
        vs_pika,
        vs_fs,
        _pair(run.latency_ms.get("publish_to_pabx")),
        _pair(run.latency_ms.get("publish_to_outcome")),
        _rss(run),
        _cpu(run),
    ]


def _cpu(run: RunResult) -> str:
    total = _fmt(run.consumer_cpu_ms_per_command, 2)
    main = run.main_thread_cpu_ms_per_command
    return f"{total} ({main:.2f})" if main is not None else total


def print_report(results: BenchResults, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: do not squeeze the table into 80 columns
            console = Console(width=190)
    table = Table(title="pabx-worker bench: one run, back to back (ratios are what counts)")
    for header, justify in (
        ("scenario", "left"),
        ("PABX ms", "right"),
        ("commands", "right"),
        ("commands/s", "right"),
        ("vs pika tutorial", "right"),
        ("vs FastStream", "right"),
        ("pub→PABX p50/p99 ms", "right"),
        ("pub→outcome p50/p99 ms", "right"),
        ("peak RSS MB", "right"),
        ("CPU ms/cmd (main thread)", "right"),
    ):
        table.add_column(header, justify=justify)  # type: ignore[arg-type]
    runs = sorted(results.drains, key=lambda r: r.latency_ms_pabx)
    latencies = sorted(
        {r.latency_ms_pabx for r in runs} | {p.latency_ms_pabx for p in results.paced}
    )
    for latency in latencies:
        for run in runs:
            if run.latency_ms_pabx == latency:
                table.add_row(*_row(results, run))
        for paced in results.paced:
            if paced.latency_ms_pabx == latency:
                label = f"{paced.name} @ {_fmt(paced.target_rate, 0)}/s"
                table.add_row(*_row(results, paced, label))
        for scale in results.scale:
            if scale.latency_ms_pabx == latency:
                for run in scale.runs():
                    table.add_row(*_row(results, run))
        table.add_section()
    console.print(table)
    console.print(
        "[dim]Drains: the queue is filled first, so publish→X latencies there are mostly"
        " time spent queued; the paced rows measure the latency the worker adds.[/dim]"
    )
    console.print(_extra_table(results))
    console.print(_targets_table(results))


def _extra_table(results: BenchResults) -> Table:
    extra = Table(title="other measurements")
    extra.add_column("what")
    extra.add_column("result", justify="right")
    idle = results.idle
    if isinstance(idle, IdleResult):
        for kind, mb in idle.rss_mb.items():
            extra.add_row(f"idle RSS, {kind}", f"{_fmt(mb)} MB")
    if idle is not None and idle.error:
        extra.add_row("idle RSS error", idle.error)
    batch = results.batch
    if isinstance(batch, BatchResult):
        for method, row in batch.methods.items():
            extra.add_row(
                f"{method}, {batch.commands} commands, pipelined confirms",
                f"{_fmt(row.rate)} commands/s"
                + (f" ({row.error})" if row.error is not None else ""),
            )
    for scale in results.scale:
        extra.add_row(*_scaling_row(scale))
    soak = results.soak
    if soak is not None:
        chunks = soak.rss_mb if isinstance(soak, SoakResult) else []
        total = soak.commands if isinstance(soak, SoakResult) else None
        points = ", ".join(f"{n // 1000}k:{mb}" for n, mb in chunks)
        extra.add_row(f"soak RSS MB after n commands ({total})", points or "—")
        if soak.error:
            extra.add_row("soak error", soak.error)
    return extra


def _scaling_row(scale: ScaleResult) -> tuple[str, str]:
    """Commands/s per process count, each over the one-process rate: ``900 (1.00x) / …``."""
    points = scale.points or [ScalePoint.of(run) for run in scale.runs()]
    base = next((p.throughput for p in points if p.processes == 1), None)
    counts = " / ".join(str(p.processes) for p in points)
    rates = " / ".join(
        _fmt(p.throughput, 0) + (f" ({_ratio(p.throughput, base)})" if base else "") for p in points
    )
    where = f"{scale.store}, PABX {scale.latency_ms_pabx:g} ms"
    return f"scaling, commands/s with {counts} worker processes, {where}", rates or "—"


def _targets_table(results: BenchResults) -> Table:
    verdicts = Table(title="targets (issue 15)")
    verdicts.add_column("target")
    verdicts.add_column("wanted")
    verdicts.add_column("measured", justify="right")
    verdicts.add_column("", justify="center")
    mark = {True: "[green]met[/green]", False: "[red]missed[/red]", None: "[dim]n/a[/dim]"}
    for t in results.targets:
        verdicts.add_row(t.target, t.wanted, _fmt(t.measured, 2), mark[t.ok])
    return verdicts


def write_json(results: BenchResults, path: Path) -> None:
    """The results as JSON (the shape ``bench/README.md`` describes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(as_json(results), indent=2, ensure_ascii=False) + "\n")
