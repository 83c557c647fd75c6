"""CPU cost of each step of one command, measured alone: ``python -m bench.micro``.

The drain throughput of one worker process is bounded by the CPU (and the GIL) one command
costs it, so this prints that cost step by step, in microseconds of *thread* CPU time
(``time.thread_time``: what the calling thread spent, whatever else runs on the machine) and
of wall time, single-threaded. The PABX simulator runs in its own process (latency 0), the
stores are the real servers on loopback (skipped when absent), the broker is the local
RabbitMQ. These are the costs the worker pays today, plus cheaper variants of the HTTP call
and the store round trips to show what a change would buy.

    python -m bench.micro [--n 2000] [--stores memory,sqlite,redis,postgres] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.commands import API_KEY, CHANNEL_ID, command_body
from bench.options import BenchError, require_loopback
from bench.processes import Simulator

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"


def measure(name: str, n: int, step: Callable[[int], Any], results: list[dict[str, Any]]) -> None:
    for i in range(min(50, n)):  # warm-up: connections, caches
        step(-1 - i)
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    for i in range(n):
        step(i)
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    row = {
        "step": name,
        "n": n,
        "cpu_us": round(cpu / n * 1e6, 1),
        "wall_us": round(wall / n * 1e6, 1),
    }
    results.append(row)
    print(f"{name:58s} {row['cpu_us']:9.1f} µs CPU {row['wall_us']:9.1f} µs wall", flush=True)


def _settings(sim_url: str, store_url: str, amqp_url: str) -> Any:
    from worker.contract.settings import load_settings

    prefix = f"bench.m{uuid.uuid4().hex[:8]}"
    return load_settings(
        None,
        amqp_url=amqp_url,
        pabx_url=sim_url,
        pabx_api_key=API_KEY,
        pabx_channel_id=CHANNEL_ID,
        store_url=store_url,
        http_port=0,
        command_ttl_s=3600,
        commands_exchange=f"{prefix}.commands",
        command_queue=f"{prefix}.redirect",
        results_exchange=f"{prefix}.results",
        unrouted_exchange=f"{prefix}.unrouted",
        dead_exchange=f"{prefix}.dead",
        parked_queue=f"{prefix}.parked",
        retry_queue_prefix=f"{prefix}.retry",
    )


def pipeline_steps(sim_url: str, n: int, results: list[dict[str, Any]]) -> None:
    """Decode/validate, event building, the whole execute() with a memory store."""
    from worker.contract.messages import (
        Delivery,
        decode_command,
        event_id_for,
        fingerprint,
        parse_json,
    )
    from worker.contract.models import RedirectCommand, Status
    from worker.contract.outcomes import build_event, encode
    from worker.runtime import build_processor

    settings = _settings(sim_url, "memory://", DEFAULT_AMQP)
    run = uuid.uuid4().hex[:6]
    bodies = [command_body(f"m{run}", i, time.time()) for i in range(n)]
    warm = [command_body(f"w{run}", i, time.time()) for i in range(50)]

    def body(i: int) -> bytes:
        return bodies[i] if i >= 0 else warm[-1 - i]

    def delivery(i: int) -> Delivery:
        return Delivery(body=body(i), content_type="application/json")

    parsed = json.loads(bodies[0])
    measure("json.loads (plain)", n, lambda i: json.loads(body(i)), results)
    measure("messages.parse_json (duplicate-key hook)", n, lambda i: parse_json(body(i)), results)
    measure(
        "RedirectCommand.model_validate",
        n,
        lambda i: RedirectCommand.model_validate(parsed),
        results,
    )
    measure(
        "messages.decode_command (all of the above)",
        n,
        lambda i: decode_command(delivery(i)),
        results,
    )
    command = decode_command(delivery(0))
    measure("messages.fingerprint", n, lambda i: fingerprint(command), results)
    measure("messages.event_id_for (uuid5)", n, lambda i: event_id_for("x", "y"), results)
    measure(
        "outcomes.build_event + encode (pydantic)",
        n,
        lambda i: encode(
            build_event(
                event_id="e", status=Status.ACCEPTED, command_id="c", attempts=1, command=command
            )
        ),
        results,
    )
    measure("tracing off: the spans, context and log ids of one command", n, _untraced, results)
    with build_processor(settings) as processor:
        measure("Processor.prepare", n, lambda i: processor.prepare(delivery(i)), results)
        prepared = [processor.prepare(delivery(i)) for i in range(n)]
        warm_prepared = [processor.prepare(delivery(-1 - i)) for i in range(50)]
        measure(
            "Processor.execute, memory store, HTTP to the simulator",
            n,
            lambda i: processor.execute(prepared[i] if i >= 0 else warm_prepared[-1 - i]),
            results,
        )


def _untraced(i: int) -> None:
    """What one command costs the worker with no ``OTEL_*`` variable set (SPEC §8)."""
    from worker.tracing import NO_TRACING

    with NO_TRACING.command_span({}) as span:
        _ = span.recording
    with NO_TRACING.request_span("default"):
        pass
    NO_TRACING.current().get("traceparent")
    NO_TRACING.log_ids()


def http_steps(sim_url: str, n: int, results: list[dict[str, Any]]) -> None:
    """One POST to the simulator: the worker's client, and cheaper ways to send the same."""
    import http.client

    import requests
    import urllib3

    from worker.adapters.pabx import HttpPabx
    from worker.contract.settings import PabxTarget

    target = PabxTarget(url=sim_url, api_key=API_KEY, channel_id=CHANNEL_ID)
    body = json.loads(command_body("h", 0, time.time()))["redirect"]
    pabx = HttpPabx(pool_size=4, connect_timeout_s=3, read_timeout_s=5)
    measure(
        "HttpPabx.redirect (its own HTTP/1.1, as today)",
        n,
        lambda i: pabx.redirect(target, CHANNEL_ID, body),
        results,
    )
    pabx.close()

    url = f"{sim_url}/requests/{CHANNEL_ID}/executa-desvio"
    headers = {"x-api-key": API_KEY}
    session = requests.Session()
    session.trust_env = False  # no proxy/netrc lookups in os.environ on every request
    measure(
        "requests.Session with trust_env=False",
        n,
        lambda i: session.post(url, json=body, headers=headers, timeout=(3, 5)),
        results,
    )
    session.close()

    pool = urllib3.PoolManager(maxsize=4, retries=False, timeout=urllib3.Timeout(connect=3, read=5))
    json_headers = {"x-api-key": API_KEY, "Content-Type": "application/json"}
    measure(
        "urllib3.PoolManager.request (json.dumps body)",
        n,
        lambda i: (
            pool.request("POST", url, body=json.dumps(body).encode(), headers=json_headers).status
        ),
        results,
    )
    pool.clear()

    host, port = sim_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    path = f"/requests/{CHANNEL_ID}/executa-desvio"

    def raw(_i: int) -> int:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=json_headers)
        response = conn.getresponse()
        response.read()
        return response.status

    measure("http.client.HTTPConnection (keep-alive)", n, raw, results)
    conn.close()


def store_steps(
    stores: list[str], n: int, results: list[dict[str, Any]], urls: dict[str, str]
) -> None:
    """The round trips a new command costs the store: claim, mark_sent (with its call), record;
    and the two steps the worker takes instead: claim_and_send, record."""
    from worker.adapters.store import open_store
    from worker.adapters.store.base import CallRef

    outcome = b'{"specversion":"1.0"}' * 20
    for name in stores:
        tmp = None
        if name == "sqlite":
            tmp = tempfile.mkdtemp(prefix="pabx-micro-")
            url = f"sqlite:///{tmp}/m.sqlite3"
        else:
            url = urls[name]
        try:
            store = open_store(url)
            store.ping() if hasattr(store, "ping") else None
        except Exception as exc:
            print(f"{name}: skipped ({type(exc).__name__}: {exc})")
            continue
        run = f"m{uuid.uuid4().hex[:8]}"

        def cycle(i: int, store: Any = store, run: str = run) -> None:
            cid = f"{run}-{i}"
            now = time.time()
            claim = store.claim(cid, "fp", now=now, lease_s=60)
            store.mark_sent(cid, claim.token, CallRef(f"{run}:{i}", now), now=now, lease_s=60)
            store.record(cid, claim.token, outcome, now=now)

        def fused(i: int, store: Any = store, run: str = run) -> None:
            cid = f"{run}f-{i}"
            now = time.time()
            token = uuid.uuid4().hex
            call = CallRef(f"{run}:f{i}", now)
            store.claim_and_send(cid, "fp", call, now=now, lease_s=60, token=token)
            store.record(cid, token, outcome, now=now)

        def claim_only(i: int, store: Any = store, run: str = run) -> None:
            store.claim(f"{run}c-{i}", "fp", now=time.time(), lease_s=60)

        try:
            measure(f"store {name}: claim + mark_sent + record", n, cycle, results)
            measure(f"store {name}: claim_and_send + record (the worker's)", n, fused, results)
            measure(f"store {name}: claim only (one round trip)", n, claim_only, results)
        finally:
            _cleanup(name, url, run)
            store.close()
            if tmp:
                for f in Path(tmp).iterdir():
                    f.unlink()
                os.rmdir(tmp)


def _cleanup(name: str, url: str, run: str) -> None:
    if name == "redis":
        import redis

        with redis.Redis.from_url(url) as client:
            keys = list(client.scan_iter(match=f"pabx:cmd:{run}*", count=1000))
            keys += client.scan_iter(match=f"pabx:call:{run}:*", count=1000)
            for i in range(0, len(keys), 1000):
                client.delete(*keys[i : i + 1000])
    elif name == "postgres":
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("DELETE FROM pabx_commands WHERE command_id LIKE %s", (f"{run}%",))
            conn.execute("DELETE FROM pabx_commands_calls WHERE call_key LIKE %s", (f"{run}:%",))


def broker_steps(sim_url: str, amqp_url: str, n: int, results: list[dict[str, Any]]) -> None:
    """Publishing an outcome with py-amqp (the worker's publisher), and the thread hand-off."""
    import queue
    import threading

    from kombu import Connection

    from worker.adapters.confirms import ConfirmingPublisher, Publication
    from worker.consume.dispatch import KeyedExecutor
    from worker.contract.topology import Topology

    settings = _settings(sim_url, "memory://", amqp_url)
    topology = Topology.from_settings(settings)
    event = b'{"specversion":"1.0","id":"x","data":{"status":"accepted"}}' * 8
    connection = Connection(amqp_url, transport_options={"confirm_publish": False})
    connection.connect()
    try:
        topology.declare(connection.channel())
        publisher = ConfirmingPublisher(connection.channel())
        props = {
            "content_type": "application/cloudevents+json",
            "message_id": "m",
            "correlation_id": "c",
            "timestamp": int(time.time()),
        }
        confirmed = [0]

        def publish(_i: int) -> None:
            publisher.publish(
                Publication(
                    event, settings.results_exchange, "redirect.accepted", props, mandatory=True
                ),
                lambda ok: confirmed.__setitem__(0, confirmed[0] + 1),
            )

        measure("ConfirmingPublisher.publish (py-amqp framing + send)", n, publish, results)
        cpu0 = time.thread_time()
        deadline = time.monotonic() + 30
        while publisher.pending and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=0.2)
        results.append(
            {
                "step": "draining the confirms of those",
                "n": n,
                "cpu_us": round((time.thread_time() - cpu0) / n * 1e6, 1),
            }
        )
        print(f"{'draining the confirms of those':58s} {results[-1]['cpu_us']:9.1f} µs CPU")
    finally:
        channel = connection.channel()
        for q in topology.queues:
            channel.queue_delete(q.name)
        for ex in topology.exchanges:
            channel.exchange_delete(ex.name)
        connection.release()

    executor = KeyedExecutor(4)
    done: queue.SimpleQueue[int] = queue.SimpleQueue()
    try:

        def handoff(i: int) -> None:
            executor.submit(f"k{i}", lambda: done.put(i))
            done.get(timeout=5)

        measure("KeyedExecutor.submit → job → SimpleQueue back (hand-off)", n, handoff, results)
    finally:
        executor.shutdown(wait=True)
    _ = threading  # keeps the import explicit for readers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--stores", default="memory,sqlite,redis,postgres")
    parser.add_argument("--amqp-url", default=os.environ.get("TEST_AMQP_URL", DEFAULT_AMQP))
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for url, what in (
        (args.amqp_url, "AMQP"),
        (args.redis_url, "Redis"),
        (args.postgres_url, "PostgreSQL"),
    ):
        require_loopback(url, what)
    results: list[dict[str, Any]] = []
    log_dir = Path(tempfile.mkdtemp(prefix="pabx-micro-logs-"))
    try:
        sim = Simulator(0, log_dir)
    except BenchError as exc:
        print(f"bench.micro: {exc}", file=sys.stderr)
        return 1
    try:
        pipeline_steps(sim.url, args.n, results)
        http_steps(sim.url, args.n, results)
        store_steps(
            [s for s in args.stores.split(",") if s],
            args.n,
            results,
            {"memory": "memory://", "redis": args.redis_url, "postgres": args.postgres_url},
        )
        broker_steps(sim.url, args.amqp_url, args.n, results)
    finally:
        sim.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
