"""SQLite idempotency store: the default, for one host.

WAL journal with ``synchronous=NORMAL``: every commit survives a crash of the
process (``kill -9``) because it is in the WAL before the call returns; a power
loss may roll back the last commits, which at worst lets a command that was
"sent" be sent again (at-least-once toward the PABX). ``FULL`` would close
that window at the price of an fsync per state change.
"""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from worker.errors import StoreError
from worker.store.base import Claim, ClaimState

__all__ = ["SqliteStore"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pabx_commands (
    command_id  TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    first_seen  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    state       TEXT NOT NULL,
    token       TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    attempts    INTEGER NOT NULL DEFAULT 0,
    outcome     BLOB
);
CREATE INDEX IF NOT EXISTS pabx_commands_updated ON pabx_commands (updated_at);
"""


class SqliteStore:
    """:class:`~worker.store.base.Store` on one SQLite file shared by threads and processes."""

    def __init__(self, path: str | Path) -> None:
        try:
            self._db = sqlite3.connect(
                str(path), timeout=30.0, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {path}: {exc}") from exc
        self._lock = threading.Lock()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store: {exc}") from exc

    @contextmanager
    def _statement(self) -> Iterator[sqlite3.Connection]:
        """One statement in autocommit: atomic on its own, without BEGIN/COMMIT round trips."""
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite store: {exc}") from exc

    def claim(self, command_id: str, fingerprint: str, *, now: float, lease_s: float) -> Claim:
        token = uuid.uuid4().hex
        with self._statement() as db:  # the common case, a new id: one statement
            inserted = db.execute(
                "INSERT INTO pabx_commands (command_id, fingerprint, first_seen, updated_at,"
                " state, token, lease_until) VALUES (?, ?, ?, ?, 'claimed', ?, ?)"
                " ON CONFLICT (command_id) DO NOTHING",
                (command_id, fingerprint, now, now, token, now + lease_s),
            ).rowcount
        if inserted == 1:
            return Claim(ClaimState.NEW, now, 0, token)
        with self._transaction() as db:
            row = db.execute(
                "SELECT fingerprint, first_seen, state, lease_until, attempts, outcome"
                " FROM pabx_commands WHERE command_id = ?",
                (command_id,),
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO pabx_commands (command_id, fingerprint, first_seen, updated_at,"
                    " state, token, lease_until) VALUES (?, ?, ?, ?, 'claimed', ?, ?)",
                    (command_id, fingerprint, now, now, token, now + lease_s),
                )
                return Claim(ClaimState.NEW, now, 0, token)
            if row[0] != fingerprint:
                return Claim(ClaimState.CONFLICT, row[1], row[4])
            return self._claim_existing(db, row, command_id, token, now, lease_s)

    def reopen(self, command_id: str, outcome: bytes, *, now: float, lease_s: float) -> Claim:
        token = uuid.uuid4().hex
        with self._transaction() as db:  # BEGIN IMMEDIATE: one writer from read to update
            row = db.execute(
                "SELECT fingerprint, first_seen, state, lease_until, attempts, outcome"
                " FROM pabx_commands WHERE command_id = ?",
                (command_id,),
            ).fetchone()
            if row is None:  # never seen or purged: nothing to take back
                return Claim(ClaimState.CONFLICT, now)
            _, first_seen, _, _, attempts, stored = row
            if stored is not None and bytes(stored) == outcome:
                db.execute(
                    "UPDATE pabx_commands SET state = 'claimed', outcome = NULL, token = ?,"
                    " lease_until = ?, updated_at = ? WHERE command_id = ?",
                    (token, now + lease_s, now, command_id),
                )
                return Claim(ClaimState.NEW, first_seen, attempts, token)
            return self._claim_existing(db, row, command_id, token, now, lease_s)

    @staticmethod
    def _claim_existing(
        db: sqlite3.Connection,
        row: tuple[Any, ...],
        command_id: str,
        token: str,
        now: float,
        lease_s: float,
    ) -> Claim:
        """What a claim with the row's own fingerprint finds (inside the transaction)."""
        _, first_seen, state, lease_until, attempts, outcome = row
        if outcome is not None:
            return Claim(ClaimState.DONE, first_seen, attempts, outcome=bytes(outcome))
        if state != "released" and lease_until > now:
            return Claim(ClaimState.BUSY, first_seen, attempts, lease_until=lease_until)
        db.execute(
            "UPDATE pabx_commands SET state = 'claimed', token = ?, lease_until = ?,"
            " updated_at = ? WHERE command_id = ?",
            (token, now + lease_s, now, command_id),
        )
        kind = ClaimState.TAKEOVER if state == "sent" else ClaimState.NEW
        return Claim(kind, first_seen, attempts, token)

    def mark_sent(
        self, command_id: str, token: str, attempts: int, *, now: float, lease_s: float
    ) -> bool:
        with self._statement() as db:
            cursor = db.execute(
                "UPDATE pabx_commands SET state = 'sent', attempts = ?, lease_until = ?,"
                " updated_at = ? WHERE command_id = ? AND token = ? AND outcome IS NULL",
                (attempts, now + lease_s, now, command_id, token),
            )
            return cursor.rowcount == 1

    def record(self, command_id: str, token: str, outcome: bytes, attempts: int) -> bytes:
        with self._statement() as db:
            stored = db.execute(
                "UPDATE pabx_commands SET state = 'done', outcome = ?, token = NULL,"
                " attempts = MAX(attempts, ?) WHERE command_id = ? AND outcome IS NULL",
                (outcome, attempts, command_id),
            ).rowcount
            if stored == 1:
                return outcome
            row = db.execute(
                "SELECT outcome FROM pabx_commands WHERE command_id = ?", (command_id,)
            ).fetchone()
        return bytes(row[0]) if row and row[0] is not None else outcome

    def release(self, command_id: str, token: str, attempts: int) -> None:
        with self._statement() as db:
            db.execute(
                "UPDATE pabx_commands SET state = 'released', token = NULL,"
                " attempts = MAX(attempts, ?) WHERE command_id = ? AND token = ?"
                " AND outcome IS NULL",
                (attempts, command_id, token),
            )

    def purge(self, *, older_than: float) -> int:
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM pabx_commands WHERE updated_at < ?", (older_than,))
            return cursor.rowcount

    def ping(self) -> None:
        with self._transaction() as db:
            db.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock:
            self._db.close()
