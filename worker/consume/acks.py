"""Acks of one channel's deliveries, in as few frames as their order allows.

A delivery is acked once its outcome (and any copy of it) is confirmed by the broker.
Confirms come back in bursts, mostly in delivery order: :class:`Acks` collects the
deliveries ready to ack and, when the connection thread flushes it, answers the frames
to send: one ``basic.ack(multiple=True)`` for the run of ready deliveries at the front of
the channel's unsettled ones, then one ack each for ready ones behind a delivery still
being handled. ``multiple`` acks only what is unacked up to the tag on this channel, so
deliveries requeued earlier are skipped over, never acked.
"""

from __future__ import annotations

from collections import deque

__all__ = ["Acks"]


class Acks:
    """Unsettled deliveries of one channel and those ready to ack (connection thread only)."""

    def __init__(self) -> None:
        self._open: deque[int] = deque()  # unsettled here, in delivery order
        self._ready: set[int] = set()
        self._gone: set[int] = set()  # settled out of order, still somewhere in _open

    @property
    def waiting(self) -> bool:
        """Some delivery is ready to ack and was not flushed yet."""
        return bool(self._ready)

    def delivered(self, tag: int) -> None:
        self._open.append(tag)

    def ready(self, tag: int) -> None:
        """The delivery may be acked at the next :meth:`flush`."""
        self._ready.add(tag)

    def settled(self, tag: int) -> None:
        """The delivery was settled another way (rejected or requeued): never ack it."""
        self._ready.discard(tag)
        self._gone.add(tag)

    def flush(self) -> list[tuple[int, bool]]:
        """The acks to send now, as ``(delivery_tag, multiple)``; each ready delivery once."""
        if not self._ready:
            return []
        frames: list[tuple[int, bool]] = []
        last, count = 0, 0
        while self._open and (self._open[0] in self._ready or self._open[0] in self._gone):
            tag = self._open.popleft()
            if tag in self._gone:
                self._gone.remove(tag)
                continue
            self._ready.remove(tag)
            last, count = tag, count + 1
        if count:
            frames.append((last, count > 1))
        for tag in sorted(self._ready):  # behind a delivery still being handled
            frames.append((tag, False))
            self._gone.add(tag)
        self._ready.clear()
        return frames
