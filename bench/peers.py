"""The two peers the worker is compared with; each one runs in its own process.

Both do the worker's job without its guarantees beyond ack-after-outcome: consume a command,
POST its vendor body to the PABX (``x-api-key``), publish an outcome event to the results
exchange, ack. No idempotency, no validation beyond ``json.loads``, no retries.

* ``pika``: the RabbitMQ tutorial consumer: ``BlockingConnection``, ``basic_qos(1)``,
  ``requests`` POST (a keep-alive ``Session``, which only makes the peer faster),
  ``basic_publish`` (confirmed by default, so the ack really comes after the outcome is safe,
  as in the worker; ``--no-confirm`` for the bare tutorial), ``basic_ack``.
* ``faststream``: a FastStream ``RabbitBroker`` subscriber with ``prefetch_count`` =
  concurrency (aiormq runs each delivery as its own task), ``httpx.AsyncClient``, and
  ``broker.publish`` (publisher confirms, FastStream's default); acked when the handler
  returns (FastStream's default ack policy). Per-message logging is off, which only makes the
  peer faster.

Usage (the bench starts these, see bench.context)::

    python -m bench.peers pika|faststream --amqp-url URL --queue Q --results-exchange X \
        --pabx-url http://127.0.0.1:PORT --api-key K [--concurrency 32] [--no-confirm]

SIGTERM stops either peer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

from bench.commands import EVENT_CONTENT_TYPE, peer_event, vendor_request


def _routing_key(status: str) -> str:
    return f"redirect.{status}"


def run_pika(args: argparse.Namespace) -> None:
    import pika
    import requests

    connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = connection.channel()
    if args.confirm:
        channel.confirm_delivery()
    channel.basic_qos(prefetch_count=1)
    session = requests.Session()
    headers = {"x-api-key": args.api_key}

    def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        command = json.loads(body)
        url, vendor_body = vendor_request(command, args.pabx_url)
        try:
            code: int | None = session.post(
                url, json=vendor_body, headers=headers, timeout=5
            ).status_code
        except requests.RequestException:
            code = None
        status = "accepted" if code == 200 else "failed"
        ch.basic_publish(
            args.results_exchange,
            _routing_key(status),
            peer_event(command, status, code),
            pika.BasicProperties(
                content_type=EVENT_CONTENT_TYPE,
                delivery_mode=2,
                correlation_id=properties.correlation_id or command.get("command_id"),
            ),
        )
        ch.basic_ack(method.delivery_tag)

    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    channel.basic_consume(args.queue, on_message)
    try:
        channel.start_consuming()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        with contextlib.suppress(Exception):  # the broker may have closed it first
            connection.close()


async def run_faststream(args: argparse.Namespace) -> None:
    import httpx
    from faststream.rabbit import Channel, ExchangeType, RabbitBroker, RabbitExchange, RabbitQueue

    concurrency = args.concurrency
    broker = RabbitBroker(args.amqp_url, logger=None)
    results = RabbitExchange(args.results_exchange, type=ExchangeType.TOPIC, declare=False)
    http = httpx.AsyncClient(
        timeout=5.0,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
    )
    headers = {"x-api-key": args.api_key}

    @broker.subscriber(
        RabbitQueue(args.queue, declare=False), channel=Channel(prefetch_count=concurrency)
    )
    async def handle(body: dict[str, Any]) -> None:
        url, vendor_body = vendor_request(body, args.pabx_url)
        try:
            code: int | None = (await http.post(url, json=vendor_body, headers=headers)).status_code
        except httpx.HTTPError:
            code = None
        status = "accepted" if code == 200 else "failed"
        await broker.publish(
            peer_event(body, status, code),
            exchange=results,
            routing_key=_routing_key(status),
            correlation_id=body.get("command_id"),
            content_type=EVENT_CONTENT_TYPE,
            persist=True,
        )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with broker:
        await broker.start()
        await stop.wait()
    await http.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A peer consumer for the bench.")
    parser.add_argument("kind", choices=("pika", "faststream"))
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--results-exchange", required=True)
    parser.add_argument("--pabx-url", required=True)
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-confirm", dest="confirm", action="store_false")
    args = parser.parse_args(argv)
    if args.kind == "pika":
        run_pika(args)
    else:
        asyncio.run(run_faststream(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
