"""The drain: the queue filled first, then the consumers drain it."""

from __future__ import annotations

import functools
import signal
import time
from dataclasses import dataclass

from bench.broker import OutcomeReader
from bench.context import Context, Scenario
from bench.options import is_worker, label, tag
from bench.processes import Child, quietly
from bench.results import RunResult
from bench.sampling import Sampler, add_resources
from bench.scenarios.analysis import analyse

__all__ = ["Drain"]


def _timeout(kind: str, count: int, latency_ms: float) -> float:
    if kind == "pika":  # one at a time
        return 60 + count * (latency_ms / 1000 + 0.01) * 1.5
    return 60 + count / 50


@dataclass
class Drain:
    """Pre-fill the queue with ``count`` commands, then let ``procs`` consumers drain it.

    The processes share the scenario's store: one Redis, one PostgreSQL, or one SQLite file.
    """

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
            analyse(result, scenario, reader, stamps, ctx.sim.requests())
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
