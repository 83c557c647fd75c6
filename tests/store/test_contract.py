"""One contract suite for every idempotency store: memory, sqlite, redis, postgres.

The Redis and PostgreSQL cases use the real servers (``redis_url`` / ``postgres_url``
fixtures: skipped locally when absent, failing under ``CI=true``); each test gets its
own random key prefix or tables and removes them afterwards.
"""

from __future__ import annotations

import itertools
import multiprocessing
import queue
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql

from worker.adapters.store import RETENTION_S, ClaimState, Store, open_store
from worker.adapters.store import sqlite as sqlite_store
from worker.adapters.store.base import CallRef, Send, SendState
from worker.adapters.store.memory import MemoryStore
from worker.adapters.store.postgres import POOL_SIZE, PostgresStore
from worker.adapters.store.redis import RedisStore
from worker.adapters.store.sqlite import SqliteStore
from worker.contract.errors import ConfigurationError, StoreError

T0 = 1_700_000_000.25
LEASE = 30.0
FP = "sha256:aaaa"
OTHER_FP = "sha256:bbbb"
#: A call key as the worker builds it: ``{pabx}:{ID_CHAMADA}`` (spaces, slashes, colons).
CALL = "pabx-a:08/07/24 10:46:19 010A 0974/00"
OTHER_CALL = "pabx-a:08/07/24 10:47:02 010A 0975/00"


# -- backends ----------------------------------------------------------------------------


def _cleanup_redis(url: str, prefix: str) -> None:
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)


def _drop_table(url: str, table: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for name in (table, f"{table}_calls", f"{table}_slots"):
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))
        functions = conn.execute(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE proname LIKE %s",
            (f"{table}\\_%",),
        ).fetchall()
        for (signature,) in functions:
            conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}").format(sql.SQL(signature)))


@contextmanager
def redis_store(url: str) -> Iterator[tuple[RedisStore, str]]:
    prefix = f"test:pabx:{uuid.uuid4().hex}:"
    store = RedisStore.from_url(url, prefix=prefix)
    try:
        yield store, prefix
    finally:
        store.close()
        _cleanup_redis(url, prefix)


@contextmanager
def postgres_store(url: str) -> Iterator[tuple[PostgresStore, str]]:
    table = f"pabx_test_{uuid.uuid4().hex[:16]}"
    store = PostgresStore(url, table=table)
    try:
        yield store, table
    finally:
        store.close()
        _drop_table(url, table)


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
    elif request.param == "sqlite":
        sqlite_store = SqliteStore(tmp_path / "store.db")
        try:
            yield sqlite_store
        finally:
            sqlite_store.close()
    elif request.param == "redis":
        with redis_store(request.getfixturevalue("redis_url")) as (rstore, _):
            yield rstore
    else:
        with postgres_store(request.getfixturevalue("postgres_url")) as (pstore, _):
            yield pstore


def _sent(
    store: Store,
    command_id: str,
    token: str | None,
    call: CallRef | None = None,
    *,
    now: float,
    lease_s: float = LEASE,
) -> Send:
    """``mark_sent`` with a token the test knows is set."""
    assert token is not None
    return store.mark_sent(command_id, token, call, now=now, lease_s=lease_s)


def _claimed(store: Store, command_id: str, *, now: float = T0) -> str:
    """Claim a new ``command_id``; returns its token."""
    claim = store.claim(command_id, FP, now=now, lease_s=LEASE)
    assert claim.state is ClaimState.NEW and claim.token is not None
    return claim.token


def _holding(store: Store, command_id: str, order: float, *, now: float, call: str = CALL) -> str:
    """Claim ``command_id`` at ``now`` and mark it sent for ``call``; returns its token."""
    token = _claimed(store, command_id, now=now)
    assert _sent(store, command_id, token, CallRef(call, order), now=now).state is SendState.SENT
    return token


# -- claim ----------------------------------------------------------------------------


def test_first_claim_is_new(store: Store) -> None:
    claim = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert claim.state is ClaimState.NEW
    assert claim.first_seen == T0
    assert claim.attempts == 0
    assert claim.token
    assert claim.outcome is None
    assert claim.lease_until is None


def test_claim_while_leased_is_busy_with_lease_until(store: Store) -> None:
    store.claim("c1", FP, now=T0, lease_s=LEASE)
    busy = store.claim("c1", FP, now=T0 + 1, lease_s=LEASE)
    assert busy.state is ClaimState.BUSY
    assert busy.lease_until == T0 + LEASE
    assert busy.first_seen == T0
    assert busy.token is None
    assert busy.outcome is None


def test_claim_repeated_with_its_own_token_takes_the_lease_again(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE, token="mine")
    assert (first.state, first.token) == (ClaimState.NEW, "mine")
    assert store.claim("c1", FP, now=T0 + 1, lease_s=LEASE, token="other").state is (
        ClaimState.BUSY
    )
    again = store.claim("c1", FP, now=T0 + 2, lease_s=LEASE, token="mine")
    assert (again.state, again.token, again.first_seen) == (ClaimState.NEW, "mine", T0)
    busy = store.claim("c1", FP, now=T0 + 3, lease_s=LEASE)
    assert busy.state is ClaimState.BUSY and busy.lease_until == T0 + 2 + LEASE
    assert store.mark_sent("c1", "mine", None, now=T0 + 3, lease_s=LEASE).attempts == 1


def test_ids_are_independent(store: Store) -> None:
    assert store.claim("c1", FP, now=T0, lease_s=LEASE).state is ClaimState.NEW
    assert store.claim("c2", FP, now=T0, lease_s=LEASE).state is ClaimState.NEW


def test_lapsed_lease_without_send_is_new(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    again = store.claim("c1", FP, now=T0 + LEASE + 1, lease_s=LEASE)
    assert again.state is ClaimState.NEW
    assert again.first_seen == T0
    assert again.attempts == 0
    assert again.token and again.token != first.token
    # The old holder lost the lease.
    assert _sent(store, "c1", first.token, now=T0 + LEASE + 2).state is SendState.LEASE_LOST


def test_lease_ends_exactly_at_lease_until(store: Store) -> None:
    store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert store.claim("c1", FP, now=T0 + LEASE, lease_s=LEASE).state is ClaimState.NEW


def test_lapsed_lease_after_send_is_takeover_with_attempts(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert _sent(store, "c1", first.token, now=T0 + 1) == Send(SendState.SENT, 1)
    assert _sent(store, "c1", first.token, now=T0 + 1) == Send(SendState.SENT, 2)
    taken = store.claim("c1", FP, now=T0 + 1 + LEASE, lease_s=LEASE)
    assert taken.state is ClaimState.TAKEOVER
    assert taken.attempts == 2
    assert taken.first_seen == T0
    assert taken.token and taken.token != first.token
    # Once taken over, the new lease is live again.
    assert store.claim("c1", FP, now=T0 + 2 + LEASE, lease_s=LEASE).state is ClaimState.BUSY


def test_mark_sent_renews_the_lease(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert _sent(store, "c1", first.token, now=T0 + 20) == Send(SendState.SENT, 1)
    busy = store.claim("c1", FP, now=T0 + LEASE + 1, lease_s=LEASE)
    assert busy.state is ClaimState.BUSY
    assert busy.lease_until == T0 + 20 + LEASE
    assert busy.attempts == 1


def test_different_fingerprint_is_conflict(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert _sent(store, "c1", first.token, now=T0).state is SendState.SENT
    conflict = store.claim("c1", OTHER_FP, now=T0 + 1, lease_s=LEASE)
    assert conflict.state is ClaimState.CONFLICT
    assert conflict.first_seen == T0
    assert conflict.attempts == 1
    assert conflict.token is None
    assert conflict.outcome is None
    # Still a conflict once the lease lapsed: the body never takes the id over.
    late = store.claim("c1", OTHER_FP, now=T0 + 10 * LEASE, lease_s=LEASE)
    assert late.state is ClaimState.CONFLICT


def test_different_fingerprint_after_done_is_conflict(store: Store) -> None:
    token = _claimed(store, "c1")
    assert store.record("c1", token, b"outcome", now=T0) == b"outcome"
    assert store.claim("c1", OTHER_FP, now=T0 + 1, lease_s=LEASE).state is ClaimState.CONFLICT


# -- mark_sent / record / release ------------------------------------------------------------


def test_record_then_claim_is_done_with_outcome(store: Store) -> None:
    outcome = b'{"status":"accepted"}\x00\xff\xfe binary-safe'
    token = _claimed(store, "c1")
    for expected in (1, 2, 3):
        assert _sent(store, "c1", token, now=T0 + 1) == Send(SendState.SENT, expected)
    assert store.record("c1", token, outcome, now=T0 + 1) == outcome
    done = store.claim("c1", FP, now=T0 + 2, lease_s=LEASE)
    assert done.state is ClaimState.DONE
    assert done.outcome == outcome
    assert isinstance(done.outcome, bytes)
    assert done.attempts == 3
    assert done.first_seen == T0
    assert done.token is None
    # Done is final: no lease lapse turns it back into a claim.
    assert store.claim("c1", FP, now=T0 + 10 * LEASE, lease_s=LEASE).state is ClaimState.DONE


def test_empty_outcome_is_an_outcome(store: Store) -> None:
    token = _claimed(store, "c1")
    assert store.record("c1", token, b"", now=T0) == b""
    done = store.claim("c1", FP, now=T0 + 1, lease_s=LEASE)
    assert done.state is ClaimState.DONE
    assert done.outcome == b""
    # An empty outcome is one: it wins over a later record, whatever the token.
    assert store.record("c1", token, b"later", now=T0 + 2) == b""
    assert store.record("c1", "any-token", b"later", now=T0 + 2) == b""


def test_record_twice_first_outcome_wins(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert _sent(store, "c1", first.token, now=T0) == Send(SendState.SENT, 1)
    taken = store.claim("c1", FP, now=T0 + LEASE, lease_s=LEASE)
    assert taken.state is ClaimState.TAKEOVER and taken.token is not None
    assert _sent(store, "c1", taken.token, now=T0 + LEASE) == Send(SendState.SENT, 2)
    assert store.record("c1", taken.token, b"first", now=T0 + LEASE) == b"first"
    # The slow original worker finishes late: its outcome is refused, the stored one returned.
    assert first.token is not None
    assert store.record("c1", first.token, b"second", now=T0 + LEASE + 1) == b"first"
    # So is a second record by the worker that stored it, and one with a made-up token.
    assert store.record("c1", taken.token, b"third", now=T0 + LEASE + 1) == b"first"
    assert store.record("c1", "not-a-token", b"fourth", now=T0 + LEASE + 1) == b"first"
    done = store.claim("c1", FP, now=T0 + LEASE + 1, lease_s=LEASE)
    assert done.outcome == b"first"
    assert done.attempts == 2


def test_attempts_are_the_stores_count(store: Store) -> None:
    token = _claimed(store, "c1")
    sends = [_sent(store, "c1", token, now=T0 + i) for i in range(4)]
    assert sends == [Send(SendState.SENT, n) for n in (1, 2, 3, 4)]
    assert store.record("c1", token, b"x", now=T0 + 5) == b"x"
    assert store.claim("c1", FP, now=T0 + 6, lease_s=LEASE).attempts == 4


def test_attempts_count_across_a_takeover(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert _sent(store, "c1", first.token, now=T0 + 1) == Send(SendState.SENT, 1)
    taken = store.claim("c1", FP, now=T0 + 1 + LEASE, lease_s=LEASE)
    assert taken.state is ClaimState.TAKEOVER
    assert taken.attempts == 1
    assert _sent(store, "c1", taken.token, now=T0 + 2 + LEASE) == Send(SendState.SENT, 2)
    # The lapsed worker cannot count (or send) any more.
    late = _sent(store, "c1", first.token, now=T0 + 3 + LEASE)
    assert late == Send(SendState.LEASE_LOST)
    assert store.claim("c1", FP, now=T0 + 3 + LEASE, lease_s=LEASE).attempts == 2


def test_mark_sent_with_a_stale_token_is_refused(store: Store) -> None:
    store.claim("c1", FP, now=T0, lease_s=LEASE)
    for call in (None, CallRef(CALL, T0)):
        assert _sent(store, "c1", "not-the-token", call, now=T0 + 1) == Send(SendState.LEASE_LOST)
        assert _sent(store, "unknown", "not-the-token", call, now=T0 + 1) == Send(
            SendState.LEASE_LOST
        )
    # Nothing changed: still claimed (not sent) with the first lease, no attempt counted.
    busy = store.claim("c1", FP, now=T0 + 2, lease_s=LEASE)
    assert busy.state is ClaimState.BUSY
    assert busy.lease_until == T0 + LEASE
    assert busy.attempts == 0
    assert store.claim("c1", FP, now=T0 + LEASE, lease_s=LEASE).state is ClaimState.NEW
    # Nor was the call taken: another command of it goes out.
    assert _holding(store, "c2", T0, now=T0 + 3)
    # Nor was an unknown id created.
    assert store.claim("unknown", FP, now=T0 + 4, lease_s=LEASE).first_seen == T0 + 4


def test_mark_sent_after_record_is_refused(store: Store) -> None:
    token = _claimed(store, "c1")
    store.record("c1", token, b"x", now=T0)
    assert _sent(store, "c1", token, now=T0 + 1) == Send(SendState.LEASE_LOST)
    assert _sent(store, "c1", token, CallRef(CALL, T0), now=T0 + 1) == Send(SendState.LEASE_LOST)
    done = store.claim("c1", FP, now=T0 + 2, lease_s=LEASE)
    assert done.state is ClaimState.DONE
    assert done.attempts == 0


def test_release_makes_the_next_claim_new_at_once(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert _sent(store, "c1", first.token, now=T0 + 1) == Send(SendState.SENT, 1)
    assert _sent(store, "c1", first.token, now=T0 + 1) == Send(SendState.SENT, 2)
    assert first.token is not None
    store.release("c1", first.token, now=T0 + 1)
    # The lease had time left, and the command had been sent: released wins over both.
    again = store.claim("c1", FP, now=T0 + 2, lease_s=LEASE)
    assert again.state is ClaimState.NEW
    assert again.attempts == 2
    assert again.first_seen == T0
    assert again.token and again.token != first.token
    # The released token is dead; the new one counts on from the stored attempts.
    assert _sent(store, "c1", first.token, now=T0 + 3) == Send(SendState.LEASE_LOST)
    assert _sent(store, "c1", again.token, now=T0 + 3) == Send(SendState.SENT, 3)


def test_release_with_a_stale_token_does_nothing(store: Store) -> None:
    store.claim("c1", FP, now=T0, lease_s=LEASE)
    store.release("c1", "not-the-token", now=T0)
    store.release("unknown", "not-the-token", now=T0)
    busy = store.claim("c1", FP, now=T0 + 1, lease_s=LEASE)
    assert busy.state is ClaimState.BUSY
    assert busy.lease_until == T0 + LEASE
    assert busy.attempts == 0
    assert store.claim("unknown", FP, now=T0 + 2, lease_s=LEASE).state is ClaimState.NEW


def test_release_after_record_does_nothing(store: Store) -> None:
    token = _claimed(store, "c1")
    assert _sent(store, "c1", token, now=T0) == Send(SendState.SENT, 1)
    store.record("c1", token, b"x", now=T0)
    store.release("c1", token, now=T0 + 1)
    done = store.claim("c1", FP, now=T0 + 1, lease_s=LEASE)
    assert done.state is ClaimState.DONE
    assert done.outcome == b"x"
    assert done.attempts == 1


def test_record_of_a_missing_record_returns_the_outcome_and_stores_nothing(store: Store) -> None:
    assert store.record("nope", "t", b"x", now=T0) == b"x"
    first = store.claim("nope", FP, now=T0 + 1, lease_s=LEASE)
    assert first.state is ClaimState.NEW
    assert first.first_seen == T0 + 1


# -- fencing: a worker whose lease was taken over --------------------------------------------


def test_a_stale_token_changes_nothing_after_a_takeover(store: Store) -> None:
    old = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert old.token is not None
    assert _sent(store, "c1", old.token, CallRef(CALL, T0), now=T0 + 1) == Send(SendState.SENT, 1)
    new = store.claim("c1", FP, now=T0 + 1 + LEASE, lease_s=LEASE)
    assert new.state is ClaimState.TAKEOVER and new.token is not None
    later = T0 + 2 + LEASE
    # The worker that lost its lease wakes up: every step is refused and changes nothing.
    assert _sent(store, "c1", old.token, CallRef(CALL, T0), now=later) == Send(SendState.LEASE_LOST)
    assert _sent(store, "c1", old.token, now=later) == Send(SendState.LEASE_LOST)
    assert store.renew("c1", old.token, now=later, lease_s=LEASE) is False
    assert store.record("c1", old.token, b"stale", now=later) is None
    store.release("c1", old.token, now=later)
    busy = store.claim("c1", FP, now=later, lease_s=LEASE)
    assert busy.state is ClaimState.BUSY  # not released, no outcome stored
    assert busy.outcome is None
    assert busy.lease_until == T0 + 1 + 2 * LEASE  # the new holder's lease, not renewed
    assert busy.attempts == 1
    # The new holder goes on: sends (the count goes on) and records.
    assert _sent(store, "c1", new.token, CallRef(CALL, T0), now=later) == Send(SendState.SENT, 2)
    assert store.record("c1", new.token, b"fresh", now=later) == b"fresh"
    # Now the stale worker's record returns the stored outcome.
    assert store.record("c1", old.token, b"stale", now=later + 1) == b"fresh"
    done = store.claim("c1", FP, now=later + 1, lease_s=LEASE)
    assert done.state is ClaimState.DONE
    assert done.outcome == b"fresh"
    assert done.attempts == 2


def test_a_stale_record_before_the_takeover_sends_stores_nothing(store: Store) -> None:
    old = store.claim("c1", FP, now=T0, lease_s=LEASE)
    new = store.claim("c1", FP, now=T0 + LEASE, lease_s=LEASE)
    assert new.state is ClaimState.NEW and old.token is not None and new.token is not None
    assert store.record("c1", old.token, b"stale", now=T0 + LEASE + 1) is None
    # No outcome was stored: a claim after the new lease lapses takes the command again.
    again = store.claim("c1", FP, now=T0 + 2 * LEASE + 1, lease_s=LEASE)
    assert again.state is ClaimState.NEW
    assert again.outcome is None
    assert again.token is not None
    assert store.record("c1", again.token, b"fresh", now=T0 + 2 * LEASE + 2) == b"fresh"
    assert store.record("c1", new.token, b"late", now=T0 + 2 * LEASE + 3) == b"fresh"


# -- renew ------------------------------------------------------------------------------------


def test_renew_extends_the_lease(store: Store) -> None:
    token = _claimed(store, "c1")
    assert store.renew("c1", token, now=T0 + 20, lease_s=LEASE) is True
    busy = store.claim("c1", FP, now=T0 + LEASE, lease_s=LEASE)  # the old lease_until
    assert busy.state is ClaimState.BUSY
    assert busy.lease_until == T0 + 20 + LEASE
    assert busy.attempts == 0
    # Renewing does not make it sent: once the renewed lease lapses the claim is NEW.
    assert store.claim("c1", FP, now=T0 + 20 + LEASE, lease_s=LEASE).state is ClaimState.NEW


def test_renew_after_a_send_keeps_it_sent(store: Store) -> None:
    token = _claimed(store, "c1")
    assert _sent(store, "c1", token, now=T0 + 1) == Send(SendState.SENT, 1)
    assert store.renew("c1", token, now=T0 + 25, lease_s=LEASE) is True
    assert store.claim("c1", FP, now=T0 + 1 + LEASE, lease_s=LEASE).state is ClaimState.BUSY
    taken = store.claim("c1", FP, now=T0 + 25 + LEASE, lease_s=LEASE)
    assert taken.state is ClaimState.TAKEOVER
    assert taken.attempts == 1


def test_renew_fails_after_a_takeover_record_or_release(store: Store) -> None:
    old = _claimed(store, "c1")
    new = store.claim("c1", FP, now=T0 + LEASE, lease_s=LEASE)
    assert new.token is not None
    assert store.renew("c1", old, now=T0 + LEASE + 1, lease_s=100) is False
    busy = store.claim("c1", FP, now=T0 + LEASE + 2, lease_s=LEASE)
    assert busy.lease_until == T0 + 2 * LEASE  # the new holder's, untouched
    assert store.renew("c1", "not-a-token", now=T0 + LEASE + 1, lease_s=100) is False
    assert store.renew("unknown", "not-a-token", now=T0 + LEASE + 1, lease_s=100) is False
    store.release("c1", new.token, now=T0 + LEASE + 3)
    assert store.renew("c1", new.token, now=T0 + LEASE + 4, lease_s=100) is False
    token = _claimed(store, "c2")
    store.record("c2", token, b"x", now=T0 + 1)
    assert store.renew("c2", token, now=T0 + 2, lease_s=100) is False
    assert store.claim("c2", FP, now=T0 + 3, lease_s=LEASE).state is ClaimState.DONE
    assert store.claim("unknown", FP, now=T0 + 5, lease_s=LEASE).first_seen == T0 + 5


# -- the per-call record -------------------------------------------------------------------


def _state(store: Store, command_id: str, *, now: float) -> tuple[ClaimState, int, float | None]:
    """What a claim of ``command_id`` sees: state, attempts, lease_until (for BUSY)."""
    claim = store.claim(command_id, FP, now=now, lease_s=LEASE)
    return claim.state, claim.attempts, claim.lease_until


def test_a_second_command_of_a_call_is_busy_while_the_first_holds_it(store: Store) -> None:
    first = _holding(store, "first", T0, now=T0 + 1)
    second = _claimed(store, "second", now=T0 + 2)
    busy = _sent(store, "second", second, CallRef(CALL, T0 + 1), now=T0 + 3)
    assert busy == Send(SendState.CALL_BUSY, busy_until=T0 + 1 + LEASE)
    # Another call is independent, and so is a send without a call.
    assert _holding(store, "other", T0, now=T0 + 3, call=OTHER_CALL)
    # The first records: the call is free, the second goes out.
    assert store.record("first", first, b"x", now=T0 + 4) == b"x"
    assert _sent(store, "second", second, CallRef(CALL, T0 + 1), now=T0 + 5) == Send(
        SendState.SENT, 1
    )
    # ...and now holds it in turn.
    third = _claimed(store, "third", now=T0 + 5)
    assert _sent(store, "third", third, CallRef(CALL, T0 + 2), now=T0 + 6) == Send(
        SendState.CALL_BUSY, busy_until=T0 + 5 + LEASE
    )


def test_release_lets_go_of_the_call(store: Store) -> None:
    first = _holding(store, "first", T0, now=T0 + 1)
    second = _claimed(store, "second", now=T0 + 2)
    assert _sent(store, "second", second, CallRef(CALL, T0 + 1), now=T0 + 3).state is (
        SendState.CALL_BUSY
    )
    store.release("first", first, now=T0 + 4)
    assert _sent(store, "second", second, CallRef(CALL, T0 + 1), now=T0 + 5) == Send(
        SendState.SENT, 1
    )
    # The released first command, claimed again, is older than the second: superseded.
    again = store.claim("first", FP, now=T0 + 6, lease_s=LEASE)
    assert again.state is ClaimState.NEW and again.attempts == 1
    assert _sent(store, "first", again.token, CallRef(CALL, T0), now=T0 + 7) == Send(
        SendState.SUPERSEDED, newer="second"
    )


@pytest.mark.parametrize("let_go", ["record", "release"])
def test_a_hold_kept_after_an_unanswered_request_lapses_at_its_end(
    store: Store, let_go: str
) -> None:
    first = _holding(store, "first", T0, now=T0 + 1)
    if let_go == "record":
        assert store.record("first", first, b"x", now=T0 + 2, hold_call_s=3) == b"x"
    else:
        store.release("first", first, now=T0 + 2, hold_call_s=3)
    # The command is done (or released), but its call stays held until T0 + 5...
    assert _state(store, "first", now=T0 + 2)[0] is (
        ClaimState.DONE if let_go == "record" else ClaimState.NEW
    )
    second = _claimed(store, "second", now=T0 + 2)
    assert _sent(store, "second", second, CallRef(CALL, T0 + 1), now=T0 + 4.5) == Send(
        SendState.CALL_BUSY, busy_until=T0 + 5
    )
    # ...other calls are free meanwhile...
    assert _holding(store, "other", T0, now=T0 + 3, call=OTHER_CALL)
    # ...and at T0 + 5 the hold has lapsed: the newer command goes out.
    assert _sent(store, "second", second, CallRef(CALL, T0 + 1), now=T0 + 5) == Send(
        SendState.SENT, 1
    )


def test_a_kept_hold_never_takes_a_call_another_command_holds(store: Store) -> None:
    first = _holding(store, "first", T0, now=T0 + 1)
    releasing = _holding(store, "releasing", T0, now=T0 + 1, call=OTHER_CALL)
    # Their holds lapse with their leases; newer commands take the calls; the first two,
    # done late, keep no hold on calls that are no longer theirs.
    second = _holding(store, "second", T0 + 1, now=T0 + 1 + LEASE)
    other = _holding(store, "other", T0 + 1, now=T0 + 1 + LEASE, call=OTHER_CALL)
    assert store.record("first", first, b"x", now=T0 + 2 + LEASE, hold_call_s=100) == b"x"
    store.release("releasing", releasing, now=T0 + 2 + LEASE, hold_call_s=100)
    assert store.record("other", other, b"z", now=T0 + 3 + LEASE) == b"z"
    late = _claimed(store, "late", now=T0 + 3 + LEASE)
    assert _sent(store, "late", late, CallRef(OTHER_CALL, T0 + 2), now=T0 + 3 + LEASE).state is (
        SendState.SENT
    )
    third = _claimed(store, "third", now=T0 + 3 + LEASE)
    assert _sent(store, "third", third, CallRef(CALL, T0 + 2), now=T0 + 3 + LEASE) == Send(
        SendState.CALL_BUSY, busy_until=T0 + 1 + 2 * LEASE
    )
    # The holder lets go normally: the call is free at once.
    assert store.record("second", second, b"y", now=T0 + 4 + LEASE) == b"y"
    assert _sent(store, "third", third, CallRef(CALL, T0 + 2), now=T0 + 4 + LEASE).state is (
        SendState.SENT
    )


def test_refusals_change_nothing(store: Store) -> None:
    holder = _holding(store, "holder", T0 + 10, now=T0 + 1)
    busy = _claimed(store, "busy", now=T0 + 1)
    old = _claimed(store, "old", now=T0 + 1)
    for _ in range(2):  # refused twice: nothing counted either time
        assert _sent(store, "busy", busy, CallRef(CALL, T0 + 20), now=T0 + 2).state is (
            SendState.CALL_BUSY
        )
        assert _sent(store, "old", old, CallRef(CALL, T0 + 5), now=T0 + 2) == Send(
            SendState.SUPERSEDED, newer="holder"
        )
    # The refused commands are as claimed: no attempt, first lease, never sent.
    for command_id in ("busy", "old"):
        assert _state(store, command_id, now=T0 + 3) == (ClaimState.BUSY, 0, T0 + 1 + LEASE)
        assert _state(store, command_id, now=T0 + 1 + LEASE)[:2] == (ClaimState.NEW, 0)
    # The call is still the holder's (busy_until untouched) and "holder" is still the newest:
    # a command ordered between the two refused ones is superseded by it, not by "busy".
    probe = _claimed(store, "probe", now=T0 + 3)
    assert _sent(store, "probe", probe, CallRef(CALL, T0 + 15), now=T0 + 4) == Send(
        SendState.CALL_BUSY, busy_until=T0 + 1 + LEASE
    )
    assert store.record("holder", holder, b"x", now=T0 + 5) == b"x"
    between = _claimed(store, "between", now=T0 + 5)
    assert _sent(store, "between", between, CallRef(CALL, T0 + 9), now=T0 + 6) == Send(
        SendState.SUPERSEDED, newer="holder"
    )


def test_an_older_command_after_a_newer_one_was_sent_is_superseded(store: Store) -> None:
    newer = _holding(store, "newer", T0 + 10, now=T0 + 1)
    older = _claimed(store, "older", now=T0 + 2)
    # Superseded comes first: even while the newer one holds the call.
    assert _sent(store, "older", older, CallRef(CALL, T0 + 5), now=T0 + 3) == Send(
        SendState.SUPERSEDED, newer="newer"
    )
    # After the newer one finished, and after its hold would have lapsed: still superseded.
    assert store.record("newer", newer, b"x", now=T0 + 4) == b"x"
    for now in (T0 + 5, T0 + 10 * LEASE):
        assert _sent(store, "older", older, CallRef(CALL, T0 + 5), now=now) == Send(
            SendState.SUPERSEDED, newer="newer"
        )
    # A command newer still goes out and becomes the newest.
    newest = _holding(store, "newest", T0 + 20, now=T0 + 6)
    assert store.record("newest", newest, b"y", now=T0 + 7) == b"y"
    late = _claimed(store, "late", now=T0 + 8)
    assert _sent(store, "late", late, CallRef(CALL, T0 + 15), now=T0 + 9) == Send(
        SendState.SUPERSEDED, newer="newest"
    )


def test_equal_order_is_not_superseded(store: Store) -> None:
    first = _holding(store, "first", T0 + 10, now=T0 + 1)
    assert store.record("first", first, b"x", now=T0 + 2) == b"x"
    twin = _claimed(store, "twin", now=T0 + 3)
    assert _sent(store, "twin", twin, CallRef(CALL, T0 + 10), now=T0 + 4) == Send(SendState.SENT, 1)
    assert store.record("twin", twin, b"y", now=T0 + 5) == b"y"
    # The later of two equals is the newest now.
    older = _claimed(store, "older", now=T0 + 6)
    assert _sent(store, "older", older, CallRef(CALL, T0 + 9.5), now=T0 + 7) == Send(
        SendState.SUPERSEDED, newer="twin"
    )


def test_a_newer_command_does_not_wait_for_an_older_one_to_be_superseded(store: Store) -> None:
    """An older send after a newer one keeps the newer one as the call's newest."""
    older = _holding(store, "older", T0 + 5, now=T0 + 1)
    assert store.record("older", older, b"x", now=T0 + 2) == b"x"
    newer = _holding(store, "newer", T0 + 10, now=T0 + 3)
    assert store.record("newer", newer, b"y", now=T0 + 4) == b"y"
    middle = _claimed(store, "middle", now=T0 + 5)
    assert _sent(store, "middle", middle, CallRef(CALL, T0 + 7), now=T0 + 6) == Send(
        SendState.SUPERSEDED, newer="newer"
    )


def test_a_call_hold_lapses_with_the_holders_lease(store: Store) -> None:
    silent = _holding(store, "silent", T0, now=T0 + 1)  # sends, then is never heard of
    second = _claimed(store, "second", now=T0 + 2)
    assert _sent(store, "second", second, CallRef(CALL, T0 + 1), now=T0 + LEASE) == Send(
        SendState.CALL_BUSY, busy_until=T0 + 1 + LEASE
    )
    # The hold ends exactly at holder_until, like a lease.
    assert _sent(store, "second", second, CallRef(CALL, T0 + 1), now=T0 + 1 + LEASE) == Send(
        SendState.SENT, 1
    )
    # The silent one comes back and records (its own lease was never taken over): its
    # outcome is stored, but the call is the second's now and stays held.
    assert store.record("silent", silent, b"late", now=T0 + 2 + LEASE) == b"late"
    third = _claimed(store, "third", now=T0 + 2 + LEASE)
    assert _sent(store, "third", third, CallRef(CALL, T0 + 2), now=T0 + 3 + LEASE) == Send(
        SendState.CALL_BUSY, busy_until=T0 + 1 + 2 * LEASE
    )


def test_renew_extends_the_call_hold(store: Store) -> None:
    first = _holding(store, "first", T0, now=T0 + 1)
    assert store.renew("first", first, now=T0 + 20, lease_s=LEASE) is True
    second = _claimed(store, "second", now=T0 + 2)
    assert _sent(store, "second", second, CallRef(CALL, T0 + 1), now=T0 + 1 + LEASE) == Send(
        SendState.CALL_BUSY, busy_until=T0 + 20 + LEASE
    )
    assert _sent(store, "second", second, CallRef(CALL, T0 + 1), now=T0 + 20 + LEASE) == Send(
        SendState.SENT, 1
    )


def test_renew_does_not_extend_a_hold_another_command_took(store: Store) -> None:
    first = _holding(store, "first", T0, now=T0 + 1)
    second = _claimed(store, "second", now=T0 + 2)
    store.renew("second", second, now=T0 + LEASE, lease_s=LEASE)
    # first's hold lapsed (its own lease too, but nobody took the command over).
    assert _sent(store, "second", second, CallRef(CALL, T0 + 1), now=T0 + 1 + LEASE) == Send(
        SendState.SENT, 1
    )
    assert store.renew("first", first, now=T0 + 2 + LEASE, lease_s=100) is True
    third = _claimed(store, "third", now=T0 + 3 + LEASE)
    assert _sent(store, "third", third, CallRef(CALL, T0 + 2), now=T0 + 4 + LEASE) == Send(
        SendState.CALL_BUSY, busy_until=T0 + 1 + 2 * LEASE
    )


def test_a_takeover_of_the_holding_command_can_send_while_it_holds_the_call(
    store: Store,
) -> None:
    first = _holding(store, "c1", T0, now=T0 + 1)
    taken = store.claim("c1", FP, now=T0 + 1 + LEASE, lease_s=LEASE)
    assert taken.state is ClaimState.TAKEOVER and taken.token != first
    # The taker's clock is behind: for it the hold (c1's own) is still live. Another command
    # of the call is refused at that time, while c1 itself, with its new token, may send.
    other = _claimed(store, "other", now=T0 + 2)
    assert _sent(store, "other", other, CallRef(CALL, T0 + 1), now=T0 + 10) == Send(
        SendState.CALL_BUSY, busy_until=T0 + 1 + LEASE
    )
    assert _sent(store, "c1", taken.token, CallRef(CALL, T0), now=T0 + 10) == Send(
        SendState.SENT, 2
    )
    # Sending again renews c1's hold on the call.
    assert _sent(store, "other", other, CallRef(CALL, T0 + 1), now=T0 + 11) == Send(
        SendState.CALL_BUSY, busy_until=T0 + 10 + LEASE
    )
    # The old token can neither send nor let go of the call.
    assert _sent(store, "c1", first, CallRef(CALL, T0), now=T0 + 12).state is (SendState.LEASE_LOST)
    store.release("c1", first, now=T0 + 12)
    assert store.record("c1", first, b"stale", now=T0 + 12) is None
    assert _sent(store, "other", other, CallRef(CALL, T0 + 1), now=T0 + 13).state is (
        SendState.CALL_BUSY
    )
    assert store.record("c1", taken.token or "", b"done", now=T0 + 14) == b"done"
    assert _sent(store, "other", other, CallRef(CALL, T0 + 1), now=T0 + 15) == Send(
        SendState.SENT, 1
    )


def test_a_command_sent_again_keeps_its_hold_and_is_not_its_own_newer(store: Store) -> None:
    token = _holding(store, "c1", T0 + 10, now=T0 + 1)
    for expected in (2, 3):
        assert _sent(store, "c1", token, CallRef(CALL, T0 + 10), now=T0 + expected) == Send(
            SendState.SENT, expected
        )
    other = _claimed(store, "other", now=T0 + 4)
    assert _sent(store, "other", other, CallRef(CALL, T0 + 20), now=T0 + 5) == Send(
        SendState.CALL_BUSY, busy_until=T0 + 3 + LEASE
    )


def test_threads_sending_commands_of_one_call_get_one_sent(store: Store) -> None:
    threads_n = 12
    tokens = {f"t{i}": _claimed(store, f"t{i}") for i in range(threads_n)}
    barrier = threading.Barrier(threads_n)
    answers: dict[str, Send] = {}
    errors: list[BaseException] = []

    def run(command_id: str, order: float) -> None:
        try:
            barrier.wait(timeout=20)
            call = CallRef(CALL, order)
            answers[command_id] = _sent(store, command_id, tokens[command_id], call, now=T0 + 1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(command_id, T0 + i % 3))
        for i, command_id in enumerate(tokens)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=50)
    assert not errors
    _assert_one_sent(answers, now=T0 + 1)


def _assert_one_sent(answers: dict[str, Send], *, now: float) -> None:
    """Exactly one SENT; every other answer a refusal that names it or its hold."""
    winners = [c for c, send in answers.items() if send.state is SendState.SENT]
    assert len(winners) == 1, answers
    assert answers[winners[0]].attempts == 1
    for command_id, send in answers.items():
        if command_id == winners[0]:
            continue
        assert send.state in (SendState.CALL_BUSY, SendState.SUPERSEDED), (command_id, send)
        if send.state is SendState.SUPERSEDED:
            assert send.newer == winners[0]
        else:
            assert send.busy_until == now + LEASE


# -- reserve_slot ---------------------------------------------------------------------------


# -- claim_and_send: claim, then mark_sent, as one step ----------------------------------


def _claim_and_send(
    store: Store, command_id: str, call: CallRef | None, *, now: float, fp: str = FP
) -> tuple[Any, Send | None]:
    return store.claim_and_send(
        command_id, fp, call, now=now, lease_s=LEASE, token=uuid.uuid4().hex
    )


def test_claim_and_send_of_a_new_command_is_new_and_sent(store: Store) -> None:
    claim, sent = _claim_and_send(store, "c1", CallRef(CALL, T0), now=T0)
    assert claim.state is ClaimState.NEW and claim.attempts == 0 and claim.first_seen == T0
    assert sent == Send(SendState.SENT, 1)
    # It holds the call and counts the request, exactly as mark_sent would have.
    other = _claimed(store, "c2", now=T0 + 1)
    busy = _sent(store, "c2", other, CallRef(CALL, T0 + 1), now=T0 + 1)
    assert busy.state is SendState.CALL_BUSY and busy.busy_until == T0 + LEASE
    assert claim.token is not None
    assert store.record("c1", claim.token, b"ok", now=T0 + 2) == b"ok"
    assert store.claim("c1", FP, now=T0 + 3, lease_s=LEASE).attempts == 1


def test_claim_and_send_without_a_call(store: Store) -> None:
    claim, sent = _claim_and_send(store, "c1", None, now=T0)
    assert claim.state is ClaimState.NEW and sent == Send(SendState.SENT, 1)
    assert claim.token is not None
    assert _sent(store, "c1", claim.token, now=T0 + 1) == Send(SendState.SENT, 2)


def test_claim_and_send_sends_nothing_unless_the_claim_takes_the_lease(store: Store) -> None:
    token = _holding(store, "c1", T0, now=T0)
    claim, sent = _claim_and_send(store, "c1", CallRef(CALL, T0), now=T0 + 1)
    assert claim.state is ClaimState.BUSY and sent is None
    claim, sent = _claim_and_send(store, "c1", CallRef(CALL, T0), now=T0 + 1, fp=OTHER_FP)
    assert claim.state is ClaimState.CONFLICT and sent is None
    store.record("c1", token, b"done", now=T0 + 2)
    claim, sent = _claim_and_send(store, "c1", CallRef(CALL, T0), now=T0 + 3)
    assert claim.state is ClaimState.DONE and claim.outcome == b"done" and sent is None
    assert claim.attempts == 1  # nothing counted by the refused steps


def test_claim_and_send_after_a_lapsed_send_is_takeover_counting_on(store: Store) -> None:
    _holding(store, "c1", T0, now=T0)
    claim, sent = _claim_and_send(store, "c1", CallRef(CALL, T0), now=T0 + LEASE + 1)
    assert claim.state is ClaimState.TAKEOVER and claim.attempts == 1
    assert sent == Send(SendState.SENT, 2)


def test_claim_and_send_keeps_the_lease_when_the_call_refuses(store: Store) -> None:
    _holding(store, "c1", T0 + 5, now=T0)  # a newer command of the call, still holding it
    claim, sent = _claim_and_send(store, "c2", CallRef(CALL, T0 + 9), now=T0 + 1)
    assert claim.state is ClaimState.NEW
    assert sent is not None and sent.state is SendState.CALL_BUSY
    claim_old, superseded = _claim_and_send(store, "c3", CallRef(CALL, T0), now=T0 + 1)
    assert superseded == Send(SendState.SUPERSEDED, newer="c1")
    # Refused sends count nothing, and the leases were taken: others find them busy.
    assert store.claim("c2", FP, now=T0 + 2, lease_s=LEASE).state is ClaimState.BUSY
    assert claim.token is not None and claim_old.token is not None
    assert _sent(store, "c2", claim.token, None, now=T0 + 2) == Send(SendState.SENT, 1)


def test_claim_and_send_of_an_older_command_with_the_call_free_is_superseded(
    store: Store,
) -> None:
    newer = _holding(store, "newer", T0 + 10, now=T0 + 1)
    assert store.record("newer", newer, b"x", now=T0 + 2) == b"x"  # the call is free again
    claim, sent = _claim_and_send(store, "older", CallRef(CALL, T0 + 5), now=T0 + 3)
    assert claim.state is ClaimState.NEW and sent == Send(SendState.SUPERSEDED, newer="newer")
    assert claim.token is not None
    assert _state(store, "older", now=T0 + 3 + LEASE)[:2] == (ClaimState.NEW, 0)  # not counted
    # Equal order is not older: it goes out, and is the call's newest from then on.
    twin, sent = _claim_and_send(store, "twin", CallRef(CALL, T0 + 10), now=T0 + 4)
    assert sent == Send(SendState.SENT, 1)
    assert twin.token is not None and store.record("twin", twin.token, b"y", now=T0 + 5) == b"y"
    _, sent = _claim_and_send(store, "late", CallRef(CALL, T0 + 9), now=T0 + 6)
    assert sent == Send(SendState.SUPERSEDED, newer="twin")


def test_claim_and_send_after_the_newer_holders_lease_lapsed_is_still_superseded(
    store: Store,
) -> None:
    _holding(store, "newer", T0 + 10, now=T0)  # sends, then is never heard of
    _, sent = _claim_and_send(store, "older", CallRef(CALL, T0 + 5), now=T0 + 10 * LEASE)
    assert sent == Send(SendState.SUPERSEDED, newer="newer")
    _, sent = _claim_and_send(store, "newest", CallRef(CALL, T0 + 20), now=T0 + 10 * LEASE)
    assert sent == Send(SendState.SENT, 1)


def test_claim_and_send_repeated_with_its_token_is_new_and_counts_on(store: Store) -> None:
    """A repeat after a lost answer (store outage): the lease is its own, as claim says."""
    call = CallRef(CALL, T0)
    first = store.claim_and_send("c1", FP, call, now=T0, lease_s=LEASE, token="tok")
    again = store.claim_and_send("c1", FP, call, now=T0 + 1, lease_s=LEASE, token="tok")
    assert first[1] == Send(SendState.SENT, 1)
    claim, sent = again
    assert (claim.state, claim.first_seen, claim.attempts, claim.token) == (
        ClaimState.NEW,
        T0,
        1,
        "tok",
    )
    assert sent == Send(SendState.SENT, 2)  # never fewer attempts than requests


def test_threads_claim_and_send_one_call_get_one_sent(store: Store) -> None:
    barrier = threading.Barrier(8)
    results: queue.Queue[tuple[Any, Send | None]] = queue.Queue()

    def worker(i: int) -> None:
        barrier.wait()
        results.put(_claim_and_send(store, f"c{i}", CallRef(CALL, T0), now=T0))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    answers = [results.get_nowait() for _ in threads]
    assert all(claim.state is ClaimState.NEW for claim, _ in answers)
    states = Counter(sent.state for _, sent in answers if sent is not None)
    assert states == {SendState.SENT: 1, SendState.CALL_BUSY: 7}


def test_reserve_slot_spaces_requests_interval_apart(store: Store) -> None:
    waits = [store.reserve_slot("pabx-a", interval_s=1.0) for _ in range(3)]
    assert 0.0 <= waits[0] <= 0.05
    assert waits[1] == pytest.approx(1.0, abs=0.05)
    assert waits[2] == pytest.approx(2.0, abs=0.05)
    # Another target has its own schedule.
    assert 0.0 <= store.reserve_slot("pabx-b", interval_s=1.0) <= 0.05
    assert store.reserve_slot("pabx-b", interval_s=1.0) == pytest.approx(1.0, abs=0.05)
    assert store.reserve_slot("pabx-a", interval_s=1.0) == pytest.approx(3.0, abs=0.05)


def test_reserve_slot_after_the_schedule_passed_is_now(store: Store) -> None:
    assert store.reserve_slot("pabx-a", interval_s=0.05) <= 0.05
    time.sleep(0.15)  # the next slot is in the past: no backlog is kept
    assert store.reserve_slot("pabx-a", interval_s=0.05) <= 0.01
    assert store.reserve_slot("pabx-a", interval_s=0.05) == pytest.approx(0.05, abs=0.03)


def _assert_spaced(windows: list[tuple[float, float]], count: int, interval: float) -> None:
    """``count`` slots, each known to lie in a window of this host's clock, spaced apart.

    A slot's absolute time is the store's clock at the reservation plus the wait: the
    caller reads ``time.time()`` before and after the call, so the slot lies between
    ``before + wait`` and ``after + wait``. Every two slots must be at least ``interval``
    apart in some placement inside their windows (a store that hands one slot out twice
    fails this as soon as the windows are narrower than ``interval``; scheduling noise on
    a busy host, which widens windows, cannot make a correct store fail it).
    """
    assert len(windows) == count
    for (lo_a, hi_a), (lo_b, hi_b) in itertools.combinations(windows, 2):
        assert max(hi_b - lo_a, hi_a - lo_b) >= interval - 1e-6, ((lo_a, hi_a), (lo_b, hi_b))
    # Back to back: the schedule spans at least count - 1 intervals, and not much more.
    lows, highs = [lo for lo, _ in windows], [hi for _, hi in windows]
    assert max(highs) - min(lows) >= (count - 1) * interval - 1e-6
    assert max(lows) - min(highs) <= (count - 1) * interval + 1.0
    # Estimated from the end of each call, most gaps are one interval (noise aside).
    ordered = sorted(hi for _, hi in windows)
    gaps = sorted(b - a for a, b in itertools.pairwise(ordered))
    assert gaps[len(gaps) // 2] == pytest.approx(interval, abs=interval * 0.1)


# -- reopen ---------------------------------------------------------------------------------


def _done(store: Store, command_id: str, outcome: bytes, attempts: int = 2) -> str:
    """Claim, send ``attempts`` times and finish ``command_id``; returns the (now dead) token."""
    first = store.claim(command_id, FP, now=T0, lease_s=LEASE)
    assert first.state is ClaimState.NEW and first.token is not None
    for count in range(1, attempts + 1):
        assert _sent(store, command_id, first.token, now=T0 + 1) == Send(SendState.SENT, count)
    assert store.record(command_id, first.token, outcome, now=T0 + 1) == outcome
    return first.token


def test_reopen_with_the_stored_outcome_claims_the_command(store: Store) -> None:
    old_token = _done(store, "c1", b"old\x00\xff", attempts=2)
    reopened = store.reopen("c1", b"old\x00\xff", now=T0 + 5, lease_s=LEASE)
    assert reopened.state is ClaimState.NEW
    assert reopened.token and reopened.token != old_token
    assert reopened.attempts == 2
    assert reopened.first_seen == T0
    assert reopened.outcome is None
    assert reopened.lease_until is None
    # The replay holds a live lease: a claim of the same id and body is BUSY.
    busy = store.claim("c1", FP, now=T0 + 6, lease_s=LEASE)
    assert busy.state is ClaimState.BUSY
    assert busy.lease_until == T0 + 5 + LEASE
    assert busy.attempts == 2
    assert busy.first_seen == T0
    # The fingerprint is kept: another body is still a conflict.
    assert store.claim("c1", OTHER_FP, now=T0 + 6, lease_s=LEASE).state is ClaimState.CONFLICT
    # Only the new token can send.
    assert _sent(store, "c1", old_token, now=T0 + 7) == Send(SendState.LEASE_LOST)
    assert store.record("c1", old_token, b"stale", now=T0 + 7) is None
    assert _sent(store, "c1", reopened.token, now=T0 + 7) == Send(SendState.SENT, 3)


def test_record_after_reopen_stores_the_new_outcome(store: Store) -> None:
    _done(store, "c1", b"old", attempts=2)
    reopened = store.reopen("c1", b"old", now=T0 + 5, lease_s=LEASE)
    assert reopened.state is ClaimState.NEW and reopened.token is not None
    assert _sent(store, "c1", reopened.token, now=T0 + 6) == Send(SendState.SENT, 3)
    assert store.record("c1", reopened.token, b"new", now=T0 + 6) == b"new"
    done = store.claim("c1", FP, now=T0 + 7, lease_s=LEASE)
    assert done.state is ClaimState.DONE
    assert done.outcome == b"new"
    assert done.attempts == 3
    assert done.first_seen == T0


def test_reopen_with_a_stale_outcome_is_done_with_the_stored_one(store: Store) -> None:
    _done(store, "c1", b"old", attempts=2)
    reopened = store.reopen("c1", b"old", now=T0 + 5, lease_s=LEASE)
    assert reopened.token is not None
    assert store.record("c1", reopened.token, b"new", now=T0 + 5) == b"new"
    # A second operator replays from the old outcome: the newer one is answered, untouched.
    for stale in (b"old", b"ne", b"new ", b""):
        late = store.reopen("c1", stale, now=T0 + 6, lease_s=LEASE)
        assert late.state is ClaimState.DONE
        assert late.outcome == b"new"
        assert late.token is None
        assert late.attempts == 2
        assert late.first_seen == T0
    assert store.claim("c1", FP, now=T0 + 7, lease_s=LEASE).outcome == b"new"


def test_reopen_of_an_empty_outcome(store: Store) -> None:
    _done(store, "c1", b"", attempts=1)
    assert store.reopen("c1", b"x", now=T0 + 5, lease_s=LEASE).state is ClaimState.DONE
    assert store.reopen("c1", b"", now=T0 + 5, lease_s=LEASE).state is ClaimState.NEW


def test_reopen_answers_what_claim_would_once_reopened(store: Store) -> None:
    _done(store, "c1", b"old", attempts=2)
    first = store.reopen("c1", b"old", now=T0 + 5, lease_s=LEASE)
    assert first.state is ClaimState.NEW and first.token is not None
    # Another replay of the same outcome while the first holds its lease: BUSY.
    busy = store.reopen("c1", b"old", now=T0 + 6, lease_s=LEASE)
    assert busy.state is ClaimState.BUSY
    assert busy.lease_until == T0 + 5 + LEASE
    assert busy.token is None
    # The first replay sends, then its lease lapses: the next one takes it over.
    assert _sent(store, "c1", first.token, now=T0 + 7) == Send(SendState.SENT, 3)
    taken = store.reopen("c1", b"old", now=T0 + 7 + LEASE, lease_s=LEASE)
    assert taken.state is ClaimState.TAKEOVER
    assert taken.attempts == 3
    assert taken.token and taken.token != first.token
    # Released: the next one gets it at once.
    store.release("c1", taken.token, now=T0 + 7 + LEASE)
    again = store.reopen("c1", b"old", now=T0 + 8 + LEASE, lease_s=LEASE)
    assert again.state is ClaimState.NEW
    assert again.token and again.token != taken.token
    assert store.claim("c1", FP, now=T0 + 9 + LEASE, lease_s=LEASE).state is ClaimState.BUSY


def test_reopen_of_a_command_without_an_outcome_is_busy(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    busy = store.reopen("c1", b"x", now=T0 + 1, lease_s=LEASE)
    assert busy.state is ClaimState.BUSY
    assert busy.lease_until == T0 + LEASE
    assert _sent(store, "c1", first.token, now=T0 + 2) == Send(SendState.SENT, 1)


def test_reopen_of_an_unknown_id_is_conflict_and_creates_nothing(store: Store) -> None:
    unknown = store.reopen("nope", b"x", now=T0, lease_s=LEASE)
    assert unknown.state is ClaimState.CONFLICT
    assert unknown.first_seen == T0
    assert unknown.attempts == 0
    assert unknown.token is None
    assert unknown.outcome is None
    assert store.reopen("nope", b"", now=T0, lease_s=LEASE).state is ClaimState.CONFLICT
    # Nothing was created: the first claim is still NEW, first seen now.
    first = store.claim("nope", FP, now=T0 + 1, lease_s=LEASE)
    assert first.state is ClaimState.NEW
    assert first.first_seen == T0 + 1


def test_reopen_after_purge_is_conflict(store: Store) -> None:
    _done(store, "c1", b"old")
    if isinstance(store, RedisStore):  # retention is the TTL: delete the key as expiry would
        assert store._client.delete(store._key("c1")) == 1
    else:
        assert store.purge(older_than=T0 + 10) == 1
    assert store.reopen("c1", b"old", now=T0 + 11, lease_s=LEASE).state is ClaimState.CONFLICT


# -- purge, ping ----------------------------------------------------------------------------


def test_purge_drops_records_last_touched_before_the_cutoff(store: Store) -> None:
    old = _claimed(store, "old")
    store.record("old", old, b"x", now=T0)
    fresh = _claimed(store, "fresh")
    assert _sent(store, "fresh", fresh, now=T0 + 100) == Send(SendState.SENT, 1)
    dropped = store.purge(older_than=T0 + 50)
    if isinstance(store, RedisStore):
        # Retention is Redis' own TTL (see test_redis_ttl_*): purge has nothing to do.
        assert dropped == 0
        return
    assert dropped == 1
    assert store.claim("old", FP, now=T0 + 200, lease_s=LEASE).state is ClaimState.NEW
    assert store.claim("fresh", FP, now=T0 + 200, lease_s=LEASE).state is ClaimState.TAKEOVER
    assert store.purge(older_than=T0) == 0


def test_purge_drops_call_records_last_touched_before_the_cutoff(store: Store) -> None:
    # An old call (its newest command done at T0 + 2) and a fresh one (held at T0 + 100).
    old_newest = _holding(store, "old-newest", T0 + 10, now=T0 + 1)
    store.record("old-newest", old_newest, b"x", now=T0 + 2)
    _claimed(store, "plain")  # a command without a call: counted too
    _holding(store, "fresh-holder", T0 + 10, now=T0 + 100, call=OTHER_CALL)
    if isinstance(store, RedisStore):
        # Retention is Redis' own TTL, on call hashes as on command hashes (see
        # test_redis_call_and_slot_keys_are_refreshed_on_every_write): nothing to purge.
        assert store.purge(older_than=T0 + 50) == 0
        for call in (CALL, OTHER_CALL):
            assert 0 < store._client.ttl(store._call_key(call)) <= RETENTION_S
        return
    # Two command records are old ("old-newest", "plain"); calls are not counted.
    assert store.purge(older_than=T0 + 50) == 2
    # The old call was forgotten: an older command of it is no longer superseded.
    older = _claimed(store, "older", now=T0 + 101)
    assert _sent(store, "older", older, CallRef(CALL, T0 + 5), now=T0 + 102) == Send(
        SendState.SENT, 1
    )
    # The fresh call is kept: still held, and still the newest's.
    other = _claimed(store, "other", now=T0 + 101)
    assert _sent(store, "other", other, CallRef(OTHER_CALL, T0 + 20), now=T0 + 102) == Send(
        SendState.CALL_BUSY, busy_until=T0 + 100 + LEASE
    )
    assert _sent(store, "other", other, CallRef(OTHER_CALL, T0 + 5), now=T0 + 102) == Send(
        SendState.SUPERSEDED, newer="fresh-holder"
    )


def test_purge_keeps_the_request_schedule(store: Store) -> None:
    assert store.reserve_slot("pabx-a", interval_s=1.0) <= 0.05
    store.purge(older_than=T0 + 50)  # T0 is long past: a live schedule is after it
    assert store.reserve_slot("pabx-a", interval_s=1.0) == pytest.approx(1.0, abs=0.05)


def test_ping(store: Store) -> None:
    store.ping()


# -- concurrency inside one process -------------------------------------------------------


def test_threads_claiming_the_same_ids_get_one_new_each(store: Store) -> None:
    ids = [f"t{i}" for i in range(20)]
    barrier = threading.Barrier(16)
    wins: Counter[str] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            barrier.wait(timeout=20)
            for command_id in ids:
                if store.claim(command_id, FP, now=T0, lease_s=LEASE).state is ClaimState.NEW:
                    with lock:
                        wins[command_id] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=50)
    assert not errors
    assert wins == Counter({command_id: 1 for command_id in ids})


def test_threads_reopening_the_same_outcome_get_one_new_each(store: Store) -> None:
    ids = [f"t{i}" for i in range(20)]
    for command_id in ids:
        _done(store, command_id, b"outcome-" + command_id.encode())
    barrier = threading.Barrier(16)
    answers: Counter[tuple[str, ClaimState]] = Counter()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run() -> None:
        try:
            barrier.wait(timeout=20)
            for command_id in ids:
                outcome = b"outcome-" + command_id.encode()
                state = store.reopen(command_id, outcome, now=T0 + 5, lease_s=LEASE).state
                with lock:
                    answers[command_id, state] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=50)
    assert not errors
    expected = Counter({(c, ClaimState.NEW): 1 for c in ids})
    expected.update({(c, ClaimState.BUSY): 15 for c in ids})
    assert answers == expected


# -- Redis specifics ----------------------------------------------------------------------


def _ttl(client: redis.Redis, key: str) -> int:
    return int(client.ttl(key))


def test_redis_ttl_is_set_and_refreshed_on_every_write(redis_url: str) -> None:
    retention = int(RETENTION_S)
    with redis_store(redis_url) as (store, prefix), redis.Redis.from_url(redis_url) as client:
        key = prefix + "c1"
        first = store.claim("c1", FP, now=T0, lease_s=LEASE)
        assert first.token is not None
        assert retention - 5 <= _ttl(client, key) <= retention
        token = first.token
        for write in (
            lambda: store.mark_sent("c1", token, None, now=T0, lease_s=LEASE),
            lambda: store.renew("c1", token, now=T0, lease_s=LEASE),
            lambda: store.release("c1", token, now=T0),
            lambda: store.claim("c1", FP, now=T0 + 1, lease_s=LEASE),
        ):
            client.expire(key, 100)
            write()
            assert retention - 5 <= _ttl(client, key) <= retention
        again = store.claim("c1", FP, now=T0 + 2 + LEASE, lease_s=LEASE)
        assert again.token is not None
        client.expire(key, 100)
        store.record("c1", again.token, b"x", now=T0 + 2 + LEASE)
        assert retention - 5 <= _ttl(client, key) <= retention
        # Reads (BUSY/DONE/CONFLICT answers) do not extend retention; nor do refused steps.
        client.expire(key, 100)
        store.claim("c1", FP, now=T0 + 3, lease_s=LEASE)
        store.claim("c1", OTHER_FP, now=T0 + 3, lease_s=LEASE)
        assert store.reopen("c1", b"stale", now=T0 + 3, lease_s=LEASE).state is ClaimState.DONE
        assert store.record("c1", token, b"y", now=T0 + 3) == b"x"
        assert store.mark_sent("c1", token, None, now=T0 + 3, lease_s=LEASE).state is (
            SendState.LEASE_LOST
        )
        assert store.renew("c1", token, now=T0 + 3, lease_s=LEASE) is False
        store.release("c1", token, now=T0 + 3)
        assert _ttl(client, key) <= 100
        assert client.hget(key, "outcome") == b"x"
        # A reopen that takes the command back is a write.
        reopened = store.reopen("c1", b"x", now=T0 + 4, lease_s=LEASE)
        assert reopened.state is ClaimState.NEW
        assert retention - 5 <= _ttl(client, key) <= retention
        assert client.hget(key, "outcome") is None
        assert client.hget(key, "state") == b"claimed"
        assert client.hget(key, "token") == (reopened.token or "").encode()
        # A reopen of an unknown id creates no key, nor does a record or a stale step.
        assert store.reopen("c2", b"x", now=T0, lease_s=LEASE).state is ClaimState.CONFLICT
        assert store.record("c2", "t", b"x", now=T0) == b"x"
        store.mark_sent("c2", "t", CallRef(OTHER_CALL, T0), now=T0, lease_s=LEASE)
        store.renew("c2", "t", now=T0, lease_s=LEASE)
        store.release("c2", "t", now=T0)
        assert not client.exists(prefix + "c2")
        assert not client.exists(store._call_key(OTHER_CALL))


def test_redis_call_and_slot_keys_are_refreshed_on_every_write(redis_url: str) -> None:
    retention = int(RETENTION_S)
    with redis_store(redis_url) as (store, prefix), redis.Redis.from_url(redis_url) as client:
        call_key, slot_key = store._call_key(CALL), store._slot_key("pabx-a")
        # Both live beside the command hashes, under the test's prefix, and cannot be
        # mistaken for a command id (which never contains "#").
        assert call_key.startswith(prefix + "#") and slot_key.startswith(prefix + "#")
        token = _holding(store, "c1", T0, now=T0 + 1)
        assert retention - 5 <= _ttl(client, call_key) <= retention
        assert client.hget(call_key, "holder") == b"c1"
        assert client.hget(prefix + "c1", "call_key") == CALL.encode()
        for write in (
            lambda: store.renew("c1", token, now=T0 + 2, lease_s=LEASE),
            lambda: store.mark_sent("c1", token, CallRef(CALL, T0), now=T0 + 3, lease_s=LEASE),
            lambda: store.record("c1", token, b"x", now=T0 + 4),
        ):
            client.expire(call_key, 100)
            write()
            assert retention - 5 <= _ttl(client, call_key) <= retention
        assert client.hget(call_key, "holder") is None
        # A refused send writes nothing.
        client.expire(call_key, 100)
        older = _claimed(store, "older", now=T0 + 5)
        assert store.mark_sent(
            "older", older, CallRef(CALL, T0 - 1), now=T0 + 6, lease_s=LEASE
        ).state is (SendState.SUPERSEDED)
        assert _ttl(client, call_key) <= 100
        store.reserve_slot("pabx-a", interval_s=1.0)
        assert retention - 5 <= _ttl(client, slot_key) <= retention
        client.delete(call_key)  # what expiry does: the call is forgotten
        assert store.mark_sent(
            "older", older, CallRef(CALL, T0 - 1), now=T0 + 7, lease_s=LEASE
        ) == (Send(SendState.SENT, 1))


def test_redis_default_prefix_keeps_calls_and_slots_apart() -> None:
    store = RedisStore.from_url("redis://127.0.0.1:1/0")
    try:
        assert store._key("c1") == "pabx:cmd:c1"
        assert store._call_key(CALL) == "pabx:call:" + CALL
        assert store._slot_key("pabx-a") == "pabx:slot:pabx-a"
    finally:
        store.close()


def test_redis_a_replayed_mark_sent_counts_once(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client retries a script whose reply was lost: the same send id counts once."""
    with redis_store(redis_url) as (store, _):
        token = _claimed(store, "c1")
        send_id = uuid.uuid4()
        monkeypatch.setattr("worker.adapters.store.redis.uuid.uuid4", lambda: send_id)
        call = CallRef(CALL, T0)
        assert _sent(store, "c1", token, call, now=T0 + 1) == Send(SendState.SENT, 1)
        assert _sent(store, "c1", token, call, now=T0 + 1) == Send(SendState.SENT, 1)
        monkeypatch.undo()
        assert _sent(store, "c1", token, call, now=T0 + 2) == Send(SendState.SENT, 2)


def test_redis_custom_retention_and_expiry(redis_url: str) -> None:
    prefix = f"test:pabx:{uuid.uuid4().hex}:"
    store = RedisStore.from_url(redis_url, prefix=prefix, retention_s=60)
    try:
        with redis.Redis.from_url(redis_url) as client:
            token = _holding(store, "c1", T0, now=T0)
            assert 55 <= _ttl(client, prefix + "c1") <= 60
            assert 55 <= _ttl(client, store._call_key(CALL)) <= 60
            store.reserve_slot("pabx-a", interval_s=1.0)
            assert 55 <= _ttl(client, store._slot_key("pabx-a")) <= 60
            client.delete(prefix + "c1")  # what expiry does
        assert store.record("c1", token, b"x", now=T0 + 1) == b"x"  # nothing to keep it in
        assert store.claim("c1", FP, now=T0 + 1, lease_s=LEASE).state is ClaimState.NEW
    finally:
        store.close()
        _cleanup_redis(redis_url, prefix)


def test_redis_survives_a_killed_connection(redis_url: str) -> None:
    with redis_store(redis_url) as (store, _), redis.Redis.from_url(redis_url) as client:
        store.ping()
        client.client_kill_filter(_type="normal", skipme=True)
        store.ping()  # the client reconnects and retries on its own
        assert store.claim("c1", FP, now=T0, lease_s=LEASE).state is ClaimState.NEW


# -- PostgreSQL specifics ---------------------------------------------------------------


def test_postgres_reconnects_after_the_connection_is_lost(postgres_url: str) -> None:
    with postgres_store(postgres_url) as (store, _):
        assert store.claim("c1", FP, now=T0, lease_s=LEASE).state is ClaimState.NEW
        with store._connection() as a, store._connection() as b:  # two pooled connections
            pids = [a.info.backend_pid, b.info.backend_pid]
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            for pid in pids:
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        failures = 0
        for _ in range(POOL_SIZE + 2):  # each dead connection fails one call, then is dropped
            try:
                store.ping()
                break
            except StoreError:
                failures += 1
        assert 1 <= failures <= POOL_SIZE
        # New connections are opened; nothing was lost.
        assert store.claim("c1", FP, now=T0 + 1, lease_s=LEASE).state is ClaimState.BUSY


def test_postgres_serves_threads_on_more_than_one_connection(postgres_url: str) -> None:
    """A connection held by one thread (a slow statement) does not hold up the others."""
    with postgres_store(postgres_url) as (store, _):
        store.ping()
        with store._connection() as held:
            held.execute("SELECT 1").fetchone()
            done = threading.Event()

            def claim() -> None:
                store.claim("c1", FP, now=T0, lease_s=LEASE)
                done.set()

            threading.Thread(target=claim, daemon=True).start()
            assert done.wait(10), "a second thread waited for the held connection"
            pids = {held.info.backend_pid}
        with store._connection() as a, store._connection() as b:
            pids |= {a.info.backend_pid, b.info.backend_pid}
        assert len(pids) >= 2


def test_postgres_table_matches_the_sqlite_columns(postgres_url: str) -> None:
    with postgres_store(postgres_url) as (store, table):
        store.ping()
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_name = %s ORDER BY ordinal_position",
                (table,),
            ).fetchall()
    assert rows == [
        ("command_id", "text"),
        ("fingerprint", "text"),
        ("first_seen", "double precision"),
        ("updated_at", "double precision"),
        ("state", "text"),
        ("token", "text"),
        ("lease_until", "double precision"),
        ("attempts", "integer"),
        ("outcome", "bytea"),
        ("call_key", "text"),
    ]


def test_postgres_migrates_a_table_from_before_the_call_record(postgres_url: str) -> None:
    table = f"pabx_test_{uuid.uuid4().hex[:16]}"
    ident = sql.Identifier(table)
    try:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (command_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,"
                    " first_seen DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,"
                    " state TEXT NOT NULL, token TEXT,"
                    " lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,"
                    " attempts INTEGER NOT NULL DEFAULT 0, outcome BYTEA)"
                ).format(ident)
            )
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} VALUES ('old', %s, %s, %s, 'sent', 'tok', %s, 3, NULL)"
                ).format(ident),
                (FP, T0, T0, T0 + LEASE),
            )
        _assert_migrated(PostgresStore(postgres_url, table=table))
        again = PostgresStore(postgres_url, table=table)  # a second start finds it migrated
        try:
            assert again.claim("old", FP, now=T0 + 3 * LEASE, lease_s=LEASE).state is (
                ClaimState.DONE
            )
        finally:
            again.close()
    finally:
        _drop_table(postgres_url, table)


def _assert_migrated(store: Store) -> None:
    """``store`` opened on old tables holding ``old`` (sent by token ``tok``, 3 attempts)."""
    try:
        assert _sent(store, "old", "tok", CallRef(CALL, T0), now=T0 + 1) == Send(SendState.SENT, 4)
        token = _claimed(store, "new", now=T0 + 2)
        assert _sent(store, "new", token, CallRef(CALL, T0 + 1), now=T0 + 2) == Send(
            SendState.CALL_BUSY, busy_until=T0 + 1 + LEASE
        )
        assert store.record("old", "tok", b"x", now=T0 + 3) == b"x"
        assert _sent(store, "new", token, CallRef(CALL, T0 + 1), now=T0 + 4) == Send(
            SendState.SENT, 1
        )
        claim, send = store.claim_and_send(
            "newer", FP, CallRef(OTHER_CALL, T0), now=T0 + 5, lease_s=LEASE, token="t3"
        )
        assert (claim.state, send) == (ClaimState.NEW, Send(SendState.SENT, 1))
        assert store.reserve_slot("pabx-a", interval_s=1.0) <= 0.05
    finally:
        store.close()


def test_postgres_closed_store_raises_store_error(postgres_url: str) -> None:
    with postgres_store(postgres_url) as (store, _):
        store.close()
        with pytest.raises(StoreError, match="closed"):
            store.ping()


def test_postgres_rejects_an_unsafe_table_name() -> None:
    with pytest.raises(StoreError):
        PostgresStore("postgresql://postgres@127.0.0.1/test", table="x; DROP TABLE y")


# -- SQLite specifics ----------------------------------------------------------------------


def test_sqlite_migrates_a_file_from_before_the_call_record(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE pabx_commands (
                command_id TEXT PRIMARY KEY, fingerprint TEXT NOT NULL,
                first_seen REAL NOT NULL, updated_at REAL NOT NULL, state TEXT NOT NULL,
                token TEXT, lease_until REAL NOT NULL DEFAULT 0,
                attempts INTEGER NOT NULL DEFAULT 0, outcome BLOB);
            CREATE INDEX pabx_commands_updated ON pabx_commands (updated_at);
            """
        )
        db.execute(
            "INSERT INTO pabx_commands VALUES ('old', ?, ?, ?, 'sent', 'tok', ?, 3, NULL)",
            (FP, T0, T0, T0 + LEASE),
        )
    db.close()
    _assert_migrated(SqliteStore(path))
    again = SqliteStore(path)  # a second start finds it migrated
    try:
        assert again.claim("old", FP, now=T0 + 3 * LEASE, lease_s=LEASE).state is ClaimState.DONE
    finally:
        again.close()
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(pabx_commands)")]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    db.close()
    assert columns[-2:] == ["call_key", "call_order"]
    assert columns.count("call_key") == columns.count("call_order") == 1
    assert {"pabx_calls", "pabx_slots", "pabx_commands_sent_new"} <= tables


def test_sqlite_sends_a_new_command_with_a_free_call_in_one_statement(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "one.db")
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    try:
        call = CallRef("call-1", T0)
        claim, send = store.claim_and_send("new", FP, call, now=T0, lease_s=LEASE, token="t1")
        assert (claim.state, send) == (ClaimState.NEW, Send(SendState.SENT, 1))
        # One statement: its trigger's steps are traced with its text too.
        assert len(set(statements)) == 1 and statements[0].startswith("INSERT INTO pabx_commands")
        statements.clear()
        # The call is held now: the one statement aborts, the transaction says why.
        later = CallRef("call-1", T0 + 1)
        claim, send = store.claim_and_send("next", FP, later, now=T0, lease_s=LEASE, token="t2")
        assert claim.state is ClaimState.NEW and send is not None
        assert send.state is SendState.CALL_BUSY
        assert "BEGIN IMMEDIATE" in statements
    finally:
        store.close()


def test_postgres_sends_a_new_command_with_a_free_call_in_one_statement(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with postgres_store(postgres_url) as (store, table):
        store.ping()  # the schema, and its function, first
        statements: list[str] = []
        execute = psycopg.Connection.execute

        def traced(conn: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            statements.append(str(query))
            return execute(conn, query, *args, **kwargs)

        monkeypatch.setattr(psycopg.Connection, "execute", traced)
        claim, send = store.claim_and_send(
            "new", FP, CallRef(CALL, T0), now=T0, lease_s=LEASE, token="t1"
        )
        assert (claim.state, send) == (ClaimState.NEW, Send(SendState.SENT, 1))
        assert len(statements) == 1 and f"{table}_claim_send_v1" in statements[0]
        statements.clear()
        # The call is held now: the same one statement says so, and the claim stays.
        claim, send = store.claim_and_send(
            "next", FP, CallRef(CALL, T0 + 1), now=T0, lease_s=LEASE, token="t2"
        )
        assert claim.state is ClaimState.NEW and send is not None
        assert (send.state, send.busy_until) == (SendState.CALL_BUSY, T0 + LEASE)
        assert len(statements) == 1
        assert store.claim("next", FP, now=T0, lease_s=LEASE).state is ClaimState.BUSY


# -- unreachable servers ----------------------------------------------------------------------


def _unreachable(kind: str, url: str) -> Store:
    return RedisStore.from_url(url) if kind == "redis" else PostgresStore.from_url(url)


@pytest.mark.parametrize(
    ("kind", "url"),
    [
        ("redis", "redis://127.0.0.1:1/0"),
        ("redis", "redis://:s3cret@127.0.0.1:1/0"),
        ("redis", "redis://user:s3cr%40t@127.0.0.1:1/0"),
        ("postgres", "postgresql://postgres@127.0.0.1:1/test"),
        ("postgres", "postgresql://postgres:s3cret@127.0.0.1:1/test"),
        ("postgres", "postgres://postgres:s3cr%40t@127.0.0.1:1/test"),
        ("postgres", "host=127.0.0.1 port=1 user=postgres password=s3cret dbname=test"),
    ],
)
@pytest.mark.parametrize(
    "operation",
    ["ping", "claim", "reopen", "mark_sent", "renew", "record", "release", "reserve_slot"],
)
def test_unreachable_server_raises_store_error_without_password(
    kind: str, url: str, operation: str
) -> None:
    store = _unreachable(kind, url)
    calls: dict[str, Any] = {
        "ping": lambda: store.ping(),
        "claim": lambda: store.claim("c1", FP, now=T0, lease_s=LEASE),
        "reopen": lambda: store.reopen("c1", b"x", now=T0, lease_s=LEASE),
        "mark_sent": lambda: store.mark_sent("c1", "t", CallRef(CALL, T0), now=T0, lease_s=LEASE),
        "renew": lambda: store.renew("c1", "t", now=T0, lease_s=LEASE),
        "record": lambda: store.record("c1", "t", b"x", now=T0),
        "release": lambda: store.release("c1", "t", now=T0),
        "reserve_slot": lambda: store.reserve_slot("pabx-a", interval_s=1.0),
    }
    try:
        with pytest.raises(StoreError) as caught:
            calls[operation]()
    finally:
        store.close()
    message = str(caught.value)
    assert "127.0.0.1" in message
    assert "s3cret" not in message
    assert "s3cr@t" not in message
    assert "s3cr%40t" not in message
    assert caught.value.__cause__ is not None


# -- open_store -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "cls"),
    [
        ("redis://127.0.0.1:1/0", RedisStore),
        ("rediss://127.0.0.1:1/0", RedisStore),
        ("postgresql://postgres@127.0.0.1:1/test", PostgresStore),
        ("postgres://postgres@127.0.0.1:1/test", PostgresStore),
        ("memory://", MemoryStore),
    ],
)
def test_open_store_routes_by_scheme(url: str, cls: type[Any]) -> None:
    store = open_store(url)
    try:
        assert isinstance(store, cls)
    finally:
        store.close()


def test_open_store_rejects_unknown_schemes() -> None:
    with pytest.raises(ConfigurationError):
        open_store("mysql://127.0.0.1/x")


# -- many processes racing ------------------------------------------------------------------


def _open_spec(spec: tuple[str, str, str]) -> Store:
    kind, target, extra = spec
    if kind == "sqlite":
        return SqliteStore(target)
    if kind == "redis":
        return RedisStore.from_url(target, prefix=extra)
    return PostgresStore(target, table=extra)


def _race_outcome(command_id: str) -> bytes:
    return b"outcome\x00" + command_id.encode()


def _race_step(store: Store, operation: str, command_id: str) -> ClaimState:
    if operation == "reopen":
        return store.reopen(command_id, _race_outcome(command_id), now=T0 + 5, lease_s=LEASE).state
    return store.claim(command_id, FP, now=T0, lease_s=LEASE).state


def _race_claims(store: Store, barrier: Any, operation: str, ids: list[str]) -> list[str]:
    """Claim (or reopen) every id once all processes are ready; returns the ids won."""
    barrier.wait(timeout=30)
    return [
        command_id
        for command_id in ids
        if _race_step(store, operation, command_id) is ClaimState.NEW
    ]


def _race_sends(
    store: Store, barrier: Any, me: int, calls: int
) -> dict[str, tuple[str, int, str | None, float | None]]:
    """Claim one command per call (ids ``call{k}-p{me}``), then send them all at once."""
    commands = {}
    for k in range(calls):
        command_id = f"call{k}-p{me}"
        claim = store.claim(command_id, FP, now=T0, lease_s=LEASE)
        assert claim.state is ClaimState.NEW and claim.token is not None
        commands[command_id] = (claim.token, CallRef(f"{CALL}#{k}", T0 + me % 3))
    barrier.wait(timeout=30)
    answers = {}
    for command_id, (token, call) in commands.items():
        send = store.mark_sent(command_id, token, call, now=T0 + 1, lease_s=LEASE)
        answers[command_id] = (send.state.value, send.attempts, send.newer, send.busy_until)
    return answers


def _race_slots(
    store: Store, barrier: Any, count: int, interval: float
) -> list[tuple[float, float]]:
    """Reserve ``count`` slots of one target; returns where each lies on this host's clock."""
    barrier.wait(timeout=30)
    windows = []
    for _ in range(count):
        before = time.time()
        wait = store.reserve_slot("pabx-race", interval_s=interval)
        windows.append((before + wait, time.time() + wait))
    return windows


_RACE_JOBS: dict[str, Callable[..., Any]] = {
    "claims": _race_claims,
    "sends": _race_sends,
    "slots": _race_slots,
}


def _race(spec: tuple[str, str, str], job: str, barrier: Any, results: Any, *args: Any) -> None:
    """Runs in a spawned process: open the store, run ``job`` in step with the others."""
    try:
        store = _open_spec(spec)
        try:
            store.ping()
            answer = _RACE_JOBS[job](store, barrier, *args)
        finally:
            store.close()
        results.put(("ok", answer))
    except BaseException as exc:
        barrier.abort()
        results.put(("error", repr(exc)))


def _run_race(
    spec: tuple[str, str, str], job: str, args_per_process: list[tuple[Any, ...]]
) -> list[Any]:
    """Spawn one process per argument tuple; returns their answers (any order)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(args_per_process))
    results = ctx.Queue()
    processes = [
        ctx.Process(target=_race, args=(spec, job, barrier, results, *args))
        for args in args_per_process
    ]
    for process in processes:
        process.start()
    try:
        answers = [results.get(timeout=60) for _ in processes]
    except queue.Empty:  # pragma: no cover - a child hung
        answers = []
    finally:
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():  # pragma: no cover
                process.kill()
                process.join()
        results.close()
        results.join_thread()
    assert len(answers) == len(processes), "a racing process did not answer"
    errors = [detail for status, detail in answers if status != "ok"]
    assert not errors
    assert all(process.exitcode == 0 for process in processes)
    return [answer for _, answer in answers]


@contextmanager
def _race_target(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[str, str, str]]:
    if kind == "sqlite":
        path = str(tmp_path / "race.db")
        SqliteStore(path).close()  # create the file and schema once
        yield (kind, path, "")
    elif kind == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = f"test:pabx:{uuid.uuid4().hex}:"
        try:
            yield (kind, url, prefix)
        finally:
            _cleanup_redis(url, prefix)
    else:
        url = request.getfixturevalue("postgres_url")
        with postgres_store(url) as (store, table):
            store.ping()  # create the tables once
            yield (kind, url, table)


@pytest.mark.parametrize("operation", ["claim", "reopen"])
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
def test_processes_racing_for_the_same_ids_get_exactly_one_new_each(
    kind: str, operation: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    processes_n, ids = 8, [f"race-{i}" for i in range(50)]
    with _race_target(kind, request, tmp_path) as spec:
        if operation == "reopen":  # every id finished first, so there is something to reopen
            setup = _open_spec(spec)
            try:
                for command_id in ids:
                    _done(setup, command_id, _race_outcome(command_id))
            finally:
                setup.close()
        answers = _run_race(spec, "claims", [(operation, ids)] * processes_n)
    wins = Counter(command_id for won in answers for command_id in won)
    assert wins == Counter({command_id: 1 for command_id in ids})


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
def test_processes_sending_commands_of_one_call_get_exactly_one_sent(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    processes_n, calls = 6, 20
    with _race_target(kind, request, tmp_path) as spec:
        answers = _run_race(spec, "sends", [(me, calls) for me in range(processes_n)])
    merged = {
        command_id: Send(SendState(state), attempts, newer, busy_until)
        for answer in answers
        for command_id, (state, attempts, newer, busy_until) in answer.items()
    }
    assert len(merged) == processes_n * calls
    for k in range(calls):
        _assert_one_sent(
            {c: send for c, send in merged.items() if c.startswith(f"call{k}-")}, now=T0 + 1
        )


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
def test_processes_reserving_slots_of_one_target_get_distinct_spaced_slots(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    processes_n, per_process, interval = 4, 25, 0.01
    with _race_target(kind, request, tmp_path) as spec:
        answers = _run_race(spec, "slots", [(per_process, interval)] * processes_n)
    _assert_spaced([tuple(w) for windows in answers for w in windows], 100, interval)


def test_sqlite_commits_leave_the_wal_to_the_checkpoint_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's thread copies the WAL into the file; commits only append to the WAL."""
    path = tmp_path / "ckpt.db"
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY_S", 3600.0)
    store = SqliteStore(path)
    try:
        assert store._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == (
            sqlite_store.AUTOCHECKPOINT_PAGES
        )
        for i in range(1500):  # some 9000 WAL pages: past SQLite's own 1000, under ours
            store.record(f"c{i}", _claimed(store, f"c{i}"), b"x" * 200, now=T0 + 1)
        # The last connection to close would checkpoint: this one, reading, stays till the end.
        keeper = sqlite3.connect(path, isolation_level=None)
        keeper.execute("BEGIN")
        assert keeper.execute("SELECT count(*) FROM pabx_commands").fetchone()[0] == 1500
    finally:
        store.close()
    size = path.stat().st_size
    assert size <= 8192  # every commit is still in the WAL only
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY_S", 0.05)
    store = SqliteStore(path)
    try:
        checkpoints = [t for t in threading.enumerate() if t.name == "pabx-sqlite-checkpoints"]
        assert len(checkpoints) == 1
        deadline = time.monotonic() + 10
        while path.stat().st_size <= size and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.stat().st_size > 100 * size  # the thread copied the WAL into the file
    finally:
        store.close()
        keeper.close()
    assert not checkpoints[0].is_alive()  # close stops it
