"""An in-memory store for fast tests and the reference behaviour of the contract."""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

from worker.store.base import Claim, ClaimState

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


class MemoryStore:
    """Dictionary-backed :class:`~worker.store.base.Store`; thread-safe, not durable."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def claim(self, command_id: str, fingerprint: str, *, now: float, lease_s: float) -> Claim:
        with self._lock:
            record = self._records.get(command_id)
            if record is None:
                record = _Record(fingerprint=fingerprint, first_seen=now, updated_at=now)
                self._records[command_id] = record
                return self._take(record, ClaimState.NEW, now, lease_s)
            if record.fingerprint != fingerprint:
                return Claim(ClaimState.CONFLICT, record.first_seen, record.attempts)
            return self._claim_existing(record, now, lease_s)

    def reopen(self, command_id: str, outcome: bytes, *, now: float, lease_s: float) -> Claim:
        with self._lock:
            record = self._records.get(command_id)
            if record is None:  # never seen or purged: nothing to take back
                return Claim(ClaimState.CONFLICT, now)
            if record.outcome is not None and record.outcome == outcome:
                record.outcome = None
                return self._take(record, ClaimState.NEW, now, lease_s)
            return self._claim_existing(record, now, lease_s)

    def _claim_existing(self, record: _Record, now: float, lease_s: float) -> Claim:
        """What a claim with the record's own fingerprint finds (caller holds the lock)."""
        if record.outcome is not None:
            return Claim(ClaimState.DONE, record.first_seen, record.attempts, None, record.outcome)
        if record.state != "released" and record.lease_until > now:
            return Claim(
                ClaimState.BUSY,
                record.first_seen,
                record.attempts,
                lease_until=record.lease_until,
            )
        state = ClaimState.TAKEOVER if record.state == "sent" else ClaimState.NEW
        return self._take(record, state, now, lease_s)

    @staticmethod
    def _take(record: _Record, state: ClaimState, now: float, lease_s: float) -> Claim:
        record.state = "claimed"
        record.token = uuid.uuid4().hex
        record.lease_until = now + lease_s
        record.updated_at = now
        return Claim(state, record.first_seen, record.attempts, record.token)

    def mark_sent(
        self, command_id: str, token: str, attempts: int, *, now: float, lease_s: float
    ) -> bool:
        with self._lock:
            record = self._records.get(command_id)
            if record is None or record.token != token or record.outcome is not None:
                return False
            record.state, record.attempts = "sent", attempts
            record.lease_until = now + lease_s
            record.updated_at = now
            return True

    def record(self, command_id: str, token: str, outcome: bytes, attempts: int) -> bytes:
        with self._lock:
            record = self._records.get(command_id)
            if record is None:  # purged meanwhile: nothing to keep it in
                return outcome
            if record.outcome is None:
                record.state, record.outcome, record.token = "done", outcome, None
                record.attempts = max(record.attempts, attempts)
            return record.outcome

    def release(self, command_id: str, token: str, attempts: int) -> None:
        with self._lock:
            record = self._records.get(command_id)
            if record is not None and record.token == token and record.outcome is None:
                record.state, record.token = "released", None
                record.attempts = max(record.attempts, attempts)

    def purge(self, *, older_than: float) -> int:
        with self._lock:
            old = [k for k, r in self._records.items() if r.updated_at < older_than]
            for key in old:
                del self._records[key]
            return len(old)

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None
