"""PostgreSQL idempotency store (psycopg 3), for several hosts sharing one database.

Connection model: ONE connection per store (per process), in autocommit mode, used
under a lock. The worker calls the store from up to 32 threads, but every call is one
to three short statements on a single indexed row (well under a millisecond on a LAN),
while each command then waits on the PABX over HTTP for tens or hundreds of
milliseconds: the lock is never the bottleneck. In exchange the connection count is
fixed (one per worker process, whatever the thread count, against PostgreSQL's
``max_connections``), nothing leaks when threads come and go, and reconnecting is a
single, lock-protected decision. (``psycopg_pool`` is not available; thread-local
connections would need per-thread bookkeeping to close them and could open 32 per
process.) Socket timeouts (``connect_timeout``, ``tcp_user_timeout``, keepalives) and
``statement_timeout`` bound how long one call can hold the lock.

Lost connection: the call that meets it raises :class:`~worker.errors.StoreError`
(the command is left for redelivery) and drops the connection; the next call opens a
new one, so a restarted PostgreSQL is survived without restarting the worker. The
store connects lazily: the constructor does no I/O; :meth:`PostgresStore.ping` checks.

Atomicity: a claim first tries ``INSERT ... ON CONFLICT DO NOTHING`` (a new id is one
statement); when the row exists it is read ``FOR UPDATE`` and updated in one
transaction, so concurrent claims of one id from any number of processes serialise
on the row lock and exactly one gets ``NEW``.

``reopen`` is one transaction too: the row is read ``FOR UPDATE``, then the outcome
is cleared and the lease taken (or the claim answer given) before the commit.

Durability follows the server (``fsync``, ``synchronous_commit``): with both ``on``
a call that returned has its change on disk.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from worker.errors import StoreError
from worker.store import redact_url
from worker.store.base import Claim, ClaimState

__all__ = ["PostgresStore"]

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,50}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS {table} (
    command_id  TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    first_seen  DOUBLE PRECISION NOT NULL,
    updated_at  DOUBLE PRECISION NOT NULL,
    state       TEXT NOT NULL,
    token       TEXT,
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    attempts    INTEGER NOT NULL DEFAULT 0,
    outcome     BYTEA
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (updated_at)
"""

_INSERT = (
    "INSERT INTO {table} (command_id, fingerprint, first_seen, updated_at, state, token,"
    " lease_until) VALUES (%s, %s, %s, %s, 'claimed', %s, %s)"
    " ON CONFLICT (command_id) DO NOTHING"
)
_SELECT_FOR_UPDATE = (
    "SELECT fingerprint, first_seen, state, lease_until, attempts, outcome"
    " FROM {table} WHERE command_id = %s FOR UPDATE"
)
_TAKE = (
    "UPDATE {table} SET state = 'claimed', token = %s, lease_until = %s, updated_at = %s"
    " WHERE command_id = %s"
)
_REOPEN = (
    "UPDATE {table} SET state = 'claimed', outcome = NULL, token = %s, lease_until = %s,"
    " updated_at = %s WHERE command_id = %s"
)
_MARK_SENT = (
    "UPDATE {table} SET state = 'sent', attempts = %s, lease_until = %s, updated_at = %s"
    " WHERE command_id = %s AND token = %s AND outcome IS NULL"
)
_RECORD = (
    "UPDATE {table} SET state = 'done', outcome = %s, token = NULL,"
    " attempts = GREATEST(attempts, %s) WHERE command_id = %s AND outcome IS NULL"
)
_SELECT_OUTCOME = "SELECT outcome FROM {table} WHERE command_id = %s"
_RELEASE = (
    "UPDATE {table} SET state = 'released', token = NULL, attempts = GREATEST(attempts, %s)"
    " WHERE command_id = %s AND token = %s AND outcome IS NULL"
)
_PURGE = "DELETE FROM {table} WHERE updated_at < %s"

Connection = psycopg.Connection[tuple[Any, ...]]


def _secrets(url: str) -> tuple[str, ...]:
    """The password a connection string carries, in every spelling a message might show."""
    found: set[str] = set()
    with suppress(psycopg.Error):
        password = conninfo_to_dict(url).get("password")
        if password:
            found.add(str(password))
    try:
        raw = urlsplit(url).password
    except ValueError:
        raw = None
    if raw:
        found.update({raw, unquote(raw)})
    return tuple(sorted(found, key=len, reverse=True))


def _label(url: str) -> str:
    if "://" in url:
        return redact_url(url)
    return re.sub(r"password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", "password=***", url)


class PostgresStore:
    """:class:`~worker.store.base.Store` on PostgreSQL; one connection, shared by threads."""

    def __init__(
        self,
        url: str,
        *,
        table: str = "pabx_commands",
        connect_timeout: int = 5,
        statement_timeout_ms: int = 10_000,
    ) -> None:
        if not _TABLE_NAME.fullmatch(table):
            raise StoreError(f"PostgreSQL store: invalid table name {table!r}")
        self._url = url
        self._label = _label(url)
        self._secrets = _secrets(url)
        self._connect_args: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": connect_timeout,
            "options": f"-c statement_timeout={statement_timeout_ms}",
            "tcp_user_timeout": connect_timeout * 2000,
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "application_name": "pabx-worker",
        }
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._schema_ready = False
        self._closed = False
        ident = sql.Identifier(table)

        def q(text: str) -> sql.Composed:
            return sql.SQL(text).format(table=ident, index=sql.Identifier(f"{table}_updated"))

        self._schema = q(_SCHEMA)
        self._insert, self._select_for_update, self._take = (
            q(_INSERT),
            q(_SELECT_FOR_UPDATE),
            q(_TAKE),
        )
        self._reopen_sql = q(_REOPEN)
        self._mark_sent_sql, self._record_sql = q(_MARK_SENT), q(_RECORD)
        self._select_outcome, self._release_sql = q(_SELECT_OUTCOME), q(_RELEASE)
        self._purge_sql = q(_PURGE)
        self._lock_key = f"pabx-worker schema {table}"

    @classmethod
    def from_url(cls, url: str, *, table: str = "pabx_commands") -> PostgresStore:
        """A store on ``postgresql://user[:password]@host[:port]/dbname`` (no I/O yet)."""
        return cls(url, table=table)

    # -- connection handling --------------------------------------------------------

    def _error(self, message: str) -> StoreError:
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return StoreError(f"PostgreSQL store {self._label}: {message}")

    def _connect(self) -> Connection:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        self._drop()
        conn = psycopg.connect(self._url, **self._connect_args)
        self._conn = conn
        if not self._schema_ready:
            with conn.transaction():
                # Concurrent CREATE TABLE IF NOT EXISTS can still collide: serialise it.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._lock_key,))
                conn.execute(self._schema)
            self._schema_ready = True
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(psycopg.Error):
                conn.close()

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        with self._lock:
            if self._closed:
                raise self._error("the store is closed")
            try:
                yield self._connect()
            except psycopg.Error as exc:
                conn = self._conn
                if conn is None or conn.closed or conn.broken or not self._schema_ready:
                    self._drop()
                raise self._error(f"{type(exc).__name__}: {exc}") from exc

    # -- the contract ---------------------------------------------------------------

    def claim(self, command_id: str, fingerprint: str, *, now: float, lease_s: float) -> Claim:
        token = uuid.uuid4().hex
        lease_until = now + lease_s
        with self._connection() as conn:
            for _ in range(3):
                inserted = conn.execute(
                    self._insert, (command_id, fingerprint, now, now, token, lease_until)
                ).rowcount
                if inserted == 1:
                    return Claim(ClaimState.NEW, now, 0, token)
                with conn.transaction():
                    row = conn.execute(self._select_for_update, (command_id,)).fetchone()
                    if row is not None:
                        return self._claim_existing(
                            conn, row, command_id, fingerprint, token, now, lease_until
                        )
                # Purged between the INSERT and the SELECT: try again.
        raise self._error(f"claim {command_id!r}: the record kept vanishing")

    def _claim_existing(
        self,
        conn: Connection,
        row: tuple[Any, ...],
        command_id: str,
        fingerprint: str,
        token: str,
        now: float,
        lease_until: float,
    ) -> Claim:
        stored_fp, first_seen, state, stored_lease, attempts, outcome = row
        if stored_fp != fingerprint:
            return Claim(ClaimState.CONFLICT, first_seen, attempts)
        if outcome is not None:
            return Claim(ClaimState.DONE, first_seen, attempts, outcome=bytes(outcome))
        if state != "released" and stored_lease > now:
            return Claim(ClaimState.BUSY, first_seen, attempts, lease_until=stored_lease)
        conn.execute(self._take, (token, lease_until, now, command_id))
        kind = ClaimState.TAKEOVER if state == "sent" else ClaimState.NEW
        return Claim(kind, first_seen, attempts, token)

    def reopen(self, command_id: str, outcome: bytes, *, now: float, lease_s: float) -> Claim:
        token = uuid.uuid4().hex
        lease_until = now + lease_s
        # One transaction: the row lock serialises concurrent reopens (and claims) of the id,
        # and a waiter re-reads the row once the lock is free, so exactly one gets NEW.
        with self._connection() as conn, conn.transaction():
            row = conn.execute(self._select_for_update, (command_id,)).fetchone()
            if row is None:  # never seen or purged: nothing to take back
                return Claim(ClaimState.CONFLICT, now)
            stored_fp, first_seen, _, _, attempts, stored = row
            if stored is not None and bytes(stored) == outcome:
                conn.execute(self._reopen_sql, (token, lease_until, now, command_id))
                return Claim(ClaimState.NEW, first_seen, attempts, token)
            return self._claim_existing(conn, row, command_id, stored_fp, token, now, lease_until)

    def mark_sent(
        self, command_id: str, token: str, attempts: int, *, now: float, lease_s: float
    ) -> bool:
        with self._connection() as conn:
            cursor = conn.execute(
                self._mark_sent_sql, (attempts, now + lease_s, now, command_id, token)
            )
            return cursor.rowcount == 1

    def record(self, command_id: str, token: str, outcome: bytes, attempts: int) -> bytes:
        with self._connection() as conn:
            conn.execute(self._record_sql, (outcome, attempts, command_id))
            # A separate statement (new snapshot) sees an outcome another process committed.
            row = conn.execute(self._select_outcome, (command_id,)).fetchone()
        return bytes(row[0]) if row is not None and row[0] is not None else outcome

    def release(self, command_id: str, token: str, attempts: int) -> None:
        with self._connection() as conn:
            conn.execute(self._release_sql, (attempts, command_id, token))

    def purge(self, *, older_than: float) -> int:
        with self._connection() as conn:
            return conn.execute(self._purge_sql, (older_than,)).rowcount

    def ping(self) -> None:
        with self._connection() as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop()
