"""The idempotency store contract shared by every backend.

Per command id the store keeps: the body fingerprint, when it was first seen,
a lease (owner token and expiry) while a worker handles it, how many PABX
requests were marked sent, the call it redirects, and the outcome event once
there is one::

    (none) --claim--> claimed --mark_sent--> sent --record--> done
                       ^ |   ^                 |                |
                       | |   +-----renew-------+                |
                       | +------release--------+--> released    |
                       |                        (retry queue)   |
                       +-------------------reopen---------------+

**Leases and fencing.** A claim hands out a lease token. Every later step
(``mark_sent``, ``renew``, ``record``, ``release``) carries it and does nothing
unless the token is still the record's own: a worker whose lease lapsed and was
taken over can neither send nor record. A lease that lapses without an outcome
lets another worker take the command over (``TAKEOVER`` after a send: a worker
died, and the PABX may or may not have seen it).

**Attempts** are the store's own count: ``mark_sent`` adds one and returns the
new count, so an outcome built from it is never below what the PABX received.

**Per-call record** (SPEC §5, order per call). A call is (``pabx``,
``ID_CHAMADA``), given as :class:`CallRef` with the command's place in the
call's issue order. ``mark_sent`` checks and updates it in the same atomic step:
the call is held by at most one command at a time (from ``mark_sent`` until that
command's ``record`` or ``release``, or until its lease lapses; ``renew``
extends both), and it remembers the newest command sent for it. A command older
than that one is ``SUPERSEDED``; another command holding the call makes it
``CALL_BUSY``. Neither counts as an attempt.

**Fleet rate limit.** ``reserve_slot`` hands out request slots per PABX target
spaced ``interval_s`` apart on the store's clock (one shared schedule for every
worker using the store) and returns how long the caller must wait for its slot.

**One round trip for the common case.** ``claim_and_send`` is ``claim`` followed,
when the claim takes the lease (``NEW`` or ``TAKEOVER``), by ``mark_sent`` with the new
token, in one atomic step of the backend (one transaction, one script). The pipeline
uses it when nothing has to happen between the two: no rate limit to wait for, no
deadline in doubt, a closed circuit.

``reopen`` takes a finished command back (an operator replays it): the outcome
is cleared and the caller holds a fresh lease, attempts kept, exactly as if it
had claimed it ``NEW``; the next ``record`` stores the new outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

__all__ = [
    "RETENTION_S",
    "TAKEN",
    "CallRef",
    "Claim",
    "ClaimState",
    "Send",
    "SendState",
    "Store",
    "claim_then_send",
    "hold_until",
]

#: How long records are kept before purge may drop them (SPEC §5: at least 24 h).
RETENTION_S = 48 * 3600.0


class ClaimState(StrEnum):
    """What a claim found."""

    NEW = "new"  # first time, or back from a retry queue: ours now
    TAKEOVER = "takeover"  # a lease lapsed after a send: ours now, PABX may have it
    DONE = "done"  # an outcome is recorded: publish it again
    CONFLICT = "conflict"  # same id, different body
    BUSY = "busy"  # another worker holds a live lease


class SendState(StrEnum):
    """What :meth:`Store.mark_sent` found."""

    SENT = "sent"  # marked: the request may go out; attempts is the new count
    LEASE_LOST = "lease_lost"  # the token is not the record's any more, or it is done
    CALL_BUSY = "call_busy"  # another command of the same call may be in flight
    SUPERSEDED = "superseded"  # a newer command of the same call was already sent


@dataclass(frozen=True)
class CallRef:
    """The call a command redirects and the command's place in that call's issue order."""

    #: ``"{pabx}:{ID_CHAMADA}"``; target names contain no ``:``.
    key: str
    #: Issue time in epoch seconds (``issued_at``, AMQP timestamp, or first seen).
    order: float


@dataclass(frozen=True)
class Send:
    """The answer to :meth:`Store.mark_sent`."""

    state: SendState
    #: SENT: the store's request count for the command, this one included.
    attempts: int = 0
    #: SUPERSEDED: the newer command already sent for the call.
    newer: str | None = None
    #: CALL_BUSY: when the other command's hold on the call lapses (store clock, caller's now).
    busy_until: float | None = None


@dataclass(frozen=True)
class Claim:
    """The answer to :meth:`Store.claim`."""

    state: ClaimState
    first_seen: float
    attempts: int = 0
    token: str | None = None
    outcome: bytes | None = None
    lease_until: float | None = None


#: Claim states that hand the caller the lease.
TAKEN = frozenset({ClaimState.NEW, ClaimState.TAKEOVER})


class Store(Protocol):
    """Durable idempotency records; every method raises StoreError when the backend fails."""

    def claim(
        self,
        command_id: str,
        fingerprint: str,
        *,
        now: float,
        lease_s: float,
        token: str | None = None,
    ) -> Claim:
        """Take the command id for this worker, or say why not.

        ``token`` (default: a fresh one) becomes the lease token. A claim repeated with
        the token that already holds the lease (its first answer was lost in a store
        outage) takes the lease again (``NEW``, attempts kept) instead of finding it
        ``BUSY``.
        """
        ...

    def claim_and_send(
        self,
        command_id: str,
        fingerprint: str,
        call: CallRef | None,
        *,
        now: float,
        lease_s: float,
        token: str,
    ) -> tuple[Claim, Send | None]:
        """:meth:`claim`, then, if that took the lease (``NEW``/``TAKEOVER``), :meth:`mark_sent`
        with ``token`` and ``call``, as one atomic step; the send is None when the claim did
        not take the lease. Whatever the send finds, the claim stands (the lease is held)."""
        ...

    def mark_sent(
        self, command_id: str, token: str, call: CallRef | None, *, now: float, lease_s: float
    ) -> Send:
        """Atomically: check the lease and the call, then count one request as sent.

        ``LEASE_LOST`` unless ``token`` is the record's and no outcome is stored.
        With ``call``: ``SUPERSEDED`` (``newer`` set) when the call's newest sent
        command is another one whose order is greater than ``call.order``;
        ``CALL_BUSY`` (``busy_until`` set) when another command holds the call with
        an unlapsed lease. Otherwise the command holds the call until ``now + lease_s``
        and becomes the call's newest sent command unless an equal-or-newer one is
        already recorded there. Then attempts += 1, state ``sent``, lease renewed to
        ``now + lease_s``; returns ``SENT`` with the new count. Only ``SENT`` changes
        anything.
        """
        ...

    def renew(self, command_id: str, token: str, *, now: float, lease_s: float) -> bool:
        """Extend a held lease (and the command's hold on its call) to ``now + lease_s``.

        False, changing nothing, when the token is not the record's or it is done.
        """
        ...

    def record(
        self, command_id: str, token: str, outcome: bytes, *, now: float, hold_call_s: float = 0.0
    ) -> bytes | None:
        """Store the outcome if ``token`` still holds the lease; returns what is stored.

        An outcome already stored wins and is returned whatever the token. Without
        one, a stale token stores nothing and returns ``None`` (the lease was lost).
        Storing also lets go of the command's hold on its call, or, with
        ``hold_call_s`` > 0, keeps it until ``now + hold_call_s`` (a request that got
        no answer may still be under way at the PABX). A record that is gone (purged)
        stores nothing and returns ``outcome``.
        """
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

    def release(self, command_id: str, token: str, *, now: float, hold_call_s: float = 0.0) -> None:
        """Give up the lease and the hold on the call, without an outcome (retry queue).

        ``hold_call_s`` > 0 keeps the hold on the call until ``now + hold_call_s``, as
        for :meth:`record`. Does nothing unless ``token`` is the record's and no
        outcome is stored.
        """
        ...

    def reserve_slot(self, target: str, *, interval_s: float) -> float:
        """Reserve the next request slot for ``target``; returns seconds to wait for it.

        Slots are ``interval_s`` apart on the store's own clock, shared by every
        process using the store: slot = max(store_now, next); next = slot + interval_s;
        returns slot - store_now (0 when the slot is now). A reserved slot is used up
        even if the caller then sends nothing.
        """
        ...

    def purge(self, *, older_than: float) -> int:
        """Drop command and call records last touched before ``older_than``; returns how many.

        Counts command records only.
        """
        ...

    def ping(self) -> None:
        """Raise StoreError unless the backend answers."""
        ...

    def close(self) -> None: ...


def hold_until(now: float, hold_call_s: float) -> float:
    """Until when ``record``/``release`` keep holding the call (``now + hold_call_s``);
    0.0 lets go of it now."""
    return now + hold_call_s if hold_call_s > 0 else 0.0


def claim_then_send(
    store: Store,
    command_id: str,
    fingerprint: str,
    call: CallRef | None,
    *,
    now: float,
    lease_s: float,
    token: str,
) -> tuple[Claim, Send | None]:
    """:meth:`Store.claim_and_send` as two calls, for a backend without round trips to save.

    Same answers: a lease just taken cannot be lost between the two calls.
    """
    claim = store.claim(command_id, fingerprint, now=now, lease_s=lease_s, token=token)
    if claim.state not in TAKEN:
        return claim, None
    return claim, store.mark_sent(command_id, token, call, now=now, lease_s=lease_s)
