"""The bench's scenarios, one object each; ``run(ctx)`` gives its typed result.

Every process that does the job runs on its own: the PABX simulator
(``python -m worker simulate``), the worker (``python -m worker run`` configured through
``PABX_WORKER_*``), and the peers (``python -m bench.peers``). This process only publishes
commands, reads outcome events and samples the others with psutil, so every number includes
real IPC (AMQP and HTTP over loopback).

Scenarios (each on a private topology whose names start with ``bench.<prefix>.``, deleted
afterwards, and a private key prefix in the idempotency store, removed afterwards):

:class:`Drain`
    ``N`` valid commands are published to the commands exchange *before* the consumer
    starts; then the consumer (the worker, one or more processes, or a peer) drains the queue.
    Throughput = outcomes / (last outcome - first outcome), both times taken by the same
    outcome reader (a pika consumer of the results exchange, in a thread of this process).
    Latencies: publish → PABX request (``issued_at`` of the command vs ``received_at`` that
    the simulator recorded, ms resolution) and publish → outcome (vs the reader's arrival
    time). In a drain both are dominated by the time spent queued; they are reported anyway.
:class:`Paced`
    The worker already consuming; commands published at a fixed rate (half of the worker's
    drain throughput at that latency, measured earlier in the same run). Here publish → PABX
    request is the latency the worker *adds* (queue + prepare + thread hand-off + store claim
    + HTTP client), the issue's "p99 ≤ 10 ms at half of the maximum rate".
:class:`Idle`
    RSS of each consumer process a few seconds after it started consuming an empty queue.
:class:`Batch`
    ``worker.producer.Producer.publish`` (pipelined publisher confirms) of many commands;
    commands/s from the call to the last confirm.
:class:`Soak`
    The worker drains ``N`` commands in chunks; RSS after each chunk (is it flat?).
"""

from __future__ import annotations

import functools
import json
import signal
import statistics
import time
from dataclasses import dataclass
from typing import Any

import psutil

from bench.broker import OutcomeReader
from bench.commands import (
    command_body,
    command_id,
    index_of_call,
    index_of_command,
    parse_rfc3339,
)
from bench.context import Context, Scenario
from bench.options import BenchError, is_worker, label, tag
from bench.processes import Child, quietly
from bench.results import (
    BatchMethod,
    BatchResult,
    IdleResult,
    RunResult,
    SlowRequest,
    SoakResult,
)
from bench.sampling import MB, Sampler, add_resources, summary_ms

__all__ = ["Batch", "Drain", "Idle", "Paced", "Soak"]


def _timeout(kind: str, count: int, latency_ms: float) -> float:
    if kind == "pika":  # one at a time
        return 60 + count * (latency_ms / 1000 + 0.01) * 1.5
    return 60 + count / 50


def _outcomes(
    result: RunResult, prefix: str, reader: OutcomeReader, stamps: dict[int, float]
) -> None:
    """Outcomes, their statuses, publish → outcome latencies and the throughput."""
    arrivals: list[float] = []
    pub_to_outcome: list[float] = []
    statuses: dict[str, int] = {}
    for cid, arrived in reader.arrivals.items():
        index = index_of_command(prefix, cid)
        if index is None or index not in stamps:
            continue
        arrivals.append(arrived)
        pub_to_outcome.append(arrived - stamps[index])
        body = reader.bodies.get(cid)
        if body is not None:
            try:
                status = str(json.loads(body)["data"]["status"])
            except (ValueError, KeyError, TypeError):
                status = "unparsable"
            statuses[status] = statuses.get(status, 0) + 1
    result.outcomes = len(arrivals)
    result.statuses = statuses
    result.latency_ms = {"publish_to_outcome": summary_ms(pub_to_outcome)}
    if len(arrivals) >= 2:
        first, last = min(arrivals), max(arrivals)
        span = last - first
        result.first_outcome, result.last_outcome = first, last
        result.duration_s = round(span, 3)
        result.throughput = round(len(arrivals) / span, 1) if span > 0 else None


def _pabx_requests(
    result: RunResult, prefix: str, stamps: dict[int, float], requests_seen: list[dict[str, Any]]
) -> None:
    """Publish → PABX latencies (first request per command), requests and repeats."""
    pub_to_pabx: list[float] = []
    slow: list[tuple[float, float]] = []
    per_command: dict[int, int] = {}
    for record in requests_seen:
        body = record.get("body")
        call = body.get("ID_CHAMADA") if isinstance(body, dict) else None
        index = index_of_call(prefix, call) if isinstance(call, str) else None
        if index is None or index not in stamps:
            continue
        per_command[index] = per_command.get(index, 0) + 1
        if per_command[index] == 1:
            pub_to_pabx.append(parse_rfc3339(record["received_at"]) - stamps[index])
            slow.append((pub_to_pabx[-1], stamps[index]))
    result.latency_ms["publish_to_pabx"] = summary_ms(pub_to_pabx)
    if slow:  # when the slowest ones were published (seconds into the run): stalls?
        t0 = min(stamps.values())
        result.slowest_publish_to_pabx = [
            SlowRequest(published_at_s=round(at - t0, 3), ms=round(lat * 1000, 1))
            for lat, at in sorted(slow, reverse=True)[:8]
        ]
    result.pabx_requests = sum(per_command.values())
    result.pabx_repeated = sum(n - 1 for n in per_command.values())


def _analyse(
    result: RunResult,
    scenario: Scenario,
    reader: OutcomeReader,
    stamps: dict[int, float],
    requests_seen: list[dict[str, Any]],
) -> None:
    _outcomes(result, scenario.prefix, reader, stamps)
    _pabx_requests(result, scenario.prefix, stamps, requests_seen)
    result.complete = result.outcomes == result.commands and not result.error


@dataclass
class Drain:
    """Pre-fill the queue with ``count`` commands, then let ``procs`` consumers drain it."""

    kind: str
    latency_ms: float
    count: int
    store: str
    procs: int = 1

    def _result(self, ctx: Context, scenario: Scenario) -> RunResult:
        return RunResult(
            scenario="drain",
            kind=self.kind,
            name=label(self.kind) + (f" x{self.procs}" if self.procs > 1 else ""),
            latency_ms_pabx=self.latency_ms,
            store=self.store if is_worker(self.kind) else None,
            processes=self.procs,
            concurrency=ctx.options.concurrency if self.kind != "pika" else 1,
            commands=self.count,
            prefix=scenario.prefix,
        )

    def run(self, ctx: Context) -> RunResult:
        assert ctx.broker is not None and ctx.sim is not None
        scenario = ctx.new_scenario(self.store)
        result = self._result(ctx, scenario)
        ctx.log(
            f"- {result.name} drain: {self.count} commands, PABX {self.latency_ms:g} ms"
            + (f", {self.store} store" if is_worker(self.kind) else "")
        )
        consumers: list[Child] = []
        profilers: list[Child] = []
        sampler: Sampler | None = None
        with ctx.topology(scenario):
            reader = OutcomeReader(ctx.options.amqp_url, scenario.settings.results_exchange)
            reader.start()
            try:
                stamps = self._fill(ctx, scenario, result)
                for i in range(self.procs):
                    name = f"{scenario.prefix}-{tag(self.kind)}-{i}"
                    consumers.append(ctx.start_consumer(self.kind, scenario, name))
                sampler = ctx.sampler_for(consumers)
                sampler.start()
                result.error = self._wait(ctx, scenario, reader, consumers, profilers)
            finally:
                self._stop(ctx, result, reader, sampler, consumers, profilers)
            _analyse(result, scenario, reader, stamps, ctx.sim.requests())
            if sampler is not None:
                add_resources(result, sampler, consumers)
        ctx.log(
            f"  {result.throughput} commands/s, {result.outcomes}/{self.count} outcomes"
            + (f" — {result.error}" if result.error else "")
        )
        return result

    def _fill(self, ctx: Context, scenario: Scenario, result: RunResult) -> dict[int, float]:
        assert ctx.broker is not None and ctx.sim is not None
        ctx.sim.clear()
        fill_started = time.perf_counter()
        stamps = dict(enumerate(ctx.broker.fill(scenario.settings, scenario.prefix, self.count)))
        ctx.broker.wait_depth(scenario.settings.command_queue, self.count, 60 + self.count / 500)
        result.fill_s = round(time.perf_counter() - fill_started, 3)
        return stamps

    def _wait(
        self,
        ctx: Context,
        scenario: Scenario,
        reader: OutcomeReader,
        consumers: list[Child],
        profilers: list[Child],
    ) -> str | None:
        """Wait for every outcome (profiling the steady state when asked); the failure."""
        if is_worker(self.kind) and ctx.options.py_spy_dir is not None:
            # Profile the steady state only: attach once the first outcome is out.
            reader.wait_for(scenario.prefix, 1, 60, consumers)
            for i, child in enumerate(consumers):
                name = f"{scenario.prefix}-{self.latency_ms:g}ms-{self.store}-{i}"
                profiler = ctx.start_profiler(child, name)
                if profiler is not None:
                    profilers.append(profiler)
        timeout = _timeout(self.kind, self.count, self.latency_ms)
        return reader.wait_for(scenario.prefix, self.count, timeout, consumers)

    def _stop(
        self,
        ctx: Context,
        result: RunResult,
        reader: OutcomeReader,
        sampler: Sampler | None,
        consumers: list[Child],
        profilers: list[Child],
    ) -> None:
        """Stop the profilers (SIGINT: they write their output), the sampler, the consumers."""
        for profiler in profilers:
            quietly(functools.partial(profiler.stop, 60, signal.SIGINT), ctx.log)
        if sampler is not None:
            quietly(sampler.stop, ctx.log)
        for child in consumers:
            code = child.stop(30)
            if code not in (0, -signal.SIGTERM, None) and not result.error:
                result.error = f"{child.name} exited with {code}: {child.log_tail()}"
        quietly(reader.stop, ctx.log)


@dataclass
class Paced:
    """A consumer already consuming; commands published at ``rate``/s; publish → PABX latency."""

    kind: str
    latency_ms: float
    rate: float
    count: int
    store: str

    def run(self, ctx: Context) -> RunResult:
        assert ctx.broker is not None and ctx.sim is not None
        scenario = ctx.new_scenario(self.store)
        result = RunResult(
            scenario="paced",
            kind=self.kind,
            name=f"{label(self.kind)} paced",
            latency_ms_pabx=self.latency_ms,
            store=self.store if is_worker(self.kind) else None,
            processes=1,
            concurrency=ctx.options.concurrency if self.kind != "pika" else 1,
            commands=self.count,
            target_rate=round(self.rate, 1),
            prefix=scenario.prefix,
        )
        ctx.log(
            f"- {label(self.kind)} paced: {self.count} commands at {self.rate:.0f}/s,"
            f" PABX {self.latency_ms:g} ms"
        )
        worker: Child | None = None
        sampler: Sampler | None = None
        stamps: dict[int, float] = {}
        with ctx.topology(scenario):
            reader = OutcomeReader(ctx.options.amqp_url, scenario.settings.results_exchange)
            reader.start()
            try:
                worker = ctx.start_consumer(
                    self.kind, scenario, f"{scenario.prefix}-{tag(self.kind)}-0"
                )
                failure = self._warm_up(ctx, scenario, reader, worker)
                if failure is None:
                    ctx.sim.clear()
                    sampler = ctx.sampler_for([worker])
                    sampler.start()
                    result.published_rate = self._publish(ctx, scenario, stamps)
                    timeout = 60 + self.count / 50
                    failure = reader.wait_for(scenario.prefix, self.count, timeout, [worker])
                result.error = failure
            finally:
                if sampler is not None:
                    quietly(sampler.stop, ctx.log)
                if worker is not None:
                    worker.stop(30)
                quietly(reader.stop, ctx.log)
            _analyse(result, scenario, reader, stamps, ctx.sim.requests())
            if sampler is not None and worker is not None:
                add_resources(result, sampler, [worker])
        lat = result.latency_ms.get("publish_to_pabx")
        p50, p99 = (lat.p50, lat.p99) if lat else (None, None)
        ctx.log(f"  publish→PABX p50 {p50} ms, p99 {p99} ms")
        return result

    def _warm_up(
        self, ctx: Context, scenario: Scenario, reader: OutcomeReader, worker: Child
    ) -> str | None:
        """Open the HTTP and store connections before measuring."""
        assert ctx.broker is not None
        ctx.broker.wait_consumers(scenario.settings.command_queue, 1, 60, [worker])
        warm = f"{scenario.prefix}w"
        warm_count = 2 * ctx.options.concurrency if self.kind != "pika" else 20
        ctx.broker.fill(scenario.settings, warm, warm_count)
        return reader.wait_for(warm, warm_count, 60, [worker])

    def _publish(self, ctx: Context, scenario: Scenario, stamps: dict[int, float]) -> float:
        """Publish every command at its time; the rate achieved."""
        assert ctx.broker is not None
        start = time.perf_counter() + 0.05
        for i in range(self.count):
            delay = start + i / self.rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            stamps[i] = ctx.broker.publish_command(scenario.settings, scenario.prefix, i)
        return round(self.count / (time.perf_counter() - start), 1)


@dataclass
class Idle:
    """RSS of each consumer a few seconds after it started consuming an empty queue."""

    store: str
    kinds: tuple[str, ...]

    def run(self, ctx: Context) -> IdleResult:
        assert ctx.broker is not None
        scenario = ctx.new_scenario(self.store)
        ctx.log(f"- idle RSS: {', '.join(label(k) for k in self.kinds)}")
        result = IdleResult(store=self.store)
        children: list[Child] = []
        with ctx.topology(scenario):
            try:
                for kind in self.kinds:
                    name = f"{scenario.prefix}-{tag(kind)}"
                    children.append(ctx.start_consumer(kind, scenario, name))
                queue = scenario.settings.command_queue
                ctx.broker.wait_consumers(queue, len(self.kinds), 60, children)
                time.sleep(ctx.options.idle_seconds)
                for kind, child in zip(self.kinds, children, strict=True):
                    rss = [child.ps.memory_info().rss]
                    for _ in range(4):
                        time.sleep(0.2)
                        rss.append(child.ps.memory_info().rss)
                    result.rss_mb[kind] = round(statistics.median(rss) / MB, 1)
            except (BenchError, psutil.Error) as exc:
                result.error = str(exc)
            finally:
                for child in children:
                    child.stop(30)
        ctx.log(f"  {result.rss_mb}")
        return result


@dataclass
class Batch:
    """Publishing ``count`` commands with pipelined publisher confirms, through the library.

    ``Producer.publish`` (``send``/``demo``) and, where it exists, ``Producer.publish_messages``
    (the windowed path ``pabx-worker batch`` uses), each on a fresh private topology; the
    rate is from the call to the last confirm. Bodies are built beforehand.
    """

    count: int

    def run(self, ctx: Context) -> BatchResult:
        from worker import producer as producer_module

        ctx.log(f"- batch publish: {self.count} commands with confirms (worker.producer.Producer)")
        result = BatchResult(commands=self.count)
        methods = ["publish"]
        if hasattr(producer_module.Producer, "publish_messages"):
            methods.append("publish_messages")
        for method in methods:
            row = self._method(ctx, method)
            result.methods[f"Producer.{method}"] = row
            ctx.log(
                f"  Producer.{method}: {row.rate} commands/s"
                + (f" — {row.error}" if row.error is not None else "")
            )
        rates = [r.rate for r in result.methods.values() if r.rate is not None]
        errors = [f"{m}: {r.error}" for m, r in result.methods.items() if r.error is not None]
        if rates:
            result.rate = max(rates)
        if errors:
            result.error = "; ".join(errors)
        return result

    def _method(self, ctx: Context, method: str) -> BatchMethod:
        """One publishing method on a fresh private topology."""
        from worker import producer as producer_module

        assert ctx.broker is not None
        count = self.count
        scenario = ctx.new_scenario("memory")
        now = time.time()
        ids = [command_id(scenario.prefix, i) for i in range(count)]
        bodies = [command_body(scenario.prefix, i, now) for i in range(count)]
        with ctx.topology(scenario):
            try:
                with producer_module.Producer(scenario.settings, declare=True) as producer:
                    timeout = 60 + count / 500
                    began = time.perf_counter()
                    if method == "publish":
                        producer.publish(zip(bodies, ids, strict=True), timeout=timeout)
                    else:
                        outgoing = [
                            producer_module.Outgoing.command(b, c)
                            for b, c in zip(bodies, ids, strict=True)
                        ]
                        began = time.perf_counter()
                        report = producer.publish_messages(outgoing, timeout=timeout)
                        if not report.ok:
                            raise BenchError(
                                f"{len(report.failed)} failed, {len(report.unsettled)} unsettled,"
                                f" error {report.error}"
                            )
                    elapsed = time.perf_counter() - began
                ctx.broker.wait_depth(scenario.settings.command_queue, count, 30)
                return BatchMethod(seconds=round(elapsed, 3), rate=round(count / elapsed, 1))
            except Exception as exc:
                return BatchMethod(error=f"{type(exc).__name__}: {exc}")


@dataclass
class Soak:
    """The worker drains ``total`` commands in chunks; its RSS after each chunk."""

    total: int
    chunk: int
    store: str

    def run(self, ctx: Context) -> SoakResult:
        assert ctx.broker is not None and ctx.sim is not None
        scenario = ctx.new_scenario(self.store)
        ctx.log(f"- soak: {self.total} commands in chunks of {self.chunk} ({self.store} store)")
        result = SoakResult(commands=self.total, store=self.store)
        worker: Child | None = None
        with ctx.topology(scenario):
            reader = OutcomeReader(
                ctx.options.amqp_url, scenario.settings.results_exchange, keep_bodies=False
            )
            reader.start()
            try:
                worker = ctx.start_consumer("worker", scenario, f"{scenario.prefix}-worker-soak")
                ctx.broker.wait_consumers(scenario.settings.command_queue, 1, 60, [worker])
                time.sleep(ctx.options.idle_seconds)
                result.rss_mb.append((0, round(worker.ps.memory_info().rss / MB, 1)))
                began = time.perf_counter()
                result.error = self._chunks(ctx, scenario, reader, worker, result)
                result.seconds = round(time.perf_counter() - began, 1)
            except (BenchError, psutil.Error) as exc:
                result.error = str(exc)
            finally:
                if worker is not None:
                    worker.stop(30)
                quietly(reader.stop, ctx.log)
        samples = [mb for _, mb in result.rss_mb]
        if len(samples) >= 3:
            after_first = samples[1:]
            result.growth_after_first_chunk_mb = round(after_first[-1] - after_first[0], 1)
            result.peak_mb = max(samples)
        result.outcomes = reader.counts.get(scenario.prefix, 0)
        return result

    def _chunks(
        self,
        ctx: Context,
        scenario: Scenario,
        reader: OutcomeReader,
        worker: Child,
        result: SoakResult,
    ) -> str | None:
        """Fill and drain chunk after chunk, noting the RSS after each; the failure."""
        assert ctx.broker is not None and ctx.sim is not None
        done = 0
        while done < self.total:
            size = min(self.chunk, self.total - done)
            ctx.broker.fill(scenario.settings, scenario.prefix, size, start=done)
            done += size
            failure = reader.wait_for(scenario.prefix, done, 120 + size / 20, [worker])
            if failure is not None:
                return failure
            ctx.sim.clear()
            result.rss_mb.append((done, round(worker.ps.memory_info().rss / MB, 1)))
            ctx.log(f"  {done} done, RSS {result.rss_mb[-1][1]} MB")
        return None
