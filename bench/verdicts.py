"""What a run's numbers say: the worker over its peers, and the issue's targets."""

from __future__ import annotations

from typing import Any

from bench.options import is_worker
from bench.results import (
    BatchResult,
    BenchResults,
    IdleResult,
    Ratio,
    RunResult,
    SoakResult,
    Target,
)

__all__ = ["drain_rate", "one_process_rate", "ratios", "targets"]


def drain_rate(results: BenchResults, kind: str, latency: float) -> float | None:
    """The throughput of ``kind``'s complete drain at PABX ``latency`` (None: none)."""
    for run in results.drains:
        if run.kind == kind and run.latency_ms_pabx == latency and run.complete:
            return run.throughput
    return None


def ratios(results: BenchResults) -> list[Ratio]:
    """Per PABX latency: each worker kind's throughput over each peer's (same run)."""
    found = []
    kinds = sorted({r.kind for r in results.drains if is_worker(r.kind)})
    for latency in sorted({r.latency_ms_pabx for r in results.drains}):
        pika = drain_rate(results, "pika", latency)
        faststream = drain_rate(results, "faststream", latency)
        for kind in kinds:
            rate = drain_rate(results, kind, latency)
            found.append(
                Ratio(
                    latency_ms_pabx=latency,
                    kind=kind,
                    rate=rate,
                    pika=pika,
                    vs_pika=round(rate / pika, 2) if rate and pika else None,
                    faststream=faststream,
                    vs_faststream=round(rate / faststream, 2) if rate and faststream else None,
                )
            )
    return found


def _at_half_load(results: BenchResults, paced: RunResult) -> bool:
    """Whether a paced run's rate was half of the worker's drain rate at its PABX latency."""
    rate = drain_rate(results, paced.kind, paced.latency_ms_pabx)
    if not rate or paced.target_rate is None:
        return False
    return abs(paced.target_rate - rate / 2) <= 0.05 * rate / 2


def targets(results: BenchResults) -> list[Target]:
    """The issue's targets against what this run measured (None: not measured)."""
    found: list[Target] = []

    def add(name: str, target: str, measured: Any, ok: bool | None) -> None:
        found.append(Target(target=name, wanted=target, measured=measured, ok=ok))

    at20 = next((r for r in results.ratios if r.latency_ms_pabx == 20 and r.kind == "worker"), None)
    vs_fs = at20.vs_faststream if at20 else None
    vs_pika = at20.vs_pika if at20 else None
    add("throughput vs FastStream @20 ms", "≥ 2x", vs_fs, None if vs_fs is None else vs_fs >= 2)
    add(
        "throughput vs pika tutorial @20 ms",
        "≥ 15x",
        vs_pika,
        None if vs_pika is None else vs_pika >= 15,
    )
    at20 = [r for r in results.drains if r.kind == "worker" and r.latency_ms_pabx == 20]
    main = next((r for r in at20 if r.complete and (r.processes or 1) == 1), None)
    cpu = main.consumer_cpu_ms_per_command if main else None
    add("CPU per command @20 ms", "≤ 1.0 ms", cpu, None if cpu is None else cpu <= 1.0)
    _store_targets(results, add)
    for paced in (p for p in results.paced if p.kind == "worker"):
        summary = paced.latency_ms.get("publish_to_pabx")
        p99 = summary.p99 if summary else None
        met = None if p99 is None or not paced.complete else p99 <= 10
        where = "half max rate"
        if not _at_half_load(results, paced):  # --paced-rate: no verdict on the target
            where, met = f"{paced.target_rate:g}/s (fixed, not half load)", None
        add(f"p99 publish→PABX at {where}, PABX {paced.latency_ms_pabx:g} ms", "≤ 10 ms", p99, met)
    idle = results.idle.rss_mb.get("worker") if isinstance(results.idle, IdleResult) else None
    add("idle RSS", "≤ 60 MB", idle, None if idle is None else idle <= 60)
    soak = results.soak
    if isinstance(soak, SoakResult) and soak.growth_after_first_chunk_mb is not None:
        growth = soak.growth_after_first_chunk_mb
        add(
            f"RSS flat over {soak.commands} commands",
            "growth ≤ 5 MB after the first chunk",
            growth,
            growth <= 5 and not soak.error,
        )
    else:
        add("RSS flat over 100k commands", "growth ≤ 5 MB", None, None)
    batch = results.batch.rate if isinstance(results.batch, BatchResult) else None
    add(
        "batch publish with confirms",
        "≥ 10k commands/s",
        batch,
        None if batch is None else batch >= 10_000,
    )
    for row in results.scale:
        add(
            f"2 processes, {row.store}, PABX {row.latency_ms_pabx:g} ms",
            "scaling factor",
            row.scaling_factor,
            None,
        )
    return found


def one_process_rate(results: BenchResults, store: str, latency: float) -> float | None:
    """The worker's one-process drain on ``store`` at ``latency``: from the scaling runs, or
    the main drain when that used ``store``."""
    for row in results.scale:
        one = row.one
        if row.store == store and row.latency_ms_pabx == latency and one and one.complete:
            return one.throughput
    for run in results.drains:
        if run.kind == "worker" and run.store == store and run.latency_ms_pabx == latency:
            return run.throughput if run.complete and (run.processes or 1) == 1 else None
    return None


def _store_targets(results: BenchResults, add: Any) -> None:
    """Redis and PostgreSQL against SQLite and the peers, one worker process each @20 ms."""
    sqlite = one_process_rate(results, "sqlite", 20)
    faststream = drain_rate(results, "faststream", 20)
    pika = drain_rate(results, "pika", 20)
    for store in ("redis", "postgres"):
        rate = one_process_rate(results, store, 20)
        if rate is None:
            continue
        vs_sqlite = round(rate / sqlite, 2) if sqlite else None
        wanted = "≥ 0.8x" if store == "postgres" else "reported"
        ok = None if vs_sqlite is None or store != "postgres" else vs_sqlite >= 0.8
        add(f"{store} vs SQLite @20 ms (1 process)", wanted, vs_sqlite, ok)
        for peer, peer_rate in (("FastStream", faststream), ("pika tutorial", pika)):
            ratio = round(rate / peer_rate, 2) if peer_rate else None
            add(f"{store}: throughput vs {peer} @20 ms", "reported", ratio, None)
