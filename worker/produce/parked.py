"""Parked commands (SPEC §5): look at them without consuming them, and replay them.

**Browsing** reads the whole parked queue with ``basic_get`` *without* acknowledging,
on one channel of its own, then closes that channel: the broker puts every message it
handed out back, in its original order, at the head of the queue. No message is
rejected one by one (which would put each back on its own and could reorder them), and
the whole queue is read even for ``--limit`` (a quorum queue puts a partial return
behind earlier returns, which would reorder it). The cost is memory: a browse holds
every parked message until it ends.
Two side effects remain, and both are the broker's: while a browse runs, the messages
it holds are invisible to other readers; and a quorum queue counts each browse as one
more delivery (``x-delivery-count`` grows, ``redelivered`` is set). ``pabx.parked``
has no ``x-delivery-limit``, so on RabbitMQ 3.x nothing is ever dropped for it; on
RabbitMQ 4.x, whose quorum queues default to a limit of 20, give the parked queue a
policy with ``delivery-limit`` ``-1``.

**Replay** reads the same way, and moves each message that matches the filters: it
publishes a clean copy to the commands exchange (routing key ``redirect``,
``mandatory``, publisher confirms) and acknowledges the parked copy only once that
publication is confirmed. A crash at any point loses nothing: what was not yet
acknowledged goes back to the parked queue when the connection drops. A message
caught between the confirm and the ack is in both queues; the worker's idempotency
store makes the second copy a duplicate.

**Discard** reads the same way and removes each matching message for good, but first
writes it to a JSON Lines archive (:mod:`worker.produce.archive`) and syncs that file; only
then is the message acknowledged. A crash loses nothing either: a message is gone from the
queue only once it is on disk; one caught between the write and the ack is in the archive
and still parked (a second run archives it again). **Export** writes what a browse reads.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.adapters.broker import broker_errors
from worker.contract import headers as hdr
from worker.contract.errors import BrokerError
from worker.contract.messages import Delivery, readable_command_id, replay_generation
from worker.produce.archive import ArchiveWriter, archive_record
from worker.produce.producer import Outgoing, Producer, raw_body

__all__ = [
    "DiscardReport",
    "ParkedFilter",
    "ParkedMessage",
    "ParkedQueue",
    "ReplayReport",
    "clean_headers",
    "masked_text",
    "parse_duration",
    "pretty_body",
    "replay_properties",
]

#: Headers a replayed copy loses: dead-letter bookkeeping and the worker's own.
STRIPPED_PREFIXES = ("x-death", "x-first-death-", "x-last-death-", "x-pabx-")
STRIPPED_HEADERS = frozenset({hdr.DELIVERY_COUNT})
#: Properties a replayed copy does not keep: ``user_id`` must match the replaying user.
DROPPED_PROPERTIES = frozenset({"application_headers", "delivery_mode", "user_id"})
_SECRET = re.compile(r'("SENHA_DISPOSITIVO"\s*:\s*)(?:"(?:[^"\\]|\\.)*"|[^,}\s]+)')
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``2h``, ``1d`` or ``1h30m``."""
    value = text.strip().lower()
    if _NUMBER.fullmatch(value):
        return float(value)
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"{text!r} is not a duration: use seconds, or e.g. 90s, 15m, 2h, 1d")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)


def clean_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The producer's headers, without dead-letter and attempt headers."""
    return {
        name: value
        for name, value in headers.items()
        if name not in STRIPPED_HEADERS and not name.startswith(STRIPPED_PREFIXES)
    }


def masked_text(body: bytes) -> str:
    """The body as text, with every ``SENHA_DISPOSITIVO`` value replaced by ``***``."""
    text = body.decode("utf-8", errors="replace")
    return _SECRET.sub(r'\1"***"', text)


def _as_datetime(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC)
    return None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


@dataclass(frozen=True)
class ParkedMessage:
    """One parked message as read from the queue, with why it is there."""

    position: int
    delivery_tag: int
    body: bytes
    properties: Mapping[str, Any]
    headers: Mapping[str, Any]
    command_id: str | None
    error_code: str
    reason: str
    status: str
    attempts: int | None
    parked_at: datetime | None

    @classmethod
    def from_amqp(cls, message: Any, position: int) -> ParkedMessage:
        """Describe a py-amqp message read from the parked queue."""
        props = dict(message.properties)
        headers = dict(props.pop("application_headers", None) or {})
        body = raw_body(message)
        delivery = Delivery(
            body=body,
            message_id=_text(props.get("message_id")) or None,
            correlation_id=_text(props.get("correlation_id")) or None,
        )
        code, reason, parked_at = _why(headers, props)
        attempts = headers.get(hdr.ATTEMPTS)
        return cls(
            position=position,
            delivery_tag=message.delivery_tag,
            body=body,
            properties=props,
            headers=headers,
            command_id=readable_command_id(delivery),
            error_code=code,
            reason=reason,
            status=_text(headers.get(hdr.STATUS)),
            attempts=attempts if isinstance(attempts, int) else None,
            parked_at=parked_at,
        )

    def age(self, now: datetime) -> float | None:
        """Seconds since it was parked, if known."""
        if self.parked_at is None:
            return None
        return max((now - self.parked_at).total_seconds(), 0.0)

    def summary(self, now: datetime) -> dict[str, Any]:
        """What ``parked list --json`` prints: no body, so no password."""
        return {
            "position": self.position,
            "command_id": self.command_id,
            "message_id": _text(self.properties.get("message_id")) or None,
            "correlation_id": _text(self.properties.get("correlation_id")) or None,
            "status": self.status or None,
            "error_code": self.error_code,
            "reason": self.reason,
            "attempts": self.attempts,
            "parked_at": self.parked_at.isoformat() if self.parked_at else None,
            "age_s": self.age(now),
        }


def _why(headers: Mapping[str, Any], props: Mapping[str, Any]) -> tuple[str, str, datetime | None]:
    """Error code, reason and time of parking: the worker's headers, else the broker's."""
    if hdr.ERROR_CODE in headers:
        parked_at = _as_datetime(headers.get(hdr.PARKED_AT))
        return _text(headers[hdr.ERROR_CODE]), _text(headers.get(hdr.ERROR)), parked_at
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        death = deaths[0]
        reason = _text(death.get("reason")) or "unknown"
        where = _text(death.get("queue"))
        return (
            f"dlx_{reason}",
            f"dead-lettered by the broker ({reason}) from {where}",
            (_as_datetime(death.get("time"))),
        )
    return "unknown", "no x-pabx-error-code or x-death header", _as_datetime(props.get("timestamp"))


def replay_properties(message: ParkedMessage) -> dict[str, Any]:
    """The properties of the copy sent back: the producer's own, headers cleaned."""
    props = {k: v for k, v in message.properties.items() if k not in DROPPED_PROPERTIES}
    headers = clean_headers(message.headers)
    # A new generation: the worker may send a command again whose outcome was not accepted.
    headers[hdr.REPLAY] = replay_generation(message.headers) + 1
    props["application_headers"] = headers
    return props


@dataclass(frozen=True)
class ParkedFilter:
    """Which parked messages a command applies to; empty matches all."""

    codes: frozenset[str] = frozenset()
    older_than_s: float | None = None
    newer_than_s: float | None = None

    def matches(self, message: ParkedMessage, now: datetime) -> bool:
        if self.codes and message.error_code not in self.codes:
            return False
        if self.older_than_s is None and self.newer_than_s is None:
            return True
        age = message.age(now)
        if age is None:  # unknown age: no age filter can vouch for it
            return False
        if self.older_than_s is not None and age < self.older_than_s:
            return False
        return self.newer_than_s is None or age <= self.newer_than_s


@dataclass
class _Report:
    """What a pass over the parked queue looked at, picked and finished."""

    dry_run: bool
    scanned: int = 0
    selected: list[ParkedMessage] = field(default_factory=list)
    #: Why the pass stopped early (connection lost), else None.
    error: str | None = None

    @property
    def done(self) -> list[ParkedMessage]:
        """The selected messages the pass finished with."""
        raise NotImplementedError

    @property
    def ok(self) -> bool:
        finished = self.dry_run or len(self.done) == len(self.selected)
        return self.error is None and finished


@dataclass
class ReplayReport(_Report):
    """What a replay did."""

    replayed: list[ParkedMessage] = field(default_factory=list)
    failed: list[tuple[ParkedMessage, str]] = field(default_factory=list)

    @property
    def done(self) -> list[ParkedMessage]:
        return self.replayed


#: Called for each message replayed (``ok``) or not, with the reason.
OnReplayed = Callable[[ParkedMessage, bool, str | None], None]


@dataclass
class DiscardReport(_Report):
    """What a discard did."""

    #: Archived, then acknowledged: gone from the queue.
    discarded: list[ParkedMessage] = field(default_factory=list)

    @property
    def done(self) -> list[ParkedMessage]:
        return self.discarded


class ParkedQueue:
    """The parked queue of a topology, read through a :class:`~worker.produce.producer.Producer`."""

    def __init__(self, producer: Producer, queue: str | None = None) -> None:
        self._producer = producer
        self.queue = queue or producer.settings.parked_queue

    def depth(self) -> int:
        """Messages ready in the parked queue."""
        channel = self._channel()
        try:
            return self._depth(channel)
        finally:
            _close(channel)

    def browse(
        self, *, where: ParkedFilter | None = None, limit: int | None = None
    ) -> tuple[int, list[ParkedMessage]]:
        """``(depth, matching messages)``, reading without consuming (see the module doc)."""
        where = where or ParkedFilter()
        now = datetime.now(UTC)
        found: list[ParkedMessage] = []
        channel = self._channel()
        try:
            depth = self._depth(channel)
            for message in self._read(channel, depth):  # all of them: see _read
                if where.matches(message, now) and (limit is None or len(found) < limit):
                    found.append(message)
        finally:
            _close(channel)
        return depth, found

    def replay(
        self,
        *,
        where: ParkedFilter | None = None,
        limit: int | None = None,
        rate: float | None = None,
        dry_run: bool = False,
        on_replayed: OnReplayed | None = None,
    ) -> ReplayReport:
        """Move matching messages back to the commands exchange; ack each once confirmed."""
        report = ReplayReport(dry_run=dry_run)
        channel = self._channel()
        try:
            outgoing = self._select(channel, where or ParkedFilter(), limit, report)
            if dry_run:
                for _ in outgoing:
                    pass
                return report

            def settled(message: Outgoing, ok: bool, reason: str | None) -> None:
                parked: ParkedMessage = message.context
                if ok:
                    channel.basic_ack(parked.delivery_tag)
                    report.replayed.append(parked)
                else:
                    report.failed.append((parked, reason or "not confirmed"))
                if on_replayed is not None:
                    on_replayed(parked, ok, reason)

            published = self._producer.publish_messages(outgoing, rate=rate, on_settled=settled)
            report.error = published.error
            report.failed += [(o.context, "not confirmed") for o in published.unsettled]
        finally:
            _close(channel)  # whatever was not acked goes back to the parked queue
        return report

    def discard(
        self,
        archive: ArchiveWriter | None,
        *,
        where: ParkedFilter | None = None,
        limit: int | None = None,
        rate: float | None = None,
        dry_run: bool = False,
        on_discarded: Callable[[ParkedMessage], None] | None = None,
    ) -> DiscardReport:
        """Archive, then ack, each matching message (``archive`` may be None for a dry run)."""
        report = DiscardReport(dry_run=dry_run)
        where = where or ParkedFilter()
        now = datetime.now(UTC)
        channel = self._channel()
        try:
            for message in self._read(channel, self._depth(channel)):  # all: see _read
                report.scanned += 1
                if not where.matches(message, now):
                    continue
                if limit is not None and len(report.selected) >= limit:
                    continue
                report.selected.append(message)
                if dry_run or archive is None:
                    continue
                if rate is not None and report.discarded:
                    self._producer.idle(1 / rate)
                archive.write(archive_record(message, datetime.now(UTC)))
                archive.sync()  # on disk before the ack, never after
                with broker_errors():
                    channel.basic_ack(message.delivery_tag)
                report.discarded.append(message)
                if on_discarded is not None:
                    on_discarded(message)
        except BrokerError as exc:
            report.error = str(exc)
        finally:
            _close(channel)  # whatever was not acked goes back to the parked queue
        return report

    def export(
        self, out: ArchiveWriter, *, where: ParkedFilter | None = None, limit: int | None = None
    ) -> tuple[int, int]:
        """Write matching messages as JSON Lines without consuming them: ``(depth, written)``.

        Each line is written as its message is read, while the browse still holds them all:
        a crash midway returns every message to the queue, in order, like a finished browse.
        """
        where = where or ParkedFilter()
        now = datetime.now(UTC)
        written = 0
        channel = self._channel()
        try:
            depth = self._depth(channel)
            for message in self._read(channel, depth):  # all of them: see _read
                if where.matches(message, now) and (limit is None or written < limit):
                    out.write(archive_record(message, now))
                    written += 1
            out.sync()
        finally:
            _close(channel)
        return depth, written

    def _select(
        self, channel: Any, where: ParkedFilter, limit: int | None, report: ReplayReport
    ) -> Iterator[Outgoing]:
        now = datetime.now(UTC)
        for message in self._read(channel, self._depth(channel)):  # all of them: see _read
            report.scanned += 1
            if not where.matches(message, now):
                continue
            if limit is not None and len(report.selected) >= limit:
                continue
            report.selected.append(message)
            yield Outgoing(message.body, replay_properties(message), context=message)

    def _channel(self) -> Any:
        channel = self._producer.channel()
        channel.auto_decode = False  # bodies exactly as parked, whatever their encoding
        return channel

    def _depth(self, channel: Any) -> int:
        with broker_errors():
            _, count, _ = channel.queue_declare(self.queue, passive=True)
        return int(count)

    def _read(self, channel: Any, at_most: int) -> Iterator[ParkedMessage]:
        """Up to ``at_most`` messages, unacknowledged; bounded so new arrivals cannot loop.

        Callers read the whole queue even when they want fewer messages: a quorum queue
        puts returned messages behind those returned before, so returning only the first
        few of a queue that was browsed earlier would move them behind the others.
        Returned all together, they keep their order.
        """
        for position in range(1, at_most + 1):
            with broker_errors():
                message = channel.basic_get(self.queue, no_ack=False)
            if message is None:
                return
            yield ParkedMessage.from_amqp(message, position)


def _close(channel: Any) -> None:
    with contextlib.suppress(Exception):  # a dead connection returns the messages anyway
        channel.close()


def pretty_body(body: bytes) -> str:
    """The body for people: indented JSON when it is JSON, passwords masked."""
    text = masked_text(body)
    with contextlib.suppress(ValueError):
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    return text
