"""PostgreSQL idempotency store (psycopg 3), for several hosts sharing one database.

Connection model: a few connections per store (per process), at most :data:`POOL_SIZE`,
opened as needed and kept, in autocommit mode. Every call is one to three short
statements on one or two rows by primary key, so a few connections serve the worker's 32
threads: one connection under a lock capped a process at one round trip at a time (some
250 commands/s on a loopback server), while the connection count stays bounded against
PostgreSQL's ``max_connections``. A thread takes an idle connection, opens a new one
while fewer than :data:`POOL_SIZE` are open, or waits for one to come back. Connections
are opened by the calling thread, so a refused or failed connection is that call's
:class:`~worker.contract.errors.StoreError`, with its reason, at once (``psycopg_pool``
opens them in the background and answers a timeout instead). Socket timeouts
(``connect_timeout``, ``tcp_user_timeout``, keepalives) and ``statement_timeout`` bound how
long one call can hold a connection.

Lost connection: the call that meets it raises :class:`~worker.contract.errors.StoreError`
(the command waits or is left for redelivery) and that connection is dropped; the next
call gets another or a new one, so a restarted PostgreSQL is survived without
restarting the worker. The store connects lazily: the constructor does no I/O;
:meth:`PostgresStore.ping` checks.

Tables: ``{table}`` (one row per command id; ``call_key`` names the call the command
holds or held), ``{table}_calls`` (the per-call record: ``holder``, ``holder_until``,
the ``newest`` command sent and its ``newest_order``, ``updated_at``) and
``{table}_slots`` (per PABX target: ``next_at``, the next free request slot, and the
last reservation's ``slot_at``/``reserved_at``; ``UNLOGGED``: a reservation commits
without waiting for a WAL flush, so the wait it returns is not stretched by one, and a
crash or failover that empties the table only restarts the schedule at "now"). A table
created by the version before the per-call record gets ``call_key`` (``ALTER TABLE ...
ADD COLUMN IF NOT EXISTS``, only when ``pg_attribute`` lacks it: the ALTER takes an
exclusive lock even when it then finds the column) and the two new tables on the first
connection, under the same advisory lock as the schema.

Atomicity: a claim first tries ``INSERT ... ON CONFLICT DO NOTHING`` (a new id is one
statement); when the row exists it is read ``FOR UPDATE`` and updated in one
transaction, so concurrent claims of one id from any number of processes serialise
on the row lock and exactly one gets ``NEW``. ``claim_and_send`` calls a plpgsql
function, ``{table}_claim_send_v1``, that runs that ``INSERT`` and then the
``mark_sent`` statement below in one transaction, each statement on its own snapshot:
a new command whose call is free is claimed and marked sent in one round trip, and
when either statement fails neither change stays. The function is created with the
schema when it is missing; it is never replaced (that needs its owner), so a changed
function gets a new name.

``reopen`` is one transaction too: the row is read ``FOR UPDATE``, then the outcome
is cleared and the lease taken (or the claim answer given) before the commit.

The other steps are single statements (one round trip, atomic on their own), with
the fencing in their ``WHERE``: nothing changes unless the row's ``token`` is the
caller's and no outcome is stored. ``mark_sent`` with a call locks the command row
(``FOR UPDATE``), then the call row (``FOR UPDATE``, which under READ COMMITTED yields
its latest version), and takes the call with ``INSERT ... ON CONFLICT DO UPDATE ...
WHERE`` (the hold and order rules; the conflict path works on the latest row too, so
two first sends of one call cannot both win); the command row is updated only when
the call was taken. When the call row was created by a concurrent first send after
the statement's snapshot, the refusal's reason is not known to the statement: it
is run again (nothing was changed). ``renew``, ``record`` and ``release`` update the
command row and, through ``RETURNING call_key``, the call row it holds, in one
statement; a ``record`` that stored nothing reads the row in a second statement to say
why (tokens are never reused, so that read is a valid answer at its moment). Every
step locks the command row before the call row, so they cannot
deadlock each other.

Clock: lease and call times are the caller's ``now``. ``reserve_slot`` uses the
server's ``clock_timestamp()``, read in the ``DO UPDATE`` after the target's row is
locked, so every worker on every host shares one schedule per target.

Durability follows the server (``fsync``, ``synchronous_commit``): with both ``on``
a call that returned has its change on disk (all but the request schedule, see above).
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from worker.adapters.store import redact_url
from worker.adapters.store.base import (
    TAKEN,
    CallRef,
    Claim,
    ClaimState,
    Send,
    SendState,
    hold_until,
)
from worker.contract.errors import ConfigurationError, StoreError
from worker.logs import redact_message

__all__ = ["POOL_SIZE", "PostgresStore"]

#: Most connections one store (one worker process) opens.
POOL_SIZE = 4

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
    outcome     BYTEA,
    call_key    TEXT
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (updated_at);
CREATE TABLE IF NOT EXISTS {calls} (
    call_key     TEXT PRIMARY KEY,
    holder       TEXT,
    holder_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    newest       TEXT,
    newest_order DOUBLE PRECISION NOT NULL DEFAULT 0,
    updated_at   DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS {calls_index} ON {calls} (updated_at);
CREATE UNLOGGED TABLE IF NOT EXISTS {slots} (
    target      TEXT PRIMARY KEY,
    next_at     DOUBLE PRECISION NOT NULL,
    slot_at     DOUBLE PRECISION NOT NULL,
    reserved_at DOUBLE PRECISION NOT NULL
)
"""
# Created when missing, never replaced: replacing needs its owner, and a changed function
# gets a new name (_CLAIM_SEND).
_HAS_CLAIM_SEND = "SELECT to_regproc(quote_ident(%s))"
_CREATE_CLAIM_SEND = """
CREATE FUNCTION {claim_send}(
    p_id TEXT, p_fingerprint TEXT, p_token TEXT, p_now DOUBLE PRECISION,
    p_until DOUBLE PRECISION, p_key TEXT, p_order DOUBLE PRECISION,
    OUT o_inserted INTEGER, OUT o_held BIGINT, OUT o_attempts INTEGER,
    OUT o_holder_until DOUBLE PRECISION, OUT o_newest TEXT,
    OUT o_newest_order DOUBLE PRECISION, OUT o_holder TEXT)
LANGUAGE plpgsql AS $claim_send$
BEGIN
    {insert_body};
    GET DIAGNOSTICS o_inserted = ROW_COUNT;
    {mark_body}
    INTO o_held, o_attempts, o_holder_until, o_newest, o_newest_order, o_holder;
END
$claim_send$
"""
# A table from before the per-call record lacks call_key. Checked first: ALTER TABLE
# takes an ACCESS EXCLUSIVE lock even when IF NOT EXISTS then finds the column.
_HAS_CALL_KEY = (
    "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(quote_ident(%s))"
    " AND attname = 'call_key' AND NOT attisdropped"
)
_ADD_CALL_KEY = "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS call_key TEXT"

_INSERT = (
    "INSERT INTO {table} (command_id, fingerprint, first_seen, updated_at, state, token,"
    " lease_until) VALUES (%(id)s, %(fingerprint)s, %(now)s, %(now)s, 'claimed', %(token)s,"
    " %(until)s) ON CONFLICT (command_id) DO NOTHING"
)
# The claim of a new id and its first mark as one statement (:meth:`claim_and_send`): a
# function running ``_INSERT`` and then ``_MARK_SENT_CALL`` in one transaction, each on its
# own snapshot. Its name carries a version: a function whose parameters or results change
# is a new function, and workers of the version before keep calling theirs.
_CLAIM_SEND = "claim_send_v1"
_SELECT_FOR_UPDATE = (
    "SELECT fingerprint, first_seen, state, lease_until, attempts, outcome, token"
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
# Without a call: count the attempt if the token holds the lease. Returns attempts.
_MARK_SENT = (
    "UPDATE {table} SET state = 'sent', attempts = attempts + 1, lease_until = %(until)s,"
    " updated_at = %(now)s"
    " WHERE command_id = %(id)s AND token = %(token)s AND outcome IS NULL RETURNING attempts"
)
# With a call, one statement: ``cmd`` locks the command row if the token holds it; ``cur``
# locks and reads the call row (its latest version); ``took`` takes the call unless it is
# superseded or busy (also deciding on the latest row when a concurrent first send
# inserted it); ``sent`` counts the attempt only when the call was taken. ``cur`` is read
# by ``took``, so it is materialised before ``took`` writes. Returns (held, attempts or
# NULL, holder_until, newest, newest_order): held 0 = lease lost; attempts NULL = refused,
# the reason in the call row's values (all NULL: unknown, run the statement again).
_MARK_SENT_CALL = """
WITH cmd AS (
    SELECT command_id FROM {table}
    WHERE command_id = %(id)s AND token = %(token)s AND outcome IS NULL
    FOR UPDATE
), cur AS (
    SELECT c.holder, c.holder_until, c.newest, c.newest_order FROM {calls} c, cmd
    WHERE c.call_key = %(key)s
    FOR UPDATE OF c
), took AS (
    INSERT INTO {calls} AS c
        (call_key, holder, holder_until, newest, newest_order, updated_at)
    SELECT %(key)s, %(id)s, %(until)s, %(id)s, %(order)s, %(now)s
    FROM cmd LEFT JOIN cur ON TRUE
    ON CONFLICT (call_key) DO UPDATE SET
        holder = EXCLUDED.holder,
        holder_until = EXCLUDED.holder_until,
        newest = CASE WHEN c.newest IS NULL OR EXCLUDED.newest_order >= c.newest_order
                      THEN EXCLUDED.newest ELSE c.newest END,
        newest_order = CASE WHEN c.newest IS NULL OR EXCLUDED.newest_order >= c.newest_order
                            THEN EXCLUDED.newest_order ELSE c.newest_order END,
        updated_at = EXCLUDED.updated_at
    WHERE (c.newest IS NULL OR c.newest = EXCLUDED.newest
           OR c.newest_order <= EXCLUDED.newest_order)
      AND (c.holder IS NULL OR c.holder = EXCLUDED.holder
           OR c.holder_until <= EXCLUDED.updated_at)
    RETURNING 1
), sent AS (
    UPDATE {table} SET state = 'sent', attempts = attempts + 1, lease_until = %(until)s,
        updated_at = %(now)s, call_key = %(key)s
    WHERE command_id = %(id)s AND EXISTS (SELECT 1 FROM took)
    RETURNING attempts
)
SELECT held.n, sent.attempts, cur.holder_until, cur.newest, cur.newest_order, cur.holder
FROM (SELECT count(*) AS n FROM cmd) held
LEFT JOIN sent ON TRUE
LEFT JOIN cur ON TRUE
"""
_RENEW = """
WITH renewed AS (
    UPDATE {table} SET lease_until = %(until)s, updated_at = %(now)s
    WHERE command_id = %(id)s AND token = %(token)s AND outcome IS NULL
    RETURNING call_key
), held AS (
    UPDATE {calls} c SET holder_until = %(until)s, updated_at = %(now)s
    FROM renewed WHERE c.call_key = renewed.call_key AND c.holder = %(id)s
)
SELECT count(*) FROM renewed
"""
# Let go of the call, or keep holding it until %(hold_until)s when that is not 0.
_LET_GO_OF_CALL = """
    UPDATE {calls} c SET holder = CASE WHEN %(hold_until)s > 0 THEN c.holder END,
        holder_until = %(hold_until)s, updated_at = %(now)s"""
# Store the outcome if the token holds the lease and let go of the call. Returns 1 or 0.
_RECORD = (
    """
WITH done AS (
    UPDATE {table} SET state = 'done', outcome = %(outcome)s, token = NULL,
        updated_at = %(now)s
    WHERE command_id = %(id)s AND token = %(token)s AND outcome IS NULL
    RETURNING call_key
), let_go AS ("""
    + _LET_GO_OF_CALL
    + """
    FROM done WHERE c.call_key = done.call_key AND c.holder = %(id)s
)
SELECT count(*) FROM done
"""
)
_SELECT_OUTCOME = "SELECT outcome FROM {table} WHERE command_id = %s"
_SELECT_CLAIMED = "SELECT first_seen, attempts FROM {table} WHERE command_id = %s"
_RELEASE = (
    """
WITH released AS (
    UPDATE {table} SET state = 'released', token = NULL, updated_at = %(now)s
    WHERE command_id = %(id)s AND token = %(token)s AND outcome IS NULL
    RETURNING call_key
)"""
    + _LET_GO_OF_CALL
    + """
FROM released WHERE c.call_key = released.call_key AND c.holder = %(id)s
"""
)
# The server's clock, read once per row: in the VALUES for a new target, and in DO UPDATE,
# which runs after the target's row is locked (so a waiter reads the clock once it holds it).
_RESERVE_SLOT = """
INSERT INTO {slots} AS s (target, next_at, slot_at, reserved_at)
SELECT %(target)s, t.now + %(interval)s, t.now, t.now
FROM (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) t
ON CONFLICT (target) DO UPDATE SET (next_at, slot_at, reserved_at) = (
    SELECT GREATEST(s.next_at, t.now) + %(interval)s, GREATEST(s.next_at, t.now), t.now
    FROM (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) t
)
RETURNING slot_at - reserved_at
"""
_PURGE = "DELETE FROM {table} WHERE updated_at < %s"
_PURGE_CALLS = "DELETE FROM {calls} WHERE updated_at < %s"
# A slot whose next time has passed is what no row means (slot = now).
_PURGE_SLOTS = "DELETE FROM {slots} WHERE next_at < %s"


def _in_function(statement: str) -> str:
    """A statement with ``%(name)s`` placeholders as a plpgsql statement on ``p_name``."""
    return re.sub(r"%\((\w+)\)s", r"p_\1", statement)


Connection = psycopg.Connection[tuple[Any, ...]]
_IDLE = psycopg.pq.TransactionStatus.IDLE


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
    """:class:`~worker.adapters.store.base.Store` on PostgreSQL: a few pooled connections."""

    def __init__(
        self,
        url: str,
        *,
        table: str = "pabx_commands",
        connect_timeout: int = 5,
        statement_timeout_ms: int = 10_000,
        pool_size: int = POOL_SIZE,
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
        self._returned = threading.Condition(self._lock)
        self._idle: list[Connection] = []
        self._open_count = 0
        self._pool_size = max(1, pool_size)
        self._schema_lock = threading.Lock()
        self._schema_ready = False
        self._closed = False
        ident = sql.Identifier(table)
        names: dict[str, sql.Composable] = {
            "table": ident,
            "index": sql.Identifier(f"{table}_updated"),
            "calls": sql.Identifier(f"{table}_calls"),
            "calls_index": sql.Identifier(f"{table}_calls_updated"),
            "slots": sql.Identifier(f"{table}_slots"),
            "claim_send": sql.Identifier(f"{table}_{_CLAIM_SEND}"),
        }

        def q(text: str) -> str:
            # Rendered once: a Composed is rendered again on every execute, and psycopg
            # caches the parsing of a query string, not of a Composed.
            used = {k: v for k, v in names.items() if f"{{{k}}}" in text}
            return sql.SQL(text).format(**used).as_string(None)

        # The function's body: the same two statements, on its parameters.
        names["insert_body"] = sql.SQL(_in_function(q(_INSERT)))
        names["mark_body"] = sql.SQL(_in_function(q(_MARK_SENT_CALL)))
        self._table = table
        self._schema, self._add_call_key = q(_SCHEMA), q(_ADD_CALL_KEY)
        self._create_claim_send = q(_CREATE_CLAIM_SEND)
        self._claim_send_sql = q("SELECT * FROM {claim_send}(%s, %s, %s, %s, %s, %s, %s)")
        self._insert, self._select_for_update, self._take = (
            q(_INSERT),
            q(_SELECT_FOR_UPDATE),
            q(_TAKE),
        )
        self._reopen_sql = q(_REOPEN)
        self._mark_sent_sql, self._mark_sent_call_sql = q(_MARK_SENT), q(_MARK_SENT_CALL)
        self._renew_sql, self._record_sql = q(_RENEW), q(_RECORD)
        self._select_outcome, self._release_sql = q(_SELECT_OUTCOME), q(_RELEASE)
        self._select_claimed = q(_SELECT_CLAIMED)
        self._reserve_slot_sql = q(_RESERVE_SLOT)
        self._purge_sql = (q(_PURGE), q(_PURGE_CALLS), q(_PURGE_SLOTS))
        self._lock_key = f"pabx-worker schema {table}"

    @classmethod
    def from_url(cls, url: str, *, table: str = "pabx_commands") -> PostgresStore:
        """A store on ``postgresql://user[:password]@host[:port]/dbname`` (no I/O yet)."""
        try:
            conninfo_to_dict(url)
        except psycopg.Error as exc:  # a malformed URL; its message may quote the password
            message = f"PABX_WORKER_STORE_URL: PostgreSQL store {_label(url)}: {str(exc).strip()}"
            for secret in _secrets(url):
                message = message.replace(secret, "***")
            raise ConfigurationError(message) from None
        return cls(url, table=table)

    # -- connection handling --------------------------------------------------------

    def _error(self, message: str) -> StoreError:
        message = redact_message(message, self._secrets)  # never substrings of other words
        return StoreError(f"PostgreSQL store {self._label}: {message}")

    def _checkout(self) -> Connection:
        """An idle connection, a new one while fewer than the pool size are open, or the
        next one given back (waiting at most ``connect_timeout``)."""
        deadline = time.monotonic() + self._connect_args["connect_timeout"]
        with self._lock:
            while True:
                if self._closed:
                    raise self._error("the store is closed")
                while self._idle:
                    conn = self._idle.pop()
                    if not conn.closed and not conn.broken:
                        return conn
                    self._open_count -= 1
                if self._open_count < self._pool_size:
                    self._open_count += 1
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self._error("every connection stayed busy")
                self._returned.wait(left)
        try:  # outside the lock: a slow connect holds up no other thread
            conn = psycopg.connect(self._url, **self._connect_args)
            if not self._schema_ready:
                self._create_schema(conn)
        except BaseException:
            with self._lock:
                self._open_count -= 1
                self._returned.notify()
            raise
        return conn

    def _checkin(self, conn: Connection, *, healthy: bool) -> None:
        with self._lock:
            if healthy and not self._closed and not conn.closed and not conn.broken:
                self._idle.append(conn)
            else:
                self._open_count -= 1
                with suppress(psycopg.Error):
                    conn.close()
            self._returned.notify()

    def _create_schema(self, conn: Connection) -> None:
        with self._schema_lock:
            if self._schema_ready:
                return
            with conn.transaction():
                # Concurrent CREATE TABLE IF NOT EXISTS can still collide: serialise it.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self._lock_key,))
                conn.execute(self._schema)
                if conn.execute(_HAS_CALL_KEY, (self._table,)).fetchone() is None:
                    conn.execute(self._add_call_key)  # a table from before the call record
                found = conn.execute(_HAS_CLAIM_SEND, (f"{self._table}_{_CLAIM_SEND}",))
                if _one_row(found.fetchone())[0] is None:
                    conn.execute(self._create_claim_send)
            self._schema_ready = True

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        try:
            conn = self._checkout()
        except psycopg.Error as exc:
            raise self._error(f"{type(exc).__name__}: {exc}") from exc
        healthy = False
        try:
            yield conn
            healthy = True
        except psycopg.Error as exc:
            # A statement error leaves a working connection (autocommit); a lost one is
            # dropped. Either way this call fails with the store's error.
            healthy = not conn.broken and not conn.closed
            raise self._error(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._checkin(conn, healthy=healthy and conn.info.transaction_status == _IDLE)

    # -- the contract ---------------------------------------------------------------

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
        with self._connection() as conn:
            return self._claim_on(conn, command_id, fingerprint, token, now, now + lease_s)

    def _claim_on(
        self,
        conn: Connection,
        command_id: str,
        fingerprint: str,
        token: str,
        now: float,
        lease_until: float,
    ) -> Claim:
        params: dict[str, Any] = {"id": command_id, "fingerprint": fingerprint}
        params.update(token=token, now=now, until=lease_until)
        for _ in range(3):
            inserted = conn.execute(self._insert, params).rowcount
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
        stored_fp, first_seen, state, stored_lease, attempts, outcome, held_by = row
        if stored_fp != fingerprint:
            return Claim(ClaimState.CONFLICT, first_seen, attempts)
        if outcome is not None:
            return Claim(ClaimState.DONE, first_seen, attempts, outcome=bytes(outcome))
        mine = held_by == token  # our own claim, repeated: take it again
        if not mine and state != "released" and stored_lease > now:
            return Claim(ClaimState.BUSY, first_seen, attempts, lease_until=stored_lease)
        conn.execute(self._take, (token, lease_until, now, command_id))
        kind = ClaimState.TAKEOVER if state == "sent" and not mine else ClaimState.NEW
        return Claim(kind, first_seen, attempts, token)

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
        with self._connection() as conn:
            if call is not None:
                found = self._insert_and_send(
                    conn, command_id, fingerprint, call, token, now, lease_s
                )
                if found is not None:
                    return found
            # Not a new id: a claim as usual, then (the lease taken) the send.
            claim = self._claim_on(conn, command_id, fingerprint, token, now, now + lease_s)
            if claim.state not in TAKEN:
                return claim, None
            return claim, self._mark_sent_on(conn, command_id, token, call, now, lease_s)

    def _insert_and_send(
        self,
        conn: Connection,
        command_id: str,
        fingerprint: str,
        call: CallRef,
        token: str,
        now: float,
        lease_s: float,
    ) -> tuple[Claim, Send] | None:
        """The common case in one statement: the function running the new-id INSERT and
        the mark_sent statement. The mark changes nothing unless the token holds the row,
        so when the row was there already (None) the caller claims as usual."""
        args = (command_id, fingerprint, token, now, now + lease_s, call.key, call.order)
        inserted, *row = _one_row(conn.execute(self._claim_send_sql, args).fetchone())
        if inserted != 1 and not row[0]:
            return None  # another holder's, or done: nothing was changed
        sent = _send_of(tuple(row), command_id, call, now)
        if sent is None:  # refused on a call row created after the statement's snapshot
            sent = self._mark_sent_on(conn, command_id, token, call, now, lease_s)
        if inserted == 1:
            return Claim(ClaimState.NEW, now, 0, token), sent
        # Our own claim repeated (its first answer lost): the row is ours, as claim says.
        first_seen, attempts = _one_row(
            conn.execute(self._select_claimed, (command_id,)).fetchone()
        )
        before = attempts - 1 if sent.state is SendState.SENT else attempts
        return Claim(ClaimState.NEW, first_seen, before, token), sent

    def reopen(self, command_id: str, outcome: bytes, *, now: float, lease_s: float) -> Claim:
        token = uuid.uuid4().hex
        lease_until = now + lease_s
        # One transaction: the row lock serialises concurrent reopens (and claims) of the id,
        # and a waiter re-reads the row once the lock is free, so exactly one gets NEW.
        with self._connection() as conn, conn.transaction():
            row = conn.execute(self._select_for_update, (command_id,)).fetchone()
            if row is None:  # never seen or purged: nothing to take back
                return Claim(ClaimState.CONFLICT, now)
            stored_fp, first_seen, _, _, attempts, stored, _ = row
            if stored is not None and bytes(stored) == outcome:
                conn.execute(self._reopen_sql, (token, lease_until, now, command_id))
                return Claim(ClaimState.NEW, first_seen, attempts, token)
            return self._claim_existing(conn, row, command_id, stored_fp, token, now, lease_until)

    def mark_sent(
        self, command_id: str, token: str, call: CallRef | None, *, now: float, lease_s: float
    ) -> Send:
        with self._connection() as conn:
            return self._mark_sent_on(conn, command_id, token, call, now, lease_s)

    def _mark_sent_on(
        self,
        conn: Connection,
        command_id: str,
        token: str,
        call: CallRef | None,
        now: float,
        lease_s: float,
    ) -> Send:
        params: dict[str, Any] = {"id": command_id, "token": token, "now": now}
        params["until"] = now + lease_s
        if call is None:
            row = conn.execute(self._mark_sent_sql, params).fetchone()
            return Send(SendState.LEASE_LOST) if row is None else Send(SendState.SENT, row[0])
        params.update(key=call.key, order=call.order)
        for _ in range(3):
            row = _one_row(conn.execute(self._mark_sent_call_sql, params).fetchone())
            sent = _send_of(row, command_id, call, now)
            if sent is not None:
                return sent
            # Refused on a call row a concurrent first send created after this
            # statement's snapshot: nothing changed; now the row is visible.
        raise self._error(f"mark_sent {command_id!r}: the call record kept changing")

    def renew(self, command_id: str, token: str, *, now: float, lease_s: float) -> bool:
        params = {"id": command_id, "token": token, "now": now, "until": now + lease_s}
        with self._connection() as conn:
            row = conn.execute(self._renew_sql, params).fetchone()
        return row is not None and row[0] == 1

    def record(
        self, command_id: str, token: str, outcome: bytes, *, now: float, hold_call_s: float = 0.0
    ) -> bytes | None:
        params = {
            "id": command_id,
            "token": token,
            "now": now,
            "outcome": outcome,
            "hold_until": hold_until(now, hold_call_s),
        }
        with self._connection() as conn:
            done = conn.execute(self._record_sql, params).fetchone()
            if done is not None and done[0] == 1:
                return outcome
            # Not stored: a new statement (new snapshot) says why. Tokens are never
            # reused, so what it sees is this call's answer at that moment.
            row = conn.execute(self._select_outcome, (command_id,)).fetchone()
        if row is None:  # purged meanwhile: nothing to keep it in
            return outcome
        return None if row[0] is None else bytes(row[0])  # an earlier outcome wins

    def release(self, command_id: str, token: str, *, now: float, hold_call_s: float = 0.0) -> None:
        params = {
            "id": command_id,
            "token": token,
            "now": now,
            "hold_until": hold_until(now, hold_call_s),
        }
        with self._connection() as conn:
            conn.execute(self._release_sql, params)

    def reserve_slot(self, target: str, *, interval_s: float) -> float:
        with self._connection() as conn:
            row = conn.execute(
                self._reserve_slot_sql, {"target": target, "interval": interval_s}
            ).fetchone()
        return max(0.0, float(_one_row(row)[0]))

    def purge(self, *, older_than: float) -> int:
        purge_commands, purge_calls, purge_slots = self._purge_sql
        with self._connection() as conn:
            dropped = conn.execute(purge_commands, (older_than,)).rowcount
            conn.execute(purge_calls, (older_than,))
            conn.execute(purge_slots, (older_than,))
        return dropped

    def ping(self) -> None:
        with self._connection() as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open_count -= len(idle)
            self._returned.notify_all()
        for conn in idle:
            with suppress(psycopg.Error):
                conn.close()


def _send_of(row: tuple[Any, ...], command_id: str, call: CallRef, now: float) -> Send | None:
    """What a ``_MARK_SENT_CALL`` row says; None when the refusal's reason is not known."""
    held, attempts, holder_until, newest, newest_order, holder = row
    if not held:
        return Send(SendState.LEASE_LOST)
    if attempts is not None:
        return Send(SendState.SENT, attempts)
    if newest not in (None, command_id) and newest_order > call.order:
        return Send(SendState.SUPERSEDED, newer=newest)
    if holder not in (None, command_id) and holder_until > now:
        return Send(SendState.CALL_BUSY, busy_until=holder_until)
    return None


def _one_row(row: tuple[Any, ...] | None) -> tuple[Any, ...]:
    """The row of a statement that always answers one (an upsert's RETURNING, a SELECT of
    values); a missing one is a store failure, not a crash."""
    if row is None:
        raise StoreError("the store answered no row where one is always returned")
    return row
