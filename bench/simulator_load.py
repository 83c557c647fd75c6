"""Load the PABX simulator and print requests/s and latency as one line of JSON.

Usage::

    .venv/bin/python bench/simulator_load.py [--seconds 5] [--concurrency 32]
        [--client-procs 1] [--url http://127.0.0.1:PORT --api-key KEY]

Without ``--url`` it starts a :class:`worker.tools.simulator.SimulatorThread` in this process.  The
load comes from separate client process(es) (multiprocessing, spawn), each running
``concurrency / client-procs`` keep-alive aiohttp clients that POST the vendor example to
``/requests/17/executa-desvio`` until the time is up.  Only loopback targets are allowed.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import multiprocessing as mp
import statistics
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from worker.tools.example import VENDOR_EXAMPLE

BODY: dict[str, str] = VENDOR_EXAMPLE
DEFAULT_KEY = "bench-key"


def _loopback_url(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback:
        raise argparse.ArgumentTypeError(f"--url must be http:// on a loopback address: {url}")
    return url.rstrip("/")


async def _drive(url: str, api_key: str, clients: int, start_at: float, stop_at: float) -> Any:
    target = f"{url}/requests/17/executa-desvio"
    payload = json.dumps(BODY).encode()
    headers = {"x-api-key": api_key, "Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client() -> None:
            nonlocal errors
            while (now := time.time()) < stop_at:
                began = time.perf_counter()
                try:
                    async with session.post(target, data=payload, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                except aiohttp.ClientError:
                    errors += 1
                    continue
                if now >= start_at:  # requests started in the warm-up are not counted
                    latencies.append(time.perf_counter() - began)
                    statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return {"latencies": latencies, "statuses": statuses, "errors": errors}


def _client_process(
    url: str, api_key: str, clients: int, start_at: float, stop_at: float, out: Any
) -> None:
    out.put(asyncio.run(_drive(url, api_key, clients, start_at, stop_at)))


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return sorted_values[index]


def _run_load(url: str, api_key: str, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = args.client_procs
    per_proc = [args.concurrency // procs + (i < args.concurrency % procs) for i in range(procs)]
    start_at = time.time() + 1.5 + args.warmup  # leave time for the spawned interpreters
    stop_at = start_at + args.seconds
    workers = [
        ctx.Process(target=_client_process, args=(url, api_key, n, start_at, stop_at, out))
        for n in per_proc
    ]
    for proc in workers:
        proc.start()
    results = [out.get(timeout=args.seconds + args.warmup + 60) for _ in workers]
    for proc in workers:
        proc.join()
    latencies = sorted(x for r in results for x in r["latencies"])
    statuses: dict[str, int] = {}
    for r in results:
        for code, count in r["statuses"].items():
            statuses[str(code)] = statuses.get(str(code), 0) + count
    return {
        "requests": len(latencies),
        "seconds": args.seconds,
        "rps": round(len(latencies) / args.seconds, 1),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3) if latencies else None,
        "statuses": statuses,
        "client_errors": sum(r["errors"] for r in results),
        "concurrency": args.concurrency,
        "client_procs": procs,
        "server": "external" if args.url else "SimulatorThread",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", type=_loopback_url, help="running simulator (loopback only)")
    parser.add_argument("--api-key", default=DEFAULT_KEY)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--client-procs", type=int, default=1)
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.concurrency < 1 or not 1 <= args.client_procs <= args.concurrency:
        parser.error("need --seconds > 0 and 1 <= --client-procs <= --concurrency")

    if args.url:
        result = _run_load(args.url, args.api_key, args)
    else:
        from worker.tools.simulator import SimulatorThread

        with SimulatorThread(api_key=args.api_key) as sim:
            result = _run_load(sim.url, args.api_key, args)
    print(json.dumps(result), flush=True)
    return 0 if result["statuses"].keys() <= {"200"} and result["requests"] else 1


if __name__ == "__main__":
    sys.exit(main())
