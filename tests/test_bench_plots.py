"""The bench's PNG plots: one per kind of data the run has, none for data it lacks."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from bench.__main__ import _plot, parser
from bench.plots import main, write_plots
from bench.report import write_json
from bench.results import (
    BenchResults,
    Meta,
    RunResult,
    ScalePoint,
    ScaleResult,
    Summary,
    as_json,
    load_json,
)
from bench.verdicts import ratios

PNG = b"\x89PNG\r\n\x1a\n"
ALL = ("throughput", "latency", "cpu", "scaling")


def run(kind: str, latency: float, rate: float | None, **extra: object) -> RunResult:
    found = RunResult(
        scenario="drain",
        kind=kind,
        name=kind,
        latency_ms_pabx=latency,
        store="sqlite" if kind == "worker" else None,
        processes=1,
        commands=400,
        outcomes=400 if rate else 12,
        complete=rate is not None,
        latency_ms={"publish_to_pabx": Summary(400, 1.5, 3.0, 7.5, 9.0)},
        consumer_cpu_ms_per_command=0.9 if rate else None,
    )
    if rate is not None:
        found.first_outcome, found.last_outcome = 1.0, 1.0 + 400 / rate
        found.duration_s, found.throughput = 400 / rate, rate
    for key, value in extra.items():
        setattr(found, key, value)
    return found


def scale_row(store: str, *rates: float) -> ScaleResult:
    runs = [run("worker", 20, rate, processes=i + 1) for i, rate in enumerate(rates)]
    row = ScaleResult(store, 20.0, runs[0], runs[1], round(rates[1] / rates[0], 2), runs[2:])
    row.points = [ScalePoint.of(r) for r in row.runs()]
    return row


def full() -> BenchResults:
    doc = BenchResults(meta=Meta("abc123", 1.0, 2, "3.11.2", {"commands": 400}))
    for latency, rates in ((0, (1800.0, 400.0, 700.0)), (20, (1100.0, 45.0, 500.0))):
        for kind, rate in zip(("worker", "pika", "faststream"), rates, strict=True):
            doc.drains.append(run(kind, latency, rate))
            doc.paced.append(run(kind, latency, rate / 2, scenario="paced"))
    doc.scale = [scale_row("sqlite", 1100.0, 1500.0, 1600.0), scale_row("redis", 1000.0, 1700.0)]
    doc.ratios = ratios(doc)
    return doc


def written(paths: list[Path]) -> set[str]:
    return {p.name for p in paths}


def test_each_plot_is_a_png_beside_the_json(tmp_path: Path) -> None:
    paths = write_plots(full(), tmp_path / "latest.json")
    assert written(paths) == {f"latest-{name}.png" for name in ALL}
    for path in paths:
        assert path.parent == tmp_path
        assert path.read_bytes().startswith(PNG)
        assert 5_000 < path.stat().st_size < 100_000


def test_plots_without_their_data_are_skipped(tmp_path: Path) -> None:
    doc = full()
    doc.paced, doc.scale = [], []
    assert written(write_plots(doc, tmp_path / "a.json")) == {"a-throughput.png", "a-cpu.png"}
    doc = full()
    doc.drains = [run(kind, 20, None) for kind in ("worker", "pika")]  # both incomplete
    doc.paced = [run("worker", 20, None, scenario="paced")]
    doc.scale = [scale_row("redis", 1000.0, 1700.0)]
    for point in doc.scale[0].points:
        point.throughput = None  # failed runs
    assert written(write_plots(doc, tmp_path / "b.json")) == set()


def test_a_json_is_plotted_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "run.json"
    write_json(full(), source)
    assert load_json(json.loads(source.read_text())) == full()
    assert main([str(source), "--out", str(tmp_path / "out")]) == 0
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert names == {f"run-{name}.png" for name in ALL}
    assert "out/run-scaling.png" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.json")]) == 1


def test_scale_results_keep_their_json_shape() -> None:
    row = as_json(scale_row("sqlite", 1100.0, 1500.0, 1600.0))
    assert {"store", "latency_ms_pabx", "one", "two", "scaling_factor"} <= set(row)
    assert row["scaling_factor"] == 1.36
    assert row["points"][2] == {"processes": 3, "throughput": 1600.0, "cpu_ms_per_command": 0.9}
    assert [r["processes"] for r in row["more"]] == [3]


def test_without_matplotlib_the_bench_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in [m for m in sys.modules if m.partition(".")[0] == "matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # None: the import raises
    monkeypatch.delitem(sys.modules, "bench.plots")
    _plot(full(), tmp_path / "latest.json")
    assert capsys.readouterr().out.startswith("plots skipped: matplotlib is not installed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("text", "cpus", "expected"),
    [("1,2,N", 2, (1, 2)), ("1,2,N", 4, (1, 2, 4)), ("n,3,1,3", 8, (1, 3, 8)), ("2", 1, (2,))],
)
def test_scale_processes(
    text: str, cpus: int, expected: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert parser().parse_args(["--scale-processes", text]).scale_processes == expected
    assert parser().parse_args([]).scale_processes == tuple(sorted({1, 2, cpus}))


@pytest.mark.parametrize(
    "argv",
    [
        ["--scale-processes", "0"],
        ["--scale-processes", "1,x"],
        ["--scale-processes", "1,,2"],
        ["--scale-processes", "-1"],
        ["--scale-processes", ""],
        ["--scale-stores", "memory"],
        ["--scale-stores", ""],
    ],
)
def test_bad_scale_options_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(argv)
    assert exit_.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_scale_stores_in_the_order_given() -> None:
    args = parser().parse_args(["--scale-stores", "postgres,sqlite,postgres"])
    assert args.scale_stores == ("postgres", "sqlite")
    assert parser().parse_args([]).scale_stores == ("sqlite", "redis", "postgres")
