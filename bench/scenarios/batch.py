"""Publishing a batch with pipelined publisher confirms, through ``worker.produce.producer``."""

from __future__ import annotations

import time
from dataclasses import dataclass

from bench.commands import command_body, command_id
from bench.context import Context
from bench.options import BenchError
from bench.results import BatchMethod, BatchResult

__all__ = ["Batch"]


@dataclass
class Batch:
    """Publishing ``count`` commands with pipelined publisher confirms, through the library.

    ``Producer.publish`` (``send``/``demo``) and, where it exists, ``Producer.publish_messages``
    (the windowed path ``pabx-worker batch`` uses), each on a fresh private topology; the
    rate is from the call to the last confirm. Bodies are built beforehand.
    """

    count: int

    def run(self, ctx: Context) -> BatchResult:
        from worker.produce import producer as producer_module

        ctx.log(f"- batch publish: {self.count} commands with confirms (Producer)")
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
        from worker.produce import producer as producer_module

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
