"""The broker probe: when each command of a paced run reached a bare consumer.

With ``python -m bench --probe``, every paced run also routes its commands to a second
queue of the command queue's type, bound to the same exchange with the same routing key,
and this process consumes it: a pika ``BlockingConnection``, no acks (``auto_ack``), nothing
done per message but reading the clock. Its publish → delivery latency is what the broker
and the host give any consumer at that moment, so a slow worker request whose command also
reached the probe late was held up before the worker had it.

Usage (the bench starts it, see bench.scenarios.paced)::

    python -m bench.probe --amqp-url URL --exchange X --routing-key K --queue Q \
        --queue-type quorum|classic --out FILE

It declares ``Q`` and binds it, consumes until SIGTERM, then writes ``{message_id: epoch
seconds}`` as JSON to ``FILE`` and deletes ``Q``.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    import pika

    p = argparse.ArgumentParser(prog="python -m bench.probe")
    for name in ("--amqp-url", "--exchange", "--routing-key", "--queue", "--out"):
        p.add_argument(name, required=True)
    p.add_argument("--queue-type", choices=("quorum", "classic"), default="quorum")
    args = p.parse_args(argv)

    arrived: dict[str, float] = {}
    connection = pika.BlockingConnection(pika.URLParameters(args.amqp_url))
    channel = connection.channel()
    channel.queue_declare(args.queue, durable=True, arguments={"x-queue-type": args.queue_type})
    channel.queue_bind(args.queue, args.exchange, args.routing_key)

    def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
        arrived[str(properties.message_id)] = time.time()

    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))
    channel.basic_consume(args.queue, on_message, auto_ack=True)
    try:
        while not stopping:
            connection.process_data_events(time_limit=0.05)
    finally:
        Path(args.out).write_text(json.dumps(arrived))
        channel.queue_delete(args.queue)
        connection.close()


if __name__ == "__main__":
    main()
