"""Idle RSS: each consumer on an empty queue."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import psutil

from bench.context import Context
from bench.options import BenchError, label, tag
from bench.processes import Child
from bench.results import IdleResult
from bench.sampling import MB

__all__ = ["Idle"]


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
