"""One contract suite for every idempotency store: memory, sqlite, redis, postgres.

The Redis and PostgreSQL cases use the real servers (``redis_url`` / ``postgres_url``
fixtures: skipped locally when absent, failing under ``CI=true``); each test gets its
own random key prefix or table and removes it afterwards.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis
from psycopg import sql

from worker.errors import ConfigurationError, StoreError
from worker.store import RETENTION_S, ClaimState, Store, open_store
from worker.store.memory import MemoryStore
from worker.store.postgres import PostgresStore
from worker.store.redis import RedisStore
from worker.store.sqlite import SqliteStore

T0 = 1_700_000_000.25
LEASE = 30.0
FP = "sha256:aaaa"
OTHER_FP = "sha256:bbbb"


# -- backends ----------------------------------------------------------------------------


def _cleanup_redis(url: str, prefix: str) -> None:
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)


def _drop_table(url: str, table: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


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
    assert first.token is not None
    assert not store.mark_sent("c1", first.token, 1, now=T0 + LEASE + 2, lease_s=LEASE)


def test_lease_ends_exactly_at_lease_until(store: Store) -> None:
    store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert store.claim("c1", FP, now=T0 + LEASE, lease_s=LEASE).state is ClaimState.NEW


def test_lapsed_lease_after_send_is_takeover_with_attempts(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    assert store.mark_sent("c1", first.token, 2, now=T0 + 1, lease_s=LEASE)
    taken = store.claim("c1", FP, now=T0 + 1 + LEASE, lease_s=LEASE)
    assert taken.state is ClaimState.TAKEOVER
    assert taken.attempts == 2
    assert taken.first_seen == T0
    assert taken.token and taken.token != first.token
    # Once taken over, the new lease is live again.
    assert store.claim("c1", FP, now=T0 + 2 + LEASE, lease_s=LEASE).state is ClaimState.BUSY


def test_mark_sent_renews_the_lease(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    assert store.mark_sent("c1", first.token, 1, now=T0 + 20, lease_s=LEASE)
    busy = store.claim("c1", FP, now=T0 + LEASE + 1, lease_s=LEASE)
    assert busy.state is ClaimState.BUSY
    assert busy.lease_until == T0 + 20 + LEASE
    assert busy.attempts == 1


def test_different_fingerprint_is_conflict(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    assert store.mark_sent("c1", first.token, 1, now=T0, lease_s=LEASE)
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
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    store.record("c1", first.token, b"outcome", 1)
    assert store.claim("c1", OTHER_FP, now=T0 + 1, lease_s=LEASE).state is ClaimState.CONFLICT


# -- mark_sent / record / release ------------------------------------------------------------


def test_record_then_claim_is_done_with_outcome(store: Store) -> None:
    outcome = b'{"status":"accepted"}\x00\xff\xfe binary-safe'
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    assert store.mark_sent("c1", first.token, 3, now=T0 + 1, lease_s=LEASE)
    assert store.record("c1", first.token, outcome, 3) == outcome
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
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    assert store.record("c1", first.token, b"", 0) == b""
    done = store.claim("c1", FP, now=T0 + 1, lease_s=LEASE)
    assert done.state is ClaimState.DONE
    assert done.outcome == b""


def test_record_twice_first_outcome_wins(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    assert store.mark_sent("c1", first.token, 1, now=T0, lease_s=LEASE)
    taken = store.claim("c1", FP, now=T0 + LEASE, lease_s=LEASE)
    assert taken.state is ClaimState.TAKEOVER and taken.token is not None
    assert store.record("c1", taken.token, b"first", 2) == b"first"
    # The slow original worker finishes late: its outcome is refused, the stored one returned.
    assert store.record("c1", first.token, b"second", 1) == b"first"
    done = store.claim("c1", FP, now=T0 + LEASE + 1, lease_s=LEASE)
    assert done.outcome == b"first"
    assert done.attempts == 2


def test_record_keeps_the_highest_attempts(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    assert store.mark_sent("c1", first.token, 4, now=T0, lease_s=LEASE)
    store.record("c1", first.token, b"x", 2)
    assert store.claim("c1", FP, now=T0 + 1, lease_s=LEASE).attempts == 4


def test_mark_sent_with_a_stale_token_is_refused(store: Store) -> None:
    store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert not store.mark_sent("c1", "not-the-token", 1, now=T0 + 1, lease_s=LEASE)
    assert not store.mark_sent("unknown", "not-the-token", 1, now=T0 + 1, lease_s=LEASE)
    # Nothing changed: still claimed (not sent) with the first lease.
    busy = store.claim("c1", FP, now=T0 + 2, lease_s=LEASE)
    assert busy.state is ClaimState.BUSY
    assert busy.lease_until == T0 + LEASE
    assert busy.attempts == 0
    assert store.claim("c1", FP, now=T0 + LEASE, lease_s=LEASE).state is ClaimState.NEW


def test_mark_sent_after_record_is_refused(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    store.record("c1", first.token, b"x", 1)
    assert not store.mark_sent("c1", first.token, 2, now=T0 + 1, lease_s=LEASE)


def test_release_makes_the_next_claim_new_at_once(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    assert store.mark_sent("c1", first.token, 2, now=T0 + 1, lease_s=LEASE)
    store.release("c1", first.token, 3)
    # The lease had time left, and the command had been sent: released wins over both.
    again = store.claim("c1", FP, now=T0 + 2, lease_s=LEASE)
    assert again.state is ClaimState.NEW
    assert again.attempts == 3
    assert again.first_seen == T0
    assert again.token and again.token != first.token
    # The released token is dead.
    assert not store.mark_sent("c1", first.token, 4, now=T0 + 3, lease_s=LEASE)


def test_release_keeps_the_highest_attempts(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    assert store.mark_sent("c1", first.token, 5, now=T0, lease_s=LEASE)
    store.release("c1", first.token, 1)
    assert store.claim("c1", FP, now=T0 + 1, lease_s=LEASE).attempts == 5


def test_release_with_a_stale_token_does_nothing(store: Store) -> None:
    store.claim("c1", FP, now=T0, lease_s=LEASE)
    store.release("c1", "not-the-token", 7)
    store.release("unknown", "not-the-token", 7)
    busy = store.claim("c1", FP, now=T0 + 1, lease_s=LEASE)
    assert busy.state is ClaimState.BUSY
    assert busy.attempts == 0


def test_release_after_record_does_nothing(store: Store) -> None:
    first = store.claim("c1", FP, now=T0, lease_s=LEASE)
    assert first.token is not None
    store.record("c1", first.token, b"x", 1)
    store.release("c1", first.token, 9)
    done = store.claim("c1", FP, now=T0 + 1, lease_s=LEASE)
    assert done.state is ClaimState.DONE
    assert done.outcome == b"x"
    assert done.attempts == 1


# -- reopen ---------------------------------------------------------------------------------


def _done(store: Store, command_id: str, outcome: bytes, attempts: int = 2) -> str:
    """Claim, send and finish ``command_id``; returns the (now dead) token."""
    first = store.claim(command_id, FP, now=T0, lease_s=LEASE)
    assert first.state is ClaimState.NEW and first.token is not None
    assert store.mark_sent(command_id, first.token, attempts, now=T0 + 1, lease_s=LEASE)
    assert store.record(command_id, first.token, outcome, attempts) == outcome
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
    assert not store.mark_sent("c1", old_token, 3, now=T0 + 7, lease_s=LEASE)
    assert store.mark_sent("c1", reopened.token, 3, now=T0 + 7, lease_s=LEASE)


def test_record_after_reopen_stores_the_new_outcome(store: Store) -> None:
    _done(store, "c1", b"old", attempts=2)
    reopened = store.reopen("c1", b"old", now=T0 + 5, lease_s=LEASE)
    assert reopened.state is ClaimState.NEW and reopened.token is not None
    assert store.mark_sent("c1", reopened.token, 3, now=T0 + 6, lease_s=LEASE)
    assert store.record("c1", reopened.token, b"new", 3) == b"new"
    done = store.claim("c1", FP, now=T0 + 7, lease_s=LEASE)
    assert done.state is ClaimState.DONE
    assert done.outcome == b"new"
    assert done.attempts == 3
    assert done.first_seen == T0


def test_reopen_with_a_stale_outcome_is_done_with_the_stored_one(store: Store) -> None:
    _done(store, "c1", b"old", attempts=2)
    reopened = store.reopen("c1", b"old", now=T0 + 5, lease_s=LEASE)
    assert reopened.token is not None
    store.record("c1", reopened.token, b"new", 2)
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
    assert store.mark_sent("c1", first.token, 3, now=T0 + 7, lease_s=LEASE)
    taken = store.reopen("c1", b"old", now=T0 + 7 + LEASE, lease_s=LEASE)
    assert taken.state is ClaimState.TAKEOVER
    assert taken.attempts == 3
    assert taken.token and taken.token != first.token
    # Released: the next one gets it at once.
    store.release("c1", taken.token, 3)
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
    assert store.mark_sent("c1", first.token, 1, now=T0 + 2, lease_s=LEASE)


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
    old = store.claim("old", FP, now=T0, lease_s=LEASE)
    assert old.token is not None
    store.record("old", old.token, b"x", 1)
    fresh = store.claim("fresh", FP, now=T0, lease_s=LEASE)
    assert fresh.token is not None
    assert store.mark_sent("fresh", fresh.token, 1, now=T0 + 100, lease_s=LEASE)
    dropped = store.purge(older_than=T0 + 50)
    if isinstance(store, RedisStore):
        # Retention is Redis' own TTL (see test_redis_ttl_*): purge has nothing to do.
        assert dropped == 0
        return
    assert dropped == 1
    assert store.claim("old", FP, now=T0 + 200, lease_s=LEASE).state is ClaimState.NEW
    assert store.claim("fresh", FP, now=T0 + 200, lease_s=LEASE).state is ClaimState.TAKEOVER
    assert store.purge(older_than=T0) == 0


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
        for write in (
            lambda: store.mark_sent("c1", first.token or "", 1, now=T0, lease_s=LEASE),
            lambda: store.release("c1", first.token or "", 1),
            lambda: store.claim("c1", FP, now=T0 + 1, lease_s=LEASE),
        ):
            client.expire(key, 100)
            write()
            assert retention - 5 <= _ttl(client, key) <= retention
        again = store.claim("c1", FP, now=T0 + 2 + LEASE, lease_s=LEASE)
        assert again.token is not None
        client.expire(key, 100)
        store.record("c1", again.token, b"x", 1)
        assert retention - 5 <= _ttl(client, key) <= retention
        # Reads (BUSY/DONE/CONFLICT answers) do not extend retention.
        client.expire(key, 100)
        store.claim("c1", FP, now=T0 + 3, lease_s=LEASE)
        store.claim("c1", OTHER_FP, now=T0 + 3, lease_s=LEASE)
        assert store.reopen("c1", b"stale", now=T0 + 3, lease_s=LEASE).state is ClaimState.DONE
        assert _ttl(client, key) <= 100
        assert client.hget(key, "outcome") == b"x"
        # A reopen that takes the command back is a write.
        reopened = store.reopen("c1", b"x", now=T0 + 4, lease_s=LEASE)
        assert reopened.state is ClaimState.NEW
        assert retention - 5 <= _ttl(client, key) <= retention
        assert client.hget(key, "outcome") is None
        assert client.hget(key, "state") == b"claimed"
        assert client.hget(key, "token") == (reopened.token or "").encode()
        # A reopen of an unknown id creates no key.
        assert store.reopen("c2", b"x", now=T0, lease_s=LEASE).state is ClaimState.CONFLICT
        assert not client.exists(prefix + "c2")


def test_redis_custom_retention_and_expiry(redis_url: str) -> None:
    prefix = f"test:pabx:{uuid.uuid4().hex}:"
    store = RedisStore.from_url(redis_url, prefix=prefix, retention_s=60)
    try:
        with redis.Redis.from_url(redis_url) as client:
            store.claim("c1", FP, now=T0, lease_s=LEASE)
            assert 55 <= _ttl(client, prefix + "c1") <= 60
            client.delete(prefix + "c1")  # what expiry does
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
        assert store._conn is not None
        pid = store._conn.info.backend_pid
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        with pytest.raises(StoreError):
            store.ping()
        # The next call opens a new connection; nothing was lost.
        assert store.claim("c1", FP, now=T0 + 1, lease_s=LEASE).state is ClaimState.BUSY


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
    ]


def test_postgres_closed_store_raises_store_error(postgres_url: str) -> None:
    with postgres_store(postgres_url) as (store, _):
        store.close()
        with pytest.raises(StoreError, match="closed"):
            store.ping()


def test_postgres_rejects_an_unsafe_table_name() -> None:
    with pytest.raises(StoreError):
        PostgresStore("postgresql://postgres@127.0.0.1/test", table="x; DROP TABLE y")


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
@pytest.mark.parametrize("operation", ["ping", "claim", "reopen", "mark_sent", "record", "release"])
def test_unreachable_server_raises_store_error_without_password(
    kind: str, url: str, operation: str
) -> None:
    store = _unreachable(kind, url)
    calls: dict[str, Any] = {
        "ping": lambda: store.ping(),
        "claim": lambda: store.claim("c1", FP, now=T0, lease_s=LEASE),
        "reopen": lambda: store.reopen("c1", b"x", now=T0, lease_s=LEASE),
        "mark_sent": lambda: store.mark_sent("c1", "t", 1, now=T0, lease_s=LEASE),
        "record": lambda: store.record("c1", "t", b"x", 1),
        "release": lambda: store.release("c1", "t", 1),
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


# -- many processes racing for the same ids -----------------------------------------------


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


def _race(
    spec: tuple[str, str, str],
    operation: str,
    ids: list[str],
    barrier: Any,
    results: Any,
) -> None:
    """Runs in a spawned process: claim (or reopen) every id once all processes are ready."""
    try:
        store = _open_spec(spec)
        try:
            store.ping()
            barrier.wait(timeout=30)
            won = [
                command_id
                for command_id in ids
                if _race_step(store, operation, command_id) is ClaimState.NEW
            ]
        finally:
            store.close()
        results.put(("ok", won))
    except BaseException as exc:
        barrier.abort()
        results.put(("error", repr(exc)))


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
            store.ping()  # create the table once
            yield (kind, url, table)


@pytest.mark.parametrize("operation", ["claim", "reopen"])
@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
def test_processes_racing_for_the_same_ids_get_exactly_one_new_each(
    kind: str, operation: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    processes_n, ids = 8, [f"race-{i}" for i in range(50)]
    ctx = multiprocessing.get_context("spawn")
    with _race_target(kind, request, tmp_path) as spec:
        if operation == "reopen":  # every id finished first, so there is something to reopen
            setup = _open_spec(spec)
            try:
                for command_id in ids:
                    _done(setup, command_id, _race_outcome(command_id))
            finally:
                setup.close()
        barrier = ctx.Barrier(processes_n)
        results = ctx.Queue()
        processes = [
            ctx.Process(target=_race, args=(spec, operation, ids, barrier, results))
            for _ in range(processes_n)
        ]
        for process in processes:
            process.start()
        try:
            answers = [results.get(timeout=45) for _ in processes]
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
    assert len(answers) == processes_n, "a racing process did not answer"
    errors = [detail for status, detail in answers if status != "ok"]
    assert not errors
    wins = Counter(command_id for _, won in answers for command_id in won)
    assert wins == Counter({command_id: 1 for command_id in ids})
    assert all(process.exitcode == 0 for process in processes)
