"""The bench's typed results: their JSON keeps its shape, and the report prints them."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from bench.report import print_report, write_json
from bench.results import (
    BatchMethod,
    BatchResult,
    BenchResults,
    Failed,
    IdleResult,
    Meta,
    RunResult,
    ScaleResult,
    SoakResult,
    Summary,
    as_json,
)
from bench.verdicts import ratios, targets


def drain(kind: str, rate: float | None, *, complete: bool = True) -> RunResult:
    run = RunResult(
        scenario="drain",
        kind=kind,
        name=kind,
        latency_ms_pabx=20.0,
        store="sqlite" if kind == "worker" else None,
        commands=10,
        processes=1,
        concurrency=32,
        prefix="b1",
        fill_s=0.1,
        outcomes=10 if complete else 3,
        statuses={"accepted": 10},
        latency_ms={"publish_to_outcome": Summary(10, 1.0, 2.0, 3.0, 4.0)},
        complete=complete,
    )
    if rate is not None:
        run.first_outcome, run.last_outcome = 1.0, 2.0
        run.duration_s, run.throughput = 1.0, rate
    return run


def results() -> BenchResults:
    doc = BenchResults(meta=Meta("abc", 1.0, 2, "3.11", {"commands": 10}))
    doc.drains = [drain("worker", 900.0), drain("pika", 50.0), drain("faststream", 300.0)]
    doc.scale = [ScaleResult("redis", 20.0, drain("worker", 900.0), drain("worker", None), None)]
    doc.idle = IdleResult(store="sqlite", rss_mb={"worker": 40.0})
    doc.batch = BatchResult(commands=5, methods={"Producer.publish": BatchMethod(error="boom")})
    doc.soak = Failed("soak: RuntimeError: down")
    doc.ratios = ratios(doc)
    doc.targets = targets(doc)
    return doc


def test_absent_values_are_left_out_as_before() -> None:
    run = as_json(drain("pika", None, complete=False))
    assert "throughput" not in run and "first_outcome" not in run and "duration_s" not in run
    assert run["error"] is None and run["store"] is None  # always written, null
    assert run["latency_ms"]["publish_to_outcome"] == {
        "n": 10,
        "p50": 1.0,
        "p90": 2.0,
        "p99": 3.0,
        "max": 4.0,
    }
    spanless = drain("worker", None)
    spanless.first_outcome = spanless.last_outcome = 1.0
    assert as_json(spanless)["throughput"] is None  # measured window of zero: null, not absent
    assert as_json(SoakResult(commands=3, store="redis", rss_mb=[(0, 1.5)])) == {
        "scenario": "soak",
        "commands": 3,
        "store": "redis",
        "rss_mb": [[0, 1.5]],
        "outcomes": 0,
    }


def test_the_document_has_the_keys_readers_use(tmp_path: Path) -> None:
    path = tmp_path / "latest.json"
    write_json(results(), path)
    doc = json.loads(path.read_text())
    assert list(doc) == [
        *("meta", "drains", "paced", "scale", "errors"),
        *("idle", "soak", "batch", "ratios", "targets"),
    ]
    assert doc["soak"] == {"error": "soak: RuntimeError: down"}
    assert doc["batch"]["methods"] == {"Producer.publish": {"error": "boom"}}
    assert doc["ratios"][0] == {
        "latency_ms_pabx": 20.0,
        "kind": "worker",
        "rate": 900.0,
        "pika": 50.0,
        "vs_pika": 18.0,
        "faststream": 300.0,
        "vs_faststream": 3.0,
    }
    by_target = {t["target"]: t for t in doc["targets"]}
    assert by_target["idle RSS"] == {
        "target": "idle RSS",
        "wanted": "≤ 60 MB",
        "measured": 40.0,
        "ok": True,
    }
    assert by_target["throughput vs pika tutorial @20 ms"]["ok"] is True


def test_the_report_prints_every_part() -> None:
    out = io.StringIO()
    print_report(results(), Console(file=out, width=220))
    text = out.getvalue()
    assert "18.00x" in text  # worker vs the pika tutorial
    assert "soak error" in text and "boom" in text


def _on(store: str, rate: float, cpu: float | None = None) -> RunResult:
    run = drain("worker", rate)
    run.store, run.consumer_cpu_ms_per_command = store, cpu
    return run


def test_targets_judge_cpu_per_command_and_postgres_against_sqlite() -> None:
    doc = BenchResults(meta=Meta("abc", 1.0, 2, "3.11", {"commands": 10}))
    doc.drains = [_on("sqlite", 1000.0, cpu=0.9), drain("pika", 50.0), drain("faststream", 400.0)]
    doc.scale = [
        ScaleResult("sqlite", 20.0, _on("sqlite", 1000.0), None, None),
        ScaleResult("redis", 20.0, _on("redis", 1100.0), None, None),
        ScaleResult("postgres", 20.0, _on("postgres", 700.0), None, None),
    ]
    by_target = {t.target: t for t in targets(doc)}
    assert by_target["CPU per command @20 ms"].ok is True
    assert by_target["CPU per command @20 ms"].measured == 0.9
    postgres = by_target["postgres vs SQLite @20 ms (1 process)"]
    assert (postgres.measured, postgres.ok) == (0.7, False)  # below the 0.8x wanted
    redis = by_target["redis vs SQLite @20 ms (1 process)"]
    assert (redis.measured, redis.ok) == (1.1, None)  # reported, no target
    assert by_target["postgres: throughput vs FastStream @20 ms"].measured == 1.75
    doc.drains[0].consumer_cpu_ms_per_command = 1.2
    assert {t.target: t for t in targets(doc)}["CPU per command @20 ms"].ok is False


def _paced(rate: float, p99: float) -> RunResult:
    run = RunResult(
        scenario="paced",
        kind="worker",
        name="worker paced",
        latency_ms_pabx=20.0,
        store="sqlite",
        commands=10,
        target_rate=rate,
        outcomes=10,
        latency_ms={"publish_to_pabx": Summary(10, 1.0, 2.0, p99, p99)},
        complete=True,
    )
    return run


def test_the_latency_target_is_judged_only_at_half_load() -> None:
    doc = BenchResults(meta=Meta("abc", 1.0, 2, "3.11", {"commands": 10}))
    doc.drains = [drain("worker", 900.0)]
    doc.paced = [_paced(450.0, 8.0)]
    (half,) = [t for t in targets(doc) if t.target.startswith("p99")]
    assert (half.target, half.ok) == ("p99 publish→PABX at half max rate, PABX 20 ms", True)
    doc.paced = [_paced(450.0, 12.0)]
    assert [t.ok for t in targets(doc) if t.target.startswith("p99")] == [False]
    doc.paced = [_paced(300.0, 8.0)]  # --paced-rate 300: a measurement, not the target's
    (fixed,) = [t for t in targets(doc) if t.target.startswith("p99")]
    assert fixed.ok is None and "300/s (fixed, not half load)" in fixed.target
