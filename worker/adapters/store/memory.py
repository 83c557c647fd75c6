"""An in-memory store for fast tests and the reference behaviour of the contract."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from worker.adapters.store.base import CallRef, Claim, ClaimState, Send, SendState, claim_then_send

__all__ = ["MemoryStore"]


@dataclass
class _Record:
    fingerprint: str
    first_seen: float
    updated_at: float
    state: str = "claimed"
    token: str | None = None
    lease_until: float = 0.0
    attempts: int = 0
    outcome: bytes | None = None
    call_key: str | None = None


@dataclass
class _Call:
    """The per-call record: who holds the call, and the newest command sent for it."""

    updated_at: float
    holder: str | None = None
    holder_until: float = 0.0
    newest: str | None = None
    newest_order: float = 0.0


class MemoryStore:
    """Dictionary-backed :class:`~worker.adapters.store.base.Store`; thread-safe, not durable."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._records: dict[str, _Record] = {}
        self._calls: dict[str, _Call] = {}
        self._slots: dict[str, float] = {}
        self._clock = clock
        self._lock = threading.Lock()

    def claim(
        self,
        command_id: str,
        fingerprint: str,
        *,
        now: float,
        lease_s: float,
        token: str | None = None,
    ) -> Claim:
        with self._lock:
            record = self._records.get(command_id)
            if record is None:
                record = _Record(fingerprint=fingerprint, first_seen=now, updated_at=now)
                self._records[command_id] = record
                return self._take(record, ClaimState.NEW, now, lease_s, token)
            if record.fingerprint != fingerprint:
                return Claim(ClaimState.CONFLICT, record.first_seen, record.attempts)
            return self._claim_existing(record, now, lease_s, token)

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
        return claim_then_send(
            self, command_id, fingerprint, call, now=now, lease_s=lease_s, token=token
        )

    def reopen(self, command_id: str, outcome: bytes, *, now: float, lease_s: float) -> Claim:
        with self._lock:
            record = self._records.get(command_id)
            if record is None:  # never seen or purged: nothing to take back
                return Claim(ClaimState.CONFLICT, now)
            if record.outcome is not None and record.outcome == outcome:
                record.outcome = None
                return self._take(record, ClaimState.NEW, now, lease_s)
            return self._claim_existing(record, now, lease_s)

    def _claim_existing(
        self, record: _Record, now: float, lease_s: float, token: str | None = None
    ) -> Claim:
        """What a claim with the record's own fingerprint finds (caller holds the lock)."""
        if record.outcome is not None:
            return Claim(ClaimState.DONE, record.first_seen, record.attempts, None, record.outcome)
        if token is not None and record.token == token:  # our own claim, repeated
            return self._take(record, ClaimState.NEW, now, lease_s, token)
        if record.state != "released" and record.lease_until > now:
            return Claim(
                ClaimState.BUSY,
                record.first_seen,
                record.attempts,
                lease_until=record.lease_until,
            )
        state = ClaimState.TAKEOVER if record.state == "sent" else ClaimState.NEW
        return self._take(record, state, now, lease_s, token)

    @staticmethod
    def _take(
        record: _Record, state: ClaimState, now: float, lease_s: float, token: str | None = None
    ) -> Claim:
        record.state = "claimed"
        record.token = token or uuid.uuid4().hex
        record.lease_until = now + lease_s
        record.updated_at = now
        return Claim(state, record.first_seen, record.attempts, record.token)

    def _held(self, command_id: str, token: str) -> _Record | None:
        """The record if ``token`` holds its lease and it has no outcome (lock held)."""
        record = self._records.get(command_id)
        if record is None or record.token != token or record.outcome is not None:
            return None
        return record

    def mark_sent(
        self, command_id: str, token: str, call: CallRef | None, *, now: float, lease_s: float
    ) -> Send:
        with self._lock:
            record = self._held(command_id, token)
            if record is None:
                return Send(SendState.LEASE_LOST)
            if call is not None:
                refused = self._take_call(command_id, call, now, lease_s)
                if refused is not None:
                    return refused
                record.call_key = call.key
            record.state = "sent"
            record.attempts += 1
            record.lease_until = now + lease_s
            record.updated_at = now
            return Send(SendState.SENT, record.attempts)

    def _take_call(self, command_id: str, call: CallRef, now: float, lease_s: float) -> Send | None:
        """Hold the call for ``command_id``, or say why not (lock held)."""
        state = self._calls.setdefault(call.key, _Call(updated_at=now))
        if state.newest not in (None, command_id) and state.newest_order > call.order:
            return Send(SendState.SUPERSEDED, newer=state.newest)
        if state.holder not in (None, command_id) and state.holder_until > now:
            return Send(SendState.CALL_BUSY, busy_until=state.holder_until)
        state.holder, state.holder_until, state.updated_at = command_id, now + lease_s, now
        if state.newest is None or call.order >= state.newest_order:
            state.newest, state.newest_order = command_id, call.order
        return None

    def renew(self, command_id: str, token: str, *, now: float, lease_s: float) -> bool:
        with self._lock:
            record = self._held(command_id, token)
            if record is None:
                return False
            record.lease_until = now + lease_s
            record.updated_at = now
            call = self._calls.get(record.call_key or "")
            if call is not None and call.holder == command_id:
                call.holder_until, call.updated_at = now + lease_s, now
            return True

    def _let_go_of_call(
        self, record: _Record, command_id: str, now: float, hold_call_s: float
    ) -> None:
        call = self._calls.get(record.call_key or "")
        if call is None or call.holder != command_id:
            return
        if hold_call_s > 0:
            call.holder_until, call.updated_at = now + hold_call_s, now
        else:
            call.holder, call.holder_until, call.updated_at = None, 0.0, now

    def record(
        self, command_id: str, token: str, outcome: bytes, *, now: float, hold_call_s: float = 0.0
    ) -> bytes | None:
        with self._lock:
            record = self._records.get(command_id)
            if record is None:  # purged meanwhile: nothing to keep it in
                return outcome
            if record.outcome is not None:
                return record.outcome
            if record.token != token:
                return None
            record.state, record.outcome, record.token = "done", outcome, None
            record.updated_at = now
            self._let_go_of_call(record, command_id, now, hold_call_s)
            return outcome

    def release(self, command_id: str, token: str, *, now: float, hold_call_s: float = 0.0) -> None:
        with self._lock:
            record = self._held(command_id, token)
            if record is not None:
                record.state, record.token, record.updated_at = "released", None, now
                self._let_go_of_call(record, command_id, now, hold_call_s)

    def reserve_slot(self, target: str, *, interval_s: float) -> float:
        with self._lock:
            now = self._clock()
            slot = max(now, self._slots.get(target, now))
            self._slots[target] = slot + interval_s
            return slot - now

    def purge(self, *, older_than: float) -> int:
        with self._lock:
            old = [k for k, r in self._records.items() if r.updated_at < older_than]
            for key in old:
                del self._records[key]
            for key in [k for k, c in self._calls.items() if c.updated_at < older_than]:
                del self._calls[key]
            return len(old)

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None
