"""Acks: which frames settle the confirmed deliveries of a channel."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.consume.acks import Acks


def _acks(*tags: int) -> Acks:
    acks = Acks()
    for tag in tags:
        acks.delivered(tag)
    return acks


def test_a_run_at_the_front_is_one_multiple_ack() -> None:
    acks = _acks(1, 2, 3, 4)
    for tag in (2, 1, 3):
        acks.ready(tag)
    assert acks.flush() == [(3, True)]
    acks.ready(4)
    assert acks.flush() == [(4, False)]
    assert acks.flush() == []


def test_ready_deliveries_behind_one_in_flight_are_acked_one_by_one() -> None:
    acks = _acks(1, 2, 3, 4)
    acks.ready(3)
    acks.ready(4)
    assert acks.flush() == [(3, False), (4, False)]
    acks.ready(1)
    acks.ready(2)
    assert acks.flush() == [(2, True)]  # 3 and 4 were acked already: not again


def test_a_requeued_delivery_is_skipped_never_acked() -> None:
    acks = _acks(1, 2, 3)
    acks.settled(2)  # rejected, requeued
    acks.ready(1)
    acks.ready(3)
    assert acks.flush() == [(3, True)]  # multiple acks only what is unacked: 1 and 3
    assert not acks.waiting


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 2)), min_size=1, max_size=60))
def test_every_ready_delivery_is_acked_exactly_once(steps: list[tuple[bool, int]]) -> None:
    """Simulate the broker: a multiple ack settles every unacked tag up to it."""
    tags = list(range(1, len(steps) + 1))
    acks = _acks(*tags)
    unacked = set(tags)
    acked: list[int] = []
    requeued: set[int] = set()
    order = sorted(tags, key=lambda t: (steps[t - 1][1], t))  # finish out of order
    for tag in order:
        ok, _ = steps[tag - 1]
        if ok:
            acks.ready(tag)
        else:
            acks.settled(tag)
            unacked.discard(tag)
            requeued.add(tag)
        for frame, multiple in acks.flush():
            assert frame in unacked, "an ack for a settled delivery closes the channel"
            covered = sorted(t for t in unacked if t <= frame) if multiple else [frame]
            for t in covered:
                unacked.discard(t)
                acked.append(t)
    assert sorted(acked) == sorted(set(tags) - requeued)
    assert len(acked) == len(set(acked))
    assert not unacked
