"""Private topologies: settings on unique names, so tests never share queues, and their
declaration and removal through pika (a different AMQP stack from the worker's)."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from tests.kit.samples import API_KEY, CHANNEL
from worker.contract.settings import Settings, load_settings
from worker.contract.topology import Topology

__all__ = ["declare", "delete", "private_names", "private_settings"]


def private_names(prefix: str) -> dict[str, str]:
    """Every topology name of the settings, under ``prefix``."""
    return {
        "commands_exchange": f"{prefix}.commands",
        "command_queue": f"{prefix}.redirect",
        "results_exchange": f"{prefix}.results",
        "unrouted_exchange": f"{prefix}.unrouted",
        "dead_exchange": f"{prefix}.dead",
        "parked_queue": f"{prefix}.parked",
        "retry_queue_prefix": f"{prefix}.retry",
    }


def private_settings(amqp_url: str, sim_url: str, **values: Any) -> Settings:
    """Settings on a private topology (unique names), so tests never share queues."""
    defaults: dict[str, Any] = {
        "amqp_url": amqp_url,
        "pabx_url": sim_url,
        "pabx_api_key": API_KEY,
        "pabx_channel_id": CHANNEL,
        "store_url": "memory://",
        "concurrency": 8,
        "http_port": 0,
        "retry_delays_s": (0.2, 0.5),
        "retry_in_process_max_wait_s": 0.05,
        "pabx_read_timeout_s": 1.0,
        "shutdown_timeout_s": 10.0,
        **private_names(f"t{uuid.uuid4().hex[:8]}"),
    }
    defaults.update(values)
    return load_settings(None, **defaults)


def declare(channel: Any, topology: Topology) -> None:
    """Declare every exchange, queue and binding of ``topology`` on a pika channel."""
    for ex in topology.exchanges:
        channel.exchange_declare(ex.name, ex.type, durable=True, arguments=ex.arguments)
    for q in topology.queues:
        channel.queue_declare(q.name, durable=True, arguments=q.arguments)
    for b in topology.bindings:
        channel.queue_bind(b.queue, b.exchange, b.routing_key)


def delete(
    channel: Any, topology: Topology, extra_queues: Iterable[str] = (), *, quiet: bool = False
) -> None:
    """Delete the queues of ``topology`` and ``extra_queues``, then its exchanges.

    ``quiet``: a step that fails (a queue already gone, the broker down) does not stop the rest.
    """
    queues = dict.fromkeys([*(q.name for q in topology.queues), *extra_queues])
    steps = [(channel.queue_delete, name) for name in queues]
    steps += [(channel.exchange_delete, ex.name) for ex in topology.exchanges]
    for step, name in steps:
        try:
            step(name)
        except Exception:
            if not quiet:
                raise
