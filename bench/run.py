"""One bench run: every scenario the options ask for, back to back, into one result."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench.broker import Broker
from bench.context import Context
from bench.options import Options, label, require_loopback
from bench.processes import Simulator
from bench.results import BenchResults, Failed, Meta, RunResult, ScalePoint, ScaleResult
from bench.sampling import find_rabbitmq
from bench.scenarios import Batch, Drain, Idle, Paced, Soak
from bench.verdicts import ratios, targets

__all__ = ["run_bench"]

T = TypeVar("T")


def _best_run(runs: list[RunResult]) -> RunResult:
    """The fastest complete run: on a shared machine noise only ever slows a run down."""
    ok = [r for r in runs if r.measured]
    if not ok:
        return runs[-1]
    chosen = max(ok, key=lambda r: r.throughput or 0.0)
    return dataclasses.replace(chosen, throughput_runs=[r.throughput for r in runs])


def _guarded(ctx: Context, results: BenchResults, what: str, step: Callable[[], T]) -> T | Failed:
    """Run one part of the bench; a failure is recorded in the results, the rest goes on."""
    try:
        return step()
    except Exception as exc:
        message = f"{what}: {type(exc).__name__}: {exc}"
        ctx.log(f"  FAILED {message}")
        results.errors.append(message)
        return Failed(message)


def _attempt(
    ctx: Context,
    results: BenchResults,
    scenario: Drain | Paced,
    count: int,
) -> RunResult:
    """Run a drain or a paced run; one that raised leaves a stub with its error."""
    name = "drain" if isinstance(scenario, Drain) else "paced"
    kind, latency = scenario.kind, scenario.latency_ms
    what = f"{name} {label(kind)} @ PABX {latency:g} ms"
    result = _guarded(ctx, results, what, lambda: scenario.run(ctx))
    if isinstance(result, Failed):
        return RunResult(
            scenario=name,
            kind=kind,
            name=label(kind),
            latency_ms_pabx=latency,
            store=None,
            processes=scenario.procs if isinstance(scenario, Drain) else 1,
            commands=count,
            error=result.error,
        )
    return result


def _meta(ctx: Context, options: Options, started: float) -> Meta:
    hidden = ("progress", "amqp_url", "redis_url", "postgres_url")
    return Meta(
        run_id=ctx.run_id,
        started_at=started,
        cpus=os.cpu_count(),
        python=sys.version.split()[0],
        options={
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(options).items()
            if k not in hidden
        },
    )


def run_bench(options: Options) -> BenchResults:
    """Run every scenario the options ask for, back to back; the results as one record."""
    require_loopback(options.amqp_url, "the AMQP URL")
    stores = {options.store, *(options.scale_stores if options.scale else ())}
    if "redis" in stores:
        require_loopback(options.redis_url, "the Redis URL")
    if "postgres" in stores:
        require_loopback(options.postgres_url, "the PostgreSQL URL")
    ctx = Context(options)
    started = time.time()
    results = BenchResults(meta=_meta(ctx, options, started))
    ctx.rabbit = find_rabbitmq(options.amqp_url)
    ctx.broker = Broker(options.amqp_url)
    try:
        for latency in options.latencies:
            ctx.sim = Simulator(latency, options.log_dir / ctx.run_id)
            try:
                _guarded(
                    ctx,
                    results,
                    f"PABX {latency:g} ms",
                    functools.partial(_run_latency, ctx, results, latency),
                )
            finally:
                ctx.sim.stop()
                ctx.sim = None
        if options.idle or options.soak or options.batch_commands:
            _run_others(ctx, results)
    finally:
        ctx.stop_leftovers()
        ctx.broker.close()
        with contextlib.suppress(OSError):
            ctx.tmp.rmdir()
    results.meta.seconds = round(time.time() - started, 1)
    results.ratios = ratios(results)
    results.targets = targets(results)
    return results


def _run_others(ctx: Context, results: BenchResults) -> None:
    """Idle RSS, the soak and the batch publish, against a simulator without latency."""
    options = ctx.options
    ctx.sim = Simulator(0, options.log_dir / ctx.run_id)
    try:
        if options.idle:
            idle = Idle(options.store, options.kinds)
            results.idle = _guarded(ctx, results, "idle", lambda: idle.run(ctx))
        if options.soak:
            soak = Soak(options.soak, options.soak_chunk, options.store)
            results.soak = _guarded(ctx, results, "soak", lambda: soak.run(ctx))
        if options.batch_commands:
            batch = Batch(options.batch_commands)
            results.batch = _guarded(ctx, results, "batch", lambda: batch.run(ctx))
    finally:
        ctx.sim.stop()
        ctx.sim = None


def _run_latency(ctx: Context, results: BenchResults, latency: float) -> None:
    """Drains of every kind (best of the repeats), paced runs, and the scaling runs."""
    options = ctx.options
    store = options.store
    by_kind: dict[str, list[RunResult]] = {k: [] for k in options.kinds}
    for _ in range(options.repeat):
        for kind in options.kinds:
            count = options.commands
            if kind == "pika" and options.tutorial_commands:
                count = min(count, options.tutorial_commands)
            drain = Drain(kind, latency, count, store)
            by_kind[kind].append(_attempt(ctx, results, drain, count))
    for kind in options.kinds:
        results.drains.append(_best_run(by_kind[kind]))
    for kind in options.kinds if options.paced else ():
        done = [r for r in by_kind[kind] if r.measured]
        if not done:
            continue
        # Half of this consumer's own maximum, unless every consumer gets one fixed rate.
        rate = options.paced_rate or (_best_run(done).throughput or 0.0) / 2
        count = max(50, min(options.commands, int(rate * options.paced_seconds)))
        paced = Paced(kind, latency, rate, count, store)
        results.paced.append(_attempt(ctx, results, paced, count))
    if options.scale:
        for scale_store in options.scale_stores:
            results.scale.append(_scale(ctx, results, latency, scale_store))


def _scale(ctx: Context, results: BenchResults, latency: float, store: str) -> ScaleResult:
    """The worker draining with each process count in turn, all of them on one ``store``."""
    count = ctx.options.commands
    runs = {
        procs: _attempt(ctx, results, Drain("worker", latency, count, store, procs=procs), count)
        for procs in ctx.options.scale_processes
    }
    one, two = runs.pop(1, None), runs.pop(2, None)
    factor = None
    if one and two and one.measured and two.measured:
        factor = round((two.throughput or 0.0) / (one.throughput or 1.0), 2)
    row = ScaleResult(
        store=store,
        latency_ms_pabx=latency,
        one=one,
        two=two,
        scaling_factor=factor,
        more=[runs[p] for p in sorted(runs)],
    )
    row.points = [ScalePoint.of(run) for run in row.runs()]
    return row
