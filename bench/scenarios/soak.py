"""The soak: the worker drains many commands in chunks; its RSS after each."""

from __future__ import annotations

import time
from dataclasses import dataclass

import psutil

from bench.broker import OutcomeReader
from bench.context import Context, Scenario
from bench.options import BenchError
from bench.processes import Child, quietly
from bench.results import SoakResult
from bench.sampling import MB

__all__ = ["Soak"]


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
