"""SQLite idempotency store: the default, for one host.

WAL journal with ``synchronous=NORMAL``: every commit survives a crash of the
process (``kill -9``) because it is in the WAL before the call returns; a power
loss may roll back the last commits, which at worst lets a command that was
"sent" be sent again (at-least-once toward the PABX). ``FULL`` would close
that window at the price of an fsync per state change.

Tables: ``pabx_commands`` (one row per command id; ``call_key`` names the call the
command holds or held), ``pabx_calls`` (the per-call record: ``holder`` and
``holder_until``, the ``newest`` command sent and its ``newest_order``,
``updated_at``) and ``pabx_slots`` (per PABX target, ``next_at``: the next free
request slot). A file written by the version before the per-call record gets the
``call_key`` column (``ALTER TABLE``) and the two new tables when it is opened.

A new command sent at once (``claim_and_send`` of an unknown id) is one ``INSERT`` of
the row as sent, with its call's issue order in ``call_order``; the trigger
``pabx_commands_sent_new`` takes the call in that statement, or aborts it when the call
is not free, and then the full ``BEGIN IMMEDIATE`` transaction decides as before.

Atomicity across threads and processes: every step is either one statement in
autocommit (a new claim, a new command sent at once, ``mark_sent`` without a call,
``record``, ``release``) or one
``BEGIN IMMEDIATE`` transaction, which takes the file's write lock before reading, so no
other connection can write between the read and the update. The trigger
``pabx_commands_let_go`` lets go of the call when ``record`` or ``release`` clears a
command's token, inside that statement. Fencing: ``mark_sent``,
``renew``, ``record`` and ``release`` change nothing unless the row's ``token`` is
the caller's and no outcome is stored; ``mark_sent`` checks and takes the call in
the same transaction, and ``record``/``release`` let go of the call in their statement.

Checkpoints: a thread of the store's own, on a connection of its own, copies the WAL
into the database file every :data:`CHECKPOINT_EVERY_S` (``PRAGMA wal_checkpoint(PASSIVE)``,
which never waits for a reader or a writer). Left to SQLite, the commit that takes the WAL
past 1000 pages would do it, holding up every step of the store behind it for a few
milliseconds several times a second at full rate; the store's own connection checkpoints
only past :data:`AUTOCHECKPOINT_PAGES`, should the thread ever fall that far behind.

Clocks: lease and call times are the caller's ``now``. ``reserve_slot`` uses this
host's clock (``time.time()``), read inside the ``BEGIN IMMEDIATE`` transaction so
the time a slot is reserved at is the time the writer lock was held; every user of
one SQLite file is a process on this host, so they share that clock.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from worker.adapters.store.base import TAKEN, CallRef, Claim, ClaimState, Send, SendState
from worker.contract.errors import StoreError

__all__ = ["AUTOCHECKPOINT_PAGES", "CHECKPOINT_EVERY_S", "SqliteStore"]

log = logging.getLogger("pabx_worker.store")

#: How often the checkpoint thread copies the WAL into the database file.
CHECKPOINT_EVERY_S = 0.5
#: The WAL size (pages) past which the committing connection checkpoints by itself.
AUTOCHECKPOINT_PAGES = 20_000

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
    outcome     BLOB,
    call_key    TEXT,
    call_order  REAL
);
CREATE INDEX IF NOT EXISTS pabx_commands_updated ON pabx_commands (updated_at);
CREATE TABLE IF NOT EXISTS pabx_calls (
    call_key     TEXT PRIMARY KEY,
    holder       TEXT,
    holder_until REAL NOT NULL DEFAULT 0,
    newest       TEXT,
    newest_order REAL NOT NULL DEFAULT 0,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pabx_calls_updated ON pabx_calls (updated_at);
CREATE TABLE IF NOT EXISTS pabx_slots (
    target  TEXT PRIMARY KEY,
    next_at REAL NOT NULL
);
CREATE TRIGGER IF NOT EXISTS pabx_commands_let_go
AFTER UPDATE OF token ON pabx_commands
WHEN OLD.token IS NOT NULL AND NEW.token IS NULL AND NEW.call_key IS NOT NULL
BEGIN
    UPDATE pabx_calls SET holder = NULL, holder_until = 0, updated_at = NEW.updated_at
    WHERE call_key = NEW.call_key AND holder = NEW.command_id;
END;
"""

#: What the trigger below raises when a new command's call is not free for it.
_CALL_NOT_FREE = "pabx: the call is not free for this command"

#: A new command inserted already sent (``call_order`` set, by :meth:`SqliteStore.claim_and_send`)
#: takes its call in the same statement, or aborts it when the call is held by another
#: command or a newer one was sent: exactly what ``_take_call`` would let through. Created
#: after the migration, which adds ``call_order`` to a file from before it.
_SENT_NEW_TRIGGER = f"""
CREATE TRIGGER IF NOT EXISTS pabx_commands_sent_new
AFTER INSERT ON pabx_commands
WHEN NEW.call_order IS NOT NULL
BEGIN
    SELECT RAISE(ABORT, '{_CALL_NOT_FREE}') WHERE EXISTS (
        SELECT 1 FROM pabx_calls WHERE call_key = NEW.call_key AND (
            (newest IS NOT NULL AND (newest = NEW.command_id OR newest_order > NEW.call_order))
            OR (holder IS NOT NULL AND holder <> NEW.command_id
                AND holder_until > NEW.updated_at)));
    INSERT INTO pabx_calls (call_key, holder, holder_until, newest, newest_order, updated_at)
    VALUES (NEW.call_key, NEW.command_id, NEW.lease_until, NEW.command_id, NEW.call_order,
            NEW.updated_at)
    ON CONFLICT (call_key) DO UPDATE SET holder = excluded.holder,
        holder_until = excluded.holder_until, newest = excluded.newest,
        newest_order = excluded.newest_order, updated_at = excluded.updated_at;
END;
"""


def _inserted(
    db: sqlite3.Connection,
    command_id: str,
    fingerprint: str,
    token: str,
    now: float,
    lease_s: float,
    sent_for: CallRef | None = None,
) -> bool:
    """Claim a new id (True), or find that it is there already (False, nothing changed).

    ``sent_for``: the row goes in already sent for that call (attempts 1, its issue order
    in ``call_order``), and the trigger ``pabx_commands_sent_new`` takes the call or
    aborts the statement (``sqlite3.IntegrityError`` naming :data:`_CALL_NOT_FREE`).
    """
    state, attempts, key, order = ("claimed", 0, None, None)
    if sent_for is not None:
        state, attempts, key, order = ("sent", 1, sent_for.key, sent_for.order)
    cursor = db.execute(
        "INSERT INTO pabx_commands (command_id, fingerprint, first_seen, updated_at,"
        " state, token, lease_until, attempts, call_key, call_order)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (command_id) DO NOTHING",
        (command_id, fingerprint, now, now, state, token, now + lease_s, attempts, key, order),
    )
    return cursor.rowcount == 1


class SqliteStore:
    """:class:`~worker.adapters.store.base.Store` on one SQLite file, for threads and processes."""

    def __init__(self, path: str | Path) -> None:
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                str(path), timeout=30.0, isolation_level=None, check_same_thread=False
            )
            journal = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT_PAGES}")
            self._db.executescript(_SCHEMA)
            #: None for a database without a WAL (``:memory:``).
            self._checkpoints = _Checkpoints(str(path)) if journal == "wal" else None
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite store {path}: {exc}") from exc
        with self._transaction() as db:  # one process migrates; the others then see the column
            columns = {row[1] for row in db.execute("PRAGMA table_info(pabx_commands)")}
            if "call_key" not in columns:  # a file from before the per-call record
                db.execute("ALTER TABLE pabx_commands ADD COLUMN call_key TEXT")
            if "call_order" not in columns:  # a file from before the one-statement send
                db.execute("ALTER TABLE pabx_commands ADD COLUMN call_order REAL")
            db.execute(_SENT_NEW_TRIGGER)

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

    def claim(
        self,
        command_id: str,
        fingerprint: str,
        *,
        now: float,
        lease_s: float,
        token: str | None = None,
    ) -> Claim:
        token = token or uuid.uuid4().hex
        with self._statement() as db:  # the common case, a new id: one statement
            if _inserted(db, command_id, fingerprint, token, now, lease_s):
                return Claim(ClaimState.NEW, now, 0, token)
        with self._transaction() as db:
            return self._claim_in(db, command_id, fingerprint, token, now, lease_s)

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
        if call is not None and self._sent_new(command_id, fingerprint, token, call, now, lease_s):
            return Claim(ClaimState.NEW, now, 0, token), Send(SendState.SENT, 1)
        with self._transaction() as db:  # one write transaction for both steps
            claim = self._claim_in(db, command_id, fingerprint, token, now, lease_s)
            if claim.state not in TAKEN:
                return claim, None
            return claim, self._mark_in(db, command_id, token, call, now, lease_s, held=True)

    def _sent_new(
        self,
        command_id: str,
        fingerprint: str,
        token: str,
        call: CallRef,
        now: float,
        lease_s: float,
    ) -> bool:
        """The common case of ``claim_and_send`` in one statement: a new id, its call free.

        True: inserted as sent (attempts 1), and the trigger took the call. False: nothing
        changed (the id is known, or the call is not free); the full transaction decides.
        One statement instead of six holds the store's lock, and gives the GIL away, far
        fewer times while the other threads wait.
        """
        with self._statement() as db:
            try:
                return _inserted(db, command_id, fingerprint, token, now, lease_s, sent_for=call)
            except sqlite3.IntegrityError as exc:
                if _CALL_NOT_FREE in str(exc):
                    return False
                raise

    def _claim_in(
        self,
        db: sqlite3.Connection,
        command_id: str,
        fingerprint: str,
        token: str,
        now: float,
        lease_s: float,
    ) -> Claim:
        """The claim, inside a transaction."""
        if _inserted(db, command_id, fingerprint, token, now, lease_s):
            return Claim(ClaimState.NEW, now, 0, token)
        row = db.execute(
            "SELECT fingerprint, first_seen, state, lease_until, attempts, outcome, token"
            " FROM pabx_commands WHERE command_id = ?",
            (command_id,),
        ).fetchone()
        if row[0] != fingerprint:
            return Claim(ClaimState.CONFLICT, row[1], row[4])
        return self._claim_existing(db, row, command_id, token, now, lease_s)

    def reopen(self, command_id: str, outcome: bytes, *, now: float, lease_s: float) -> Claim:
        token = uuid.uuid4().hex
        with self._transaction() as db:  # BEGIN IMMEDIATE: one writer from read to update
            row = db.execute(
                "SELECT fingerprint, first_seen, state, lease_until, attempts, outcome, token"
                " FROM pabx_commands WHERE command_id = ?",
                (command_id,),
            ).fetchone()
            if row is None:  # never seen or purged: nothing to take back
                return Claim(ClaimState.CONFLICT, now)
            _, first_seen, _, _, attempts, stored, _ = row
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
        _, first_seen, state, lease_until, attempts, outcome, held_by = row
        if outcome is not None:
            return Claim(ClaimState.DONE, first_seen, attempts, outcome=bytes(outcome))
        mine = held_by == token  # our own claim, repeated: take it again
        if not mine and state != "released" and lease_until > now:
            return Claim(ClaimState.BUSY, first_seen, attempts, lease_until=lease_until)
        db.execute(
            "UPDATE pabx_commands SET state = 'claimed', token = ?, lease_until = ?,"
            " updated_at = ? WHERE command_id = ?",
            (token, now + lease_s, now, command_id),
        )
        kind = ClaimState.TAKEOVER if state == "sent" and not mine else ClaimState.NEW
        return Claim(kind, first_seen, attempts, token)

    def mark_sent(
        self, command_id: str, token: str, call: CallRef | None, *, now: float, lease_s: float
    ) -> Send:
        if call is None:  # no call to check: one statement
            with self._statement() as db:
                rows = db.execute(
                    "UPDATE pabx_commands SET state = 'sent', attempts = attempts + 1,"
                    " lease_until = ?, updated_at = ?"
                    " WHERE command_id = ? AND token = ? AND outcome IS NULL RETURNING attempts",
                    (now + lease_s, now, command_id, token),
                ).fetchall()  # drained: the statement (and its autocommit) is finished
            return Send(SendState.SENT, rows[0][0]) if rows else Send(SendState.LEASE_LOST)
        with self._transaction() as db:
            return self._mark_in(db, command_id, token, call, now, lease_s)

    def _mark_in(
        self,
        db: sqlite3.Connection,
        command_id: str,
        token: str,
        call: CallRef | None,
        now: float,
        lease_s: float,
        *,
        held: bool = False,
    ) -> Send:
        """``mark_sent`` inside a transaction; ``held``: the lease was taken in this one."""
        if not held:
            row = db.execute(
                "SELECT 1 FROM pabx_commands"
                " WHERE command_id = ? AND token = ? AND outcome IS NULL",
                (command_id, token),
            ).fetchone()
            if row is None:
                return Send(SendState.LEASE_LOST)
        if call is not None:
            refused = self._take_call(db, command_id, call, now, now + lease_s)
            if refused is not None:
                return refused
        (attempts,) = db.execute(
            "UPDATE pabx_commands SET state = 'sent', attempts = attempts + 1,"
            " lease_until = ?, updated_at = ?, call_key = coalesce(?, call_key)"
            " WHERE command_id = ? RETURNING attempts",
            (now + lease_s, now, call.key if call else None, command_id),
        ).fetchall()[0]
        return Send(SendState.SENT, attempts)

    @staticmethod
    def _take_call(
        db: sqlite3.Connection, command_id: str, call: CallRef, now: float, until: float
    ) -> Send | None:
        """Hold the call for ``command_id``, or say why not (inside the transaction)."""
        row = db.execute(
            "SELECT holder, holder_until, newest, newest_order FROM pabx_calls WHERE call_key = ?",
            (call.key,),
        ).fetchone()
        newest, newest_order = command_id, call.order
        if row is not None:
            holder, holder_until, stored_newest, stored_order = row
            if stored_newest not in (None, command_id) and stored_order > call.order:
                return Send(SendState.SUPERSEDED, newer=stored_newest)
            if holder not in (None, command_id) and holder_until > now:
                return Send(SendState.CALL_BUSY, busy_until=holder_until)
            if stored_newest is not None and call.order < stored_order:
                newest, newest_order = stored_newest, stored_order
        db.execute(
            "INSERT INTO pabx_calls (call_key, holder, holder_until, newest, newest_order,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (call_key) DO UPDATE SET"
            " holder = excluded.holder, holder_until = excluded.holder_until,"
            " newest = excluded.newest, newest_order = excluded.newest_order,"
            " updated_at = excluded.updated_at",
            (call.key, command_id, until, newest, newest_order, now),
        )
        return None

    def renew(self, command_id: str, token: str, *, now: float, lease_s: float) -> bool:
        with self._transaction() as db:
            rows = db.execute(
                "UPDATE pabx_commands SET lease_until = ?, updated_at = ?"
                " WHERE command_id = ? AND token = ? AND outcome IS NULL RETURNING call_key",
                (now + lease_s, now, command_id, token),
            ).fetchall()
            if not rows:
                return False
            if rows[0][0] is not None:
                db.execute(
                    "UPDATE pabx_calls SET holder_until = ?, updated_at = ?"
                    " WHERE call_key = ? AND holder = ?",
                    (now + lease_s, now, rows[0][0], command_id),
                )
            return True

    def record(
        self, command_id: str, token: str, outcome: bytes, *, now: float, hold_call_s: float = 0.0
    ) -> bytes | None:
        if self._let_go(
            "UPDATE pabx_commands SET state = 'done', outcome = ?, token = NULL,"
            " updated_at = ? WHERE command_id = ? AND token = ? AND outcome IS NULL"
            " RETURNING 1",
            (outcome, now, command_id, token),
            command_id,
            now,
            hold_call_s,
        ):
            return outcome
        # Not stored: a new statement says why. Tokens are never reused, so what it sees
        # is this call's answer at that moment.
        with self._statement() as db:
            row = db.execute(
                "SELECT outcome FROM pabx_commands WHERE command_id = ?", (command_id,)
            ).fetchone()
        if row is None:  # purged meanwhile: nothing to keep it in
            return outcome
        return None if row[0] is None else bytes(row[0])  # an earlier outcome wins

    def release(self, command_id: str, token: str, *, now: float, hold_call_s: float = 0.0) -> None:
        self._let_go(
            "UPDATE pabx_commands SET state = 'released', token = NULL, updated_at = ?"
            " WHERE command_id = ? AND token = ? AND outcome IS NULL RETURNING 1",
            (now, command_id, token),
            command_id,
            now,
            hold_call_s,
        )

    def _let_go(
        self,
        update: str,
        params: tuple[Any, ...],
        command_id: str,
        now: float,
        hold_call_s: float,
    ) -> bool:
        """Run ``update``, which clears the command's token ``RETURNING 1``; whether it did.

        The trigger lets go of the call in that statement. With ``hold_call_s`` > 0 the
        command takes its call back until ``now + hold_call_s``, in the same transaction.
        """
        if hold_call_s <= 0:
            with self._statement() as db:  # drained: the statement (and autocommit) is done
                return bool(db.execute(update, params).fetchall())
        with self._transaction() as db:
            held = _holds_call(db, command_id)
            changed = bool(db.execute(update, params).fetchall())
            if changed and held:
                _hold_call(db, command_id, now, hold_call_s)
            return changed

    def reserve_slot(self, target: str, *, interval_s: float) -> float:
        with self._transaction() as db:
            now = time.time()  # read under the write lock: this host's clock, shared by all
            row = db.execute(
                "SELECT next_at FROM pabx_slots WHERE target = ?", (target,)
            ).fetchone()
            slot = now if row is None else max(now, row[0])
            db.execute(
                "INSERT INTO pabx_slots (target, next_at) VALUES (?, ?)"
                " ON CONFLICT (target) DO UPDATE SET next_at = excluded.next_at",
                (target, slot + interval_s),
            )
        return slot - now

    def purge(self, *, older_than: float) -> int:
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM pabx_commands WHERE updated_at < ?", (older_than,))
            db.execute("DELETE FROM pabx_calls WHERE updated_at < ?", (older_than,))
            # A slot whose next time has passed is what no row means: slot = now.
            db.execute("DELETE FROM pabx_slots WHERE next_at < ?", (older_than,))
            return cursor.rowcount

    def ping(self) -> None:
        with self._transaction() as db:
            db.execute("SELECT 1").fetchone()

    def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.stop()
        with self._lock:
            self._db.close()


class _Checkpoints:
    """Checkpoints the WAL every :data:`CHECKPOINT_EVERY_S` (a thread, a connection)."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="pabx-sqlite-checkpoints", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(CHECKPOINT_EVERY_S):
            try:  # PASSIVE: copies what it can now, never waits for a reader or writer
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            except sqlite3.Error as exc:  # the next turn tries again; commits go on meanwhile
                log.debug("SQLite checkpoint failed", extra={"error": str(exc)})
        self._db.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


_CALL_OF = "call_key = (SELECT call_key FROM pabx_commands WHERE command_id = ?)"


def _holds_call(db: sqlite3.Connection, command_id: str) -> bool:
    query = f"SELECT holder = ? FROM pabx_calls WHERE {_CALL_OF}"
    row = db.execute(query, (command_id, command_id)).fetchone()
    return row is not None and bool(row[0])


def _hold_call(db: sqlite3.Connection, command_id: str, now: float, hold_call_s: float) -> None:
    """Hold the command's call again until ``now + hold_call_s``.

    Runs in the transaction whose update just let go of it (the trigger), after
    :func:`_holds_call` found it held by this command: no other can have taken it.
    """
    db.execute(
        f"UPDATE pabx_calls SET holder = ?, holder_until = ?, updated_at = ? WHERE {_CALL_OF}",
        (command_id, now + hold_call_s, now, command_id),
    )
