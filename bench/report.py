"""Printing the bench results (rich tables) and writing them as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _pair(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("n", 0) == 0:
        return "—"
    return f"{_fmt(summary.get('p50'))} / {_fmt(summary.get('p99'))}"


def _peer_rate(doc: dict[str, Any], kind: str, latency: float) -> float | None:
    for run in doc["drains"]:
        if run["kind"] == kind and run["latency_ms_pabx"] == latency and run.get("complete"):
            rate = run.get("throughput")
            return float(rate) if rate else None
    return None


def _ratio(rate: float | None, peer: float | None) -> str:
    return f"{rate / peer:.2f}x" if rate and peer else "—"


def _rss(run: dict[str, Any]) -> str:
    peaks = [v for v in (run.get("peak_rss_mb") or {}).values() if v is not None]
    return " + ".join(_fmt(v) for v in peaks) if peaks else "—"


def _row(doc: dict[str, Any], run: dict[str, Any], label: str | None = None) -> list[str]:
    latency = run["latency_ms_pabx"]
    rate = run.get("throughput")
    kind = run["kind"]
    vs_pika = _ratio(rate, _peer_rate(doc, "pika", latency)) if kind != "pika" else "1.00x"
    vs_fs = (
        _ratio(rate, _peer_rate(doc, "faststream", latency)) if kind != "faststream" else "1.00x"
    )
    if run["scenario"] == "paced":  # a paced run is not a throughput measurement
        vs_pika = vs_fs = ""
    lat = run.get("latency_ms") or {}
    name = label or run["name"]
    if run.get("store"):
        name += f" ({run['store']})"
    if not run.get("complete"):
        name += f" (INCOMPLETE {run.get('outcomes')}/{run['commands']})"
    return [
        escape(name),
        _fmt(latency, 0),
        str(run["commands"]),
        _fmt(rate),
        vs_pika,
        vs_fs,
        _pair(lat.get("publish_to_pabx")),
        _pair(lat.get("publish_to_outcome")),
        _rss(run),
        _cpu(run),
    ]


def _cpu(run: dict[str, Any]) -> str:
    total = _fmt(run.get("consumer_cpu_ms_per_command"), 2)
    main = run.get("main_thread_cpu_ms_per_command")
    return f"{total} ({main:.2f})" if main is not None else total


def print_report(doc: dict[str, Any], console: Console | None = None) -> None:
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
    runs = sorted(doc["drains"], key=lambda r: r["latency_ms_pabx"])
    latencies = sorted(
        {r["latency_ms_pabx"] for r in runs} | {p["latency_ms_pabx"] for p in doc["paced"]}
    )
    for latency in latencies:
        for run in runs:
            if run["latency_ms_pabx"] == latency:
                table.add_row(*_row(doc, run))
        for paced in doc["paced"]:
            if paced["latency_ms_pabx"] == latency:
                label = f"{paced['name']} @ {_fmt(paced.get('target_rate'), 0)}/s"
                table.add_row(*_row(doc, paced, label))
        for scale in doc["scale"]:
            if scale["latency_ms_pabx"] == latency:
                table.add_row(*_row(doc, scale["one"]))
                table.add_row(*_row(doc, scale["two"]))
        table.add_section()
    console.print(table)
    console.print(
        "[dim]Drains: the queue is filled first, so publish→X latencies there are mostly"
        " time spent queued; the paced rows measure the latency the worker adds.[/dim]"
    )
    console.print(_extra_table(doc))
    console.print(_targets_table(doc))


def _extra_table(doc: dict[str, Any]) -> Table:
    extra = Table(title="other measurements")
    extra.add_column("what")
    extra.add_column("result", justify="right")
    idle = doc.get("idle")
    if idle:
        for kind, mb in idle.get("rss_mb", {}).items():
            extra.add_row(f"idle RSS, {kind}", f"{_fmt(mb)} MB")
        if idle.get("error"):
            extra.add_row("idle RSS error", idle["error"])
    batch = doc.get("batch")
    if batch:
        for method, row in batch.get("methods", {}).items():
            extra.add_row(
                f"{method}, {batch['commands']} commands, pipelined confirms",
                f"{_fmt(row.get('rate'))} commands/s"
                + (f" ({row['error']})" if "error" in row else ""),
            )
    for scale in doc["scale"]:
        extra.add_row(
            f"scaling 1 → 2 worker processes, {scale['store']},"
            f" PABX {scale['latency_ms_pabx']:g} ms",
            f"{_fmt(scale.get('scaling_factor'), 2)}x",
        )
    soak = doc.get("soak")
    if soak:
        points = ", ".join(f"{n // 1000}k:{mb}" for n, mb in soak.get("rss_mb", []))
        extra.add_row(f"soak RSS MB after n commands ({soak.get('commands')})", points or "—")
        if soak.get("error"):
            extra.add_row("soak error", soak["error"])
    return extra


def _targets_table(doc: dict[str, Any]) -> Table:
    verdicts = Table(title="issue 5 targets")
    verdicts.add_column("target")
    verdicts.add_column("wanted")
    verdicts.add_column("measured", justify="right")
    verdicts.add_column("", justify="center")
    for t in doc.get("targets", []):
        mark = {True: "[green]met[/green]", False: "[red]missed[/red]", None: "[dim]n/a[/dim]"}
        verdicts.add_row(t["target"], t["wanted"], _fmt(t["measured"], 2), mark[t["ok"]])
    return verdicts


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
