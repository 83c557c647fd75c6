"""The producer side: publish commands with confirms and wait for their outcomes.

Used by ``pabx-worker send`` and ``demo``; usable from any Python program::

    with Producer(settings) as producer:
        producer.publish([command_bytes], reply=True)
        outcome = producer.wait_outcomes({command_id}, timeout=10)
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from collections.abc import Iterable
from typing import Any

from kombu import Connection

from worker.consumer import _broker_call
from worker.errors import BrokerError
from worker.publisher import ConfirmingPublisher, Publication
from worker.settings import Settings
from worker.topology import Topology

__all__ = ["Producer"]


class Producer:
    """Publishes commands to ``pabx.commands`` and collects outcome events by correlation id."""

    def __init__(self, settings: Settings, *, declare: bool = True) -> None:
        self._settings = settings
        self._connection = Connection(settings.amqp_url, connect_timeout=5)
        _broker_call(self._connection.connect)
        if declare:
            _broker_call(
                Topology.from_settings(settings).declare, _broker_call(self._connection.channel)
            )
        self._failed: list[str] = []
        self._publisher = ConfirmingPublisher(
            _broker_call(self._connection.channel),
            on_return=lambda m: self._failed.append(m.properties.get("correlation_id", "?")),
        )
        self._reply_queue: str | None = None
        self._outcomes: dict[str, dict[str, Any]] = {}

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection
            self._connection.release()

    @property
    def reply_queue(self) -> str:
        """An exclusive queue receiving the outcomes of commands sent with ``reply=True``."""
        if self._reply_queue is None:
            channel = _broker_call(self._connection.channel)
            name, _, _ = channel.queue_declare("", exclusive=True, auto_delete=True)
            channel.basic_consume(name, callback=self._on_outcome, no_ack=True)
            self._reply_queue = name
        return self._reply_queue

    def publish(
        self, bodies: Iterable[tuple[bytes, str]], *, reply: bool = False, timeout: float = 30.0
    ) -> None:
        """Publish ``(body, correlation_id)`` pairs; returns once the broker confirmed all."""
        props: dict[str, Any] = {"content_type": "application/json"}
        if reply:
            props["reply_to"] = self.reply_queue
        outstanding = 0

        def confirmed(ok: bool, cid: str) -> None:
            nonlocal outstanding
            outstanding -= 1
            if not ok:
                self._failed.append(cid)

        for body, correlation_id in bodies:
            publication = Publication(
                body,
                self._settings.commands_exchange,
                self._settings.routing_key,
                {
                    **props,
                    "correlation_id": correlation_id,
                    "message_id": correlation_id,
                    "timestamp": int(time.time()),
                },
                mandatory=True,
            )
            _broker_call(
                self._publisher.publish,
                publication,
                lambda ok, cid=correlation_id: confirmed(ok, cid),
            )
            outstanding += 1
        self._drain_until(lambda: outstanding == 0, timeout)
        if self._failed:
            failed, self._failed = self._failed, []
            raise BrokerError(
                f"the broker refused or could not route {len(failed)} command(s): {failed[:5]}"
                f" (is a queue bound to {self._settings.commands_exchange!r}?)"
            )

    def wait_outcomes(self, correlation_ids: set[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Outcome events received for these ids within ``timeout`` seconds."""
        self._drain_until(lambda: correlation_ids <= self._outcomes.keys(), timeout)
        return {cid: self._outcomes[cid] for cid in correlation_ids if cid in self._outcomes}

    def _on_outcome(self, message: Any) -> None:
        cid = message.properties.get("correlation_id") or str(uuid.uuid4())
        self._outcomes[cid] = json.loads(message.body)

    def _drain_until(self, done: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                _broker_call(self._connection.drain_events, timeout=min(left, 0.2))
            except BrokerError as exc:
                if isinstance(exc.__cause__, TimeoutError | socket.timeout):
                    continue
                raise
