"""The pika peer of a test: publishes commands, reads outcome events and other queues."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import pika

from worker.settings import Settings

__all__ = ["Peer", "Seen"]


@dataclass
class Peer:
    """A pika client: publishes commands and reads results, parked and unrouted messages."""

    settings: Settings
    connection: pika.BlockingConnection
    channel: Any
    results_queue: str = ""
    seen: list[tuple[Any, dict[str, Any]]] = field(default_factory=list)

    def publish(self, body: bytes | dict[str, Any], **props: Any) -> None:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        props.setdefault("content_type", "application/json")
        props.setdefault("delivery_mode", 2)
        self.channel.basic_publish(
            self.settings.commands_exchange,
            self.settings.routing_key,
            raw,
            pika.BasicProperties(**props),
            mandatory=True,
        )

    def events(self, count: int, timeout: float = 15.0) -> list[tuple[Any, dict[str, Any]]]:
        """Wait for ``count`` outcome events in all (properties, event)."""
        deadline = time.monotonic() + timeout
        while len(self.seen) < count and time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(self.results_queue, auto_ack=True)
            if method is None:
                self.connection.sleep(0.05)
                continue
            self.seen.append((props, json.loads(body)))
        return list(self.seen)

    def drain(self, queue: str, count: int, timeout: float = 10.0) -> list[tuple[Any, bytes]]:
        got: list[tuple[Any, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(queue, auto_ack=True)
            if method is None:
                self.connection.sleep(0.05)
                continue
            got.append((props, body))
        return got

    def queue_length(self, queue: str) -> int:
        return int(self.channel.queue_declare(queue, passive=True).method.message_count)


@dataclass
class Seen:
    """One outcome event as received."""

    event: dict[str, Any]
    properties: Any
    raw: bytes
    at: float
