"""The idempotency store contract shared by every backend.

Per command id the store keeps: the body fingerprint, when it was first seen,
a lease (owner token and expiry) while a worker handles it, how many PABX
requests were made, and the outcome event once there is one::

    (none) --claim--> claimed --mark_sent--> sent --record--> done
                       ^ |                     |                |
                       | +------release--------+--> released    |
                       |                        (retry queue)   |
                       +-------------------reopen---------------+

A lease that lapses without an outcome lets another worker take the command
over (``TAKEOVER``): a worker died, and the PABX may or may not have seen it.

``reopen`` takes a finished command back (an operator replays it): the outcome
is cleared and the caller holds a fresh lease, attempts kept, exactly as if it
had claimed it ``NEW``; the next ``record`` stores the new outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

__all__ = ["RETENTION_S", "Claim", "ClaimState", "Store"]

#: How long records are kept before purge may drop them (SPEC §5: at least 24 h).
RETENTION_S = 48 * 3600.0


class ClaimState(StrEnum):
    """What a claim found."""

    NEW = "new"  # first time, or back from a retry queue: ours now
    TAKEOVER = "takeover"  # a lease lapsed after a send: ours now, PABX may have it
    DONE = "done"  # an outcome is recorded: publish it again
    CONFLICT = "conflict"  # same id, different body
    BUSY = "busy"  # another worker holds a live lease


@dataclass(frozen=True)
class Claim:
    """The answer to :meth:`Store.claim`."""

    state: ClaimState
    first_seen: float
    attempts: int = 0
    token: str | None = None
    outcome: bytes | None = None
    lease_until: float | None = None


class Store(Protocol):
    """Durable idempotency records; every method raises StoreError when the backend fails."""

    def claim(self, command_id: str, fingerprint: str, *, now: float, lease_s: float) -> Claim:
        """Take the command id for this worker, or say why not."""
        ...

    def mark_sent(
        self, command_id: str, token: str, attempts: int, *, now: float, lease_s: float
    ) -> bool:
        """Record that a PABX request is about to go out and renew the lease."""
        ...

    def record(self, command_id: str, token: str, outcome: bytes, attempts: int) -> bytes:
        """Store the outcome; returns the outcome now stored (an earlier one wins)."""
        ...

    def reopen(self, command_id: str, outcome: bytes, *, now: float, lease_s: float) -> Claim:
        """Take back a finished command so it can be sent again (an operator replayed it).

        Atomically: if the stored outcome is exactly ``outcome``, clear it and claim the
        command for this caller (state claimed, fresh token, lease ``now + lease_s``,
        attempts kept) and return ``Claim(NEW, first_seen, attempts, token)``. Otherwise
        return, and do, what :meth:`claim` would for the stored record's own fingerprint:
        ``DONE`` with the newer outcome, ``BUSY`` while another replay holds a live lease,
        ``NEW``/``TAKEOVER`` (lease taken) once that replay released it or its lease lapsed.
        An unknown id (never seen, or purged) creates nothing and returns
        ``Claim(CONFLICT, now)``: the caller treats it as a conflict.
        """
        ...

    def release(self, command_id: str, token: str, attempts: int) -> None:
        """Give up the lease without an outcome (the command waits in a retry queue)."""
        ...

    def purge(self, *, older_than: float) -> int:
        """Drop records last touched before ``older_than``; returns how many."""
        ...

    def ping(self) -> None:
        """Raise StoreError unless the backend answers."""
        ...

    def close(self) -> None: ...
