"""Sampling the processes (RSS, CPU time) and summarising latencies."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

import psutil

from bench.processes import Child
from bench.results import RunResult, Summary

__all__ = ["MB", "Sampler", "add_resources", "find_rabbitmq", "percentile", "summary_ms"]

MB = 1024 * 1024
SAMPLE_PERIOD_S = 0.05


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of unsorted values (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q * len(ordered))))
    return ordered[rank - 1]


def summary_ms(seconds: list[float]) -> Summary:
    """p50/p90/p99/max in milliseconds of latencies given in seconds."""
    ms = [s * 1000 for s in seconds]

    def at(q: float) -> float | None:
        value = percentile(ms, q)
        return None if value is None else round(value, 2)

    return Summary(
        n=len(ms), p50=at(0.50), p90=at(0.90), p99=at(0.99), max=round(max(ms), 2) if ms else None
    )


# --------------------------------------------------------------------------- processes


class Sampler(threading.Thread):
    """RSS and CPU time of some processes, every SAMPLE_PERIOD_S."""

    def __init__(
        self, processes: dict[str, psutil.Process], main_threads: Iterable[str] = ()
    ) -> None:
        super().__init__(name="bench-sampler", daemon=True)
        self.processes = processes
        #: Processes whose main thread is also sampled alone (the worker's connection thread).
        self.main_threads = set(main_threads)
        self.samples: dict[str, list[tuple[float, int, float]]] = {n: [] for n in processes}
        self._halt = threading.Event()
        self._sample()

    def _sample(self) -> None:
        now = time.time()
        machine = psutil.cpu_times()
        busy = machine.user + machine.nice + machine.system + machine.irq + machine.softirq
        self.samples.setdefault("machine (all processes)", []).append((now, 0, busy))
        for name, proc in self.processes.items():
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
            except psutil.Error:
                continue
            self.samples[name].append((now, rss, cpu.user + cpu.system))
            if name in self.main_threads:  # kernel time: syscalls, thread wake-ups
                self.samples.setdefault(f"{name} kernel", []).append((now, 0, cpu.system))
            if name in self.main_threads:
                with contextlib.suppress(psutil.Error):
                    main = next((t for t in proc.threads() if t.id == proc.pid), None)
                    if main is not None:
                        self.samples.setdefault(f"{name} main thread", []).append(
                            (now, 0, main.user_time + main.system_time)
                        )

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_PERIOD_S):
            self._sample()

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self._sample()

    def peak_rss_mb(self, name: str) -> float | None:
        samples = [s for s in self.samples.get(name) or [] if s[1]]
        return round(max(s[1] for s in samples) / MB, 1) if samples else None

    def cpu_at(self, name: str, when: float) -> float | None:
        """CPU seconds used by ``name`` up to ``when`` (linear between samples)."""
        samples = self.samples.get(name) or []
        if not samples:
            return None
        before = [s for s in samples if s[0] <= when]
        after = [s for s in samples if s[0] >= when]
        if not before:
            return samples[0][2]
        if not after:
            return samples[-1][2]
        (t0, _, c0), (t1, _, c1) = before[-1], after[0]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)

    def cpu_between(self, name: str, start: float, end: float) -> float | None:
        a, b = self.cpu_at(name, start), self.cpu_at(name, end)
        return None if a is None or b is None else max(b - a, 0.0)


def find_rabbitmq(amqp_url: str) -> psutil.Process | None:
    """The Erlang VM listening on the AMQP port, read-only (how the 2 cores were shared)."""
    port = urlsplit(amqp_url).port or 5672
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "beam.smp":
            continue
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                    return proc
    return None


def add_resources(result: RunResult, sampler: Sampler, consumers: list[Child]) -> None:
    """Peak RSS of the consumers, and CPU used between the first and the last outcome."""
    first, last, n = result.first_outcome, result.last_outcome, result.outcomes
    result.peak_rss_mb = {c.name: sampler.peak_rss_mb(c.name) for c in consumers}
    if first is None or last is None or last <= first:
        return
    window = last - first
    cpu: dict[str, float | None] = {}
    for name in sampler.samples:
        used = sampler.cpu_between(name, first, last)
        cpu[name] = None if used is None else round(used / window, 3)
    result.cpu_cores_used = cpu
    consumer_cpu = [sampler.cpu_between(c.name, first, last) for c in consumers]
    if all(c is not None for c in consumer_cpu) and n > 1:
        result.consumer_cpu_ms_per_command = round(
            sum(c for c in consumer_cpu if c is not None) * 1000 / n, 3
        )
    main_cpu = [sampler.cpu_between(f"{c.name} main thread", first, last) for c in consumers]
    if main_cpu and all(c is not None for c in main_cpu) and n > 1:
        # The worker's connection thread: deliveries, prepare, publishing, acks.
        result.main_thread_cpu_ms_per_command = round(
            sum(c for c in main_cpu if c is not None) * 1000 / n, 3
        )
