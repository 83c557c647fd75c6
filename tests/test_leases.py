"""The lease keeper renews what this process holds, and notices a takeover."""

from __future__ import annotations

import threading
import time

from worker.adapters.store.base import ClaimState
from worker.adapters.store.memory import MemoryStore
from worker.consume.leases import LeaseKeeper

NOW = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def test_held_leases_are_renewed_and_released_ones_are_not() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    keeper = LeaseKeeper(store, lease_s=30, clock=clock)
    held = store.claim("held", "fp", now=NOW, lease_s=30)
    done = store.claim("done", "fp", now=NOW, lease_s=30)
    with keeper.holding("held", held.token or ""):
        with keeper.holding("done", done.token or ""):
            pass
        clock.now += 20
        assert keeper.renew_all() == 0
    clock.now += 25  # 45 s after the claim: only the renewed lease still holds
    assert store.claim("held", "fp", now=clock.now, lease_s=30).state is ClaimState.BUSY
    assert store.claim("done", "fp", now=clock.now, lease_s=30).state is ClaimState.NEW


def test_a_lease_taken_over_is_reported_lost() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    keeper = LeaseKeeper(store, lease_s=30, clock=clock)
    mine = store.claim("c", "fp", now=NOW, lease_s=30)
    with keeper.holding("c", mine.token or ""):
        clock.now += 31
        assert store.claim("c", "fp", now=clock.now, lease_s=30).state is ClaimState.NEW
        assert keeper.renew_all() == 1


def test_the_keeper_thread_renews_on_its_own_and_stops() -> None:
    store = MemoryStore()
    keeper = LeaseKeeper(store, lease_s=0.3).start()

    claim = store.claim("c", "fp", now=time.time(), lease_s=0.3)
    with keeper.holding("c", claim.token or ""):
        time.sleep(0.8)  # more than two leases: only renewals keep it
        assert store.claim("c", "fp", now=time.time(), lease_s=0.3).state is ClaimState.BUSY
    keeper.stop()
    assert not any(t.name == "pabx-leases" for t in threading.enumerate())
