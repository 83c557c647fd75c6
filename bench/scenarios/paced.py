"""The paced run: commands at a fixed rate to a consumer already consuming."""

from __future__ import annotations

import functools
import json
import signal
import time
from dataclasses import dataclass

from bench.broker import OutcomeReader
from bench.context import Context, Scenario
from bench.options import is_worker, label, tag
from bench.processes import PYTHON, Child, child_env, quietly
from bench.results import RunResult
from bench.sampling import Sampler, add_resources
from bench.scenarios.analysis import analyse

__all__ = ["Paced"]


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
        probe: _Probe | None = None
        profiler: Child | None = None
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
                if failure is None and ctx.options.probe:
                    probe = _Probe(ctx, scenario, worker)
                if failure is None:
                    ctx.sim.clear()
                    if is_worker(self.kind):  # with --py-spy: the paced run, warmed up
                        name = f"{scenario.prefix}-paced-{self.latency_ms:g}ms-{self.store}"
                        profiler = ctx.start_profiler(worker, name)
                    sampler = ctx.sampler_for([worker])
                    sampler.start()
                    result.published_rate = self._publish(ctx, scenario, stamps)
                    timeout = 60 + self.count / 50
                    failure = reader.wait_for(scenario.prefix, self.count, timeout, [worker])
                result.error = failure
            finally:
                if profiler is not None:  # SIGINT: it writes its output
                    quietly(functools.partial(profiler.stop, 60, signal.SIGINT), ctx.log)
                if sampler is not None:
                    quietly(sampler.stop, ctx.log)
                if worker is not None:
                    worker.stop(30)
                if probe is not None:
                    quietly(probe.stop, ctx.log)
                quietly(reader.stop, ctx.log)
            arrived = probe.arrived if probe is not None else None
            analyse(result, scenario, reader, stamps, ctx.sim.requests(), arrived)
            if sampler is not None and worker is not None:
                add_resources(result, sampler, [worker])
        lat = result.latency_ms.get("publish_to_pabx")
        p50, p99 = (lat.p50, lat.p99) if lat else (None, None)
        ctx.log(f"  publish→PABX p50 {p50} ms, p99 {p99} ms")
        probed = result.latency_ms.get("publish_to_probe")
        if probed is not None:
            ctx.log(f"  publish→probe p50 {probed.p50} ms, p99 {probed.p99} ms (broker alone)")
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


class _Probe:
    """bench.probe on a second queue bound like the command queue, consuming before we publish."""

    def __init__(self, ctx: Context, scenario: Scenario, worker: Child) -> None:
        assert ctx.broker is not None
        s = scenario.settings
        self._out = ctx.tmp / f"probe-{scenario.prefix}.json"
        queue = f"{s.command_queue}.probe"
        self.arrived: dict[str, float] | None = None
        self._child = ctx.spawn(
            f"{scenario.prefix}-probe",
            [
                *(PYTHON, "-m", "bench.probe", "--amqp-url", ctx.options.amqp_url),
                *("--exchange", s.commands_exchange, "--routing-key", s.routing_key),
                *("--queue", queue, "--queue-type", ctx.options.queue_type),
                *("--out", str(self._out)),
            ],
            child_env(),
        )
        ctx.broker.wait_consumers(queue, 1, 60, [self._child, worker])

    def stop(self) -> None:
        self._child.stop(30)
        self.arrived = json.loads(self._out.read_text())
