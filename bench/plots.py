"""PNG plots of a bench run, beside its JSON: ``latest.json`` → ``latest-throughput.png`` …

* ``-throughput``: commands/s of each consumer's drain at each PABX latency, the worker's
  ratios over the peers written above its bar;
* ``-latency``: p50/p90/p99 publish → PABX request of the paced runs (the latency a consumer
  adds at half of its own maximum rate);
* ``-cpu``: the consumer's CPU time per command in each drain;
* ``-scaling``: the worker's drain throughput against its number of processes, per store.

A plot whose data the run does not have (no paced runs, no ``--scale``, every run of it
failed) is not written. ``python -m bench.plots RESULTS.json [--out DIR]`` plots a JSON again.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.options import is_worker, label
from bench.results import BenchResults, RunResult, ScalePoint, load_json

__all__ = ["main", "write_plots"]

#: Small files for a repository: about 630 by 360 pixels.
DPI = 90
SIZE = (7.0, 4.0)
#: One colour per consumer kind in every plot (variants of the worker share the first).
COLOURS = {"worker": "#1f77b4", "pika": "#d62728", "faststream": "#2ca02c"}
#: In the scaling plot: a colour per store, a line style per PABX latency.
STORE_COLOURS = {"sqlite": "#9467bd", "redis": "#d62728", "postgres": "#1f77b4"}
LINE_STYLES = ("-", "--", ":", "-.")
PERCENTILES = (("p50", 0.45), ("p90", 0.7), ("p99", 1.0))
#: The issue's target for the latency the worker adds at half load.
P99_TARGET_MS = 10.0

Plot = Callable[[BenchResults, Axes], bool]


def _colour(kind: str) -> str:
    return COLOURS["worker" if is_worker(kind) else kind]


def _kinds(runs: Sequence[RunResult]) -> list[str]:
    """The consumer kinds of ``runs``, the worker (and its variants) first."""
    kinds = dict.fromkeys(r.kind for r in runs)
    return sorted(kinds, key=lambda k: (not is_worker(k), k))


def _grouped_bars(
    ax: Axes, groups: list[float], kinds: list[str], value: Callable[[str, float], float | None]
) -> dict[tuple[str, float], tuple[float, float]]:
    """Bars of ``value(kind, latency)`` grouped by latency; the top centre of each bar."""
    width = 0.8 / len(kinds)
    tops: dict[tuple[str, float], tuple[float, float]] = {}
    for i, kind in enumerate(kinds):
        xs, heights = [], []
        for g, latency in enumerate(groups):
            v = value(kind, latency)
            if v is not None:
                xs.append(g - 0.4 + width * (i + 0.5))
                heights.append(v)
                tops[kind, latency] = (xs[-1], v)
        ax.bar(xs, heights, width * 0.9, label=label(kind), color=_colour(kind))
    ax.set_xticks(range(len(groups)), [f"PABX {g:g} ms" for g in groups])
    ax.legend(fontsize="small")
    return tops


def _throughput(results: BenchResults, ax: Axes) -> bool:
    runs = [r for r in results.drains if r.measured]
    if not runs:
        return False
    latencies = sorted({r.latency_ms_pabx for r in runs})
    rate = {(r.kind, r.latency_ms_pabx): r.throughput for r in runs}
    tops = _grouped_bars(ax, latencies, _kinds(runs), lambda k, lat: rate.get((k, lat)))
    for (_, _), (x, top) in tops.items():
        ax.annotate(f"{top:,.0f}", (x, top), ha="center", va="bottom", fontsize="x-small")
    for ratio in results.ratios:
        where = tops.get((ratio.kind, ratio.latency_ms_pabx))
        parts = [
            f"{value:g}x {peer}"
            for value, peer in ((ratio.vs_pika, "pika"), (ratio.vs_faststream, "FastStream"))
            if value is not None
        ]
        if where and parts:
            ax.annotate(
                "\n".join(parts),
                where,
                xytext=(0, 10),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize="x-small",
                fontweight="bold",
            )
    ax.margins(y=0.25)
    ax.set_ylabel("commands/s (drain)")
    ax.set_title("Throughput: the worker over its peers")
    return True


def _latency(results: BenchResults, ax: Axes) -> bool:
    runs = [r for r in results.paced if r.complete and r.latency_ms.get("publish_to_pabx")]
    runs = [r for r in runs if r.latency_ms["publish_to_pabx"].n]
    if not runs:
        return False
    runs.sort(key=lambda r: (r.latency_ms_pabx, not is_worker(r.kind), r.kind))
    width = 0.8 / len(PERCENTILES)
    for i, (name, alpha) in enumerate(PERCENTILES):
        xs = [g - 0.4 + width * (i + 0.5) for g in range(len(runs))]
        values = [getattr(r.latency_ms["publish_to_pabx"], name) or 0.0 for r in runs]
        colours = [_colour(r.kind) for r in runs]
        ax.bar(xs, values, width * 0.9, color=colours, alpha=alpha, label=name)
        if name == "p99":
            for x, v in zip(xs, values, strict=True):
                ax.annotate(f"{v:.1f}", (x, v), ha="center", va="bottom", fontsize="x-small")
    ticks = [f"{label(r.kind)}\nPABX {r.latency_ms_pabx:g} ms" for r in runs]
    if max(r.latency_ms["publish_to_pabx"].p99 or 0.0 for r in runs) > 3 * P99_TARGET_MS:
        ax.set_yscale("symlog", linthresh=1.0)  # one slow consumer would flatten the others
    ax.set_xticks(range(len(runs)), ticks, fontsize="x-small")
    ax.axhline(P99_TARGET_MS, color="grey", linestyle="--", linewidth=1)
    ax.annotate(
        f"target p99 ≤ {P99_TARGET_MS:g} ms",
        (0.005, P99_TARGET_MS),
        xycoords=("axes fraction", "data"),
        ha="left",
        va="bottom",
        fontsize="x-small",
        color="grey",
    )
    ax.legend(fontsize="small", title="bars: p50 / p90 / p99", title_fontsize="x-small")
    ax.set_ylabel("publish → PABX request, ms")
    ax.set_title("Latency added at half of each consumer's maximum rate")
    return True


def _cpu(results: BenchResults, ax: Axes) -> bool:
    runs = [r for r in results.drains if r.consumer_cpu_ms_per_command is not None]
    if not runs:
        return False
    latencies = sorted({r.latency_ms_pabx for r in runs})
    cpu = {(r.kind, r.latency_ms_pabx): r.consumer_cpu_ms_per_command for r in runs}
    tops = _grouped_bars(ax, latencies, _kinds(runs), lambda k, lat: cpu.get((k, lat)))
    for x, top in tops.values():
        ax.annotate(f"{top:.2f}", (x, top), ha="center", va="bottom", fontsize="x-small")
    ax.margins(y=0.15)
    ax.set_ylabel("consumer CPU ms per command")
    ax.set_title("CPU per command (drains)")
    return True


def _scaling(results: BenchResults, ax: Axes) -> bool:
    lines = []
    for row in results.scale:
        points = row.points or [ScalePoint.of(run) for run in row.runs()]
        measured = [(p.processes, p.throughput) for p in points if p.throughput is not None]
        if measured:
            lines.append((row, measured))
    if not lines:
        return False
    latencies = sorted({row.latency_ms_pabx for row, _ in lines})
    highest: dict[int, float] = {}
    for _, measured in lines:
        for x, y in measured:
            highest[x] = max(highest.get(x, 0.0), y)
    for row, measured in lines:
        xs, ys = [x for x, _ in measured], [y for _, y in measured]
        ax.plot(
            xs,
            ys,
            marker="o",
            color=STORE_COLOURS.get(row.store),
            linestyle=LINE_STYLES[latencies.index(row.latency_ms_pabx) % len(LINE_STYLES)],
            label=f"{row.store}, PABX {row.latency_ms_pabx:g} ms",
        )
        for x, y in measured:  # the top point's label above it, the others' below
            offset = (5, 5) if y == highest[x] else (5, -12)
            ax.annotate(
                f"{y:,.0f}", (x, y), xytext=offset, textcoords="offset points", fontsize="x-small"
            )
    ax.set_xticks(sorted(highest))
    ax.set_xlim(min(highest) - 0.5, max(highest) + 0.5)
    ax.set_ylim(0, max(highest.values()) * 1.2)
    ax.set_xlabel("worker processes")
    ax.set_ylabel("commands/s (drain)")
    ax.set_title("Scaling out: worker processes sharing one store")
    ax.legend(fontsize="small", loc="lower right")
    return True


PLOTS: dict[str, Plot] = {
    "throughput": _throughput,
    "latency": _latency,
    "cpu": _cpu,
    "scaling": _scaling,
}


def write_plots(results: BenchResults, json_path: Path, out_dir: Path | None = None) -> list[Path]:
    """Write each plot the results have data for; the files written."""
    out_dir = json_path.parent if out_dir is None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in PLOTS.items():
        fig = Figure(figsize=SIZE, dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.grid(axis="y", alpha=0.3)
        if draw(results, ax):
            ax.set_title(ax.get_title(), loc="left")
            ax.set_title("", loc="center")
            ax.set_title(_caption(results), loc="right", fontsize="xx-small", alpha=0.6)
            path = out_dir / f"{json_path.stem}-{name}.png"
            fig.savefig(path, dpi=DPI, metadata={"Software": None})
            written.append(path)
    return written


def _caption(results: BenchResults) -> str:
    meta = results.meta
    return f"run {meta.run_id}, {meta.cpus} CPUs, Python {meta.python}"


def main(argv: list[str] | None = None) -> int:
    about = (__doc__ or "").split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m bench.plots", description=about)
    p.add_argument("results", type=Path, help="a JSON written by python -m bench")
    p.add_argument("--out", type=Path, default=None, help="directory (the JSON's)")
    args = p.parse_args(argv)
    try:
        results = load_json(json.loads(args.results.read_text()))
    except (OSError, ValueError) as exc:
        print(f"bench.plots: cannot read {args.results}: {exc}", file=sys.stderr)
        return 1
    for path in write_plots(results, args.results, args.out):
        print(f"plot written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
