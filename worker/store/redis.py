"""Redis idempotency store: one hash per command id, every operation one Lua script.

Layout: ``{prefix}{command_id}`` is a hash with the fields ``fp``, ``first_seen``,
``updated_at``, ``state``, ``token`` (absent when nobody holds a lease),
``lease_until``, ``attempts`` and ``outcome`` (absent until there is one; stored as
the raw bytes). Times are the caller's ``now`` written as ``repr(float)`` strings, so
they come back exactly; Redis ``TIME`` is never used.

Atomicity: each method is a single ``EVALSHA`` (``register_script``), and Redis runs
a script to completion before any other command, so many threads and many processes
can claim the same id and exactly one gets ``NEW``.

Retention: every write (claim or reopen that takes the lease, mark_sent, record, release)
refreshes ``EXPIRE`` to ``retention_s`` (default :data:`RETENTION_S`), so Redis drops
a record ``retention_s`` after it was last written. :meth:`RedisStore.purge` has
nothing left to do and returns 0 without touching Redis.

Retries: the client retries a command twice on a connection error or timeout (fast
backoff), which survives a restarted Redis or a stale pooled connection. Replaying a
script that had in fact run is harmless: a replayed claim or reopen answers ``BUSY``
(its own lease), mark_sent/record/release are idempotent for the same token.

Durability is the server's: a script's writes are applied (and logged to the AOF)
as one unit, but they reach disk only as ``appendonly``/``appendfsync``/``save`` say.
With ``appendonly yes`` + ``appendfsync always`` an acknowledged write survives a
power loss; with ``everysec`` about the last second may be lost; with no AOF and no
RDB (``save ""``) a Redis restart forgets every record, so a command already sent
would be claimed ``NEW`` and sent again. Use the Redis store for "never twice" only
with AOF enabled.
"""

from __future__ import annotations

import math
import uuid
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from worker.errors import StoreError
from worker.store import redact_url
from worker.store.base import RETENTION_S, Claim, ClaimState

__all__ = ["RedisStore"]

# Lua fragments shared by _CLAIM and _REOPEN, which both take ARGV[2] now, ARGV[3]
# lease_until, ARGV[4] token and ARGV[5] ttl_s.
_READ = """
local rec = redis.call('HMGET', KEYS[1], 'fp', 'first_seen', 'state', 'lease_until',
                       'attempts', 'outcome')
"""
_TAKE_LEASE = """
redis.call('HSET', KEYS[1], 'state', 'claimed', 'token', ARGV[4], 'lease_until', ARGV[3],
           'updated_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
"""
# An existing record without an outcome: busy while leased, else taken over.
_CLAIM_EXISTING = (
    """
if rec[3] ~= 'released' and tonumber(rec[4]) > tonumber(ARGV[2]) then
  return {'busy', rec[2], attempts, rec[4]}
end
local kind = 'new'
if rec[3] == 'sent' then kind = 'takeover' end
"""
    + _TAKE_LEASE
    + """
return {kind, rec[2], attempts, ''}
"""
)

# KEYS[1] record; ARGV fingerprint, now, lease_until, token, ttl_s.
# Returns {kind, first_seen, attempts, extra}: extra is lease_until (busy) or outcome (done).
_CLAIM = (
    _READ
    + """
if not rec[1] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'first_seen', ARGV[2], 'updated_at', ARGV[2],
             'state', 'claimed', 'token', ARGV[4], 'lease_until', ARGV[3], 'attempts', '0')
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return {'new', ARGV[2], '0', ''}
end
local attempts = rec[5] or '0'
if rec[1] ~= ARGV[1] then
  return {'conflict', rec[2], attempts, ''}
end
if rec[6] then
  return {'done', rec[2], attempts, rec[6]}
end
"""
    + _CLAIM_EXISTING
)

# KEYS[1] record; ARGV outcome, now, lease_until, token, ttl_s. Same reply as _CLAIM: 'new'
# when the stored outcome is exactly ARGV[1] (cleared, lease taken), otherwise what a
# claim with the stored fingerprint answers (and does); 'conflict' for an unknown id,
# creating nothing.
_REOPEN = (
    _READ
    + """
if not rec[1] then
  return {'conflict', ARGV[2], '0', ''}
end
local attempts = rec[5] or '0'
if rec[6] then
  if rec[6] ~= ARGV[1] then
    return {'done', rec[2], attempts, rec[6]}
  end
  redis.call('HDEL', KEYS[1], 'outcome')
"""
    + _TAKE_LEASE
    + """
  return {'new', rec[2], attempts, ''}
end
"""
    + _CLAIM_EXISTING
)

# KEYS[1] record; ARGV token, attempts, lease_until, now, ttl_s. Returns 1 or 0.
_MARK_SENT = """
local rec = redis.call('HMGET', KEYS[1], 'token', 'outcome')
if rec[1] ~= ARGV[1] or rec[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'sent', 'attempts', ARGV[2], 'lease_until', ARGV[3],
           'updated_at', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS[1] record; ARGV outcome, attempts, ttl_s. Returns the stored outcome, or nil when
# the record is gone (expired): nothing is created then.
_RECORD = """
local rec = redis.call('HMGET', KEYS[1], 'fp', 'outcome', 'attempts')
if not rec[1] then
  return false
end
if rec[2] then
  return rec[2]
end
local attempts = rec[3] or '0'
if tonumber(ARGV[2]) > tonumber(attempts) then attempts = ARGV[2] end
redis.call('HSET', KEYS[1], 'state', 'done', 'outcome', ARGV[1], 'attempts', attempts)
redis.call('HDEL', KEYS[1], 'token')
redis.call('EXPIRE', KEYS[1], ARGV[3])
return ARGV[1]
"""

# KEYS[1] record; ARGV token, attempts, ttl_s. Returns 1 when released.
_RELEASE = """
local rec = redis.call('HMGET', KEYS[1], 'token', 'outcome', 'attempts')
if rec[1] ~= ARGV[1] or rec[2] then
  return 0
end
local attempts = rec[3] or '0'
if tonumber(ARGV[2]) > tonumber(attempts) then attempts = ARGV[2] end
redis.call('HSET', KEYS[1], 'state', 'released', 'attempts', attempts)
redis.call('HDEL', KEYS[1], 'token')
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""

_KINDS = {
    b"new": ClaimState.NEW,
    b"takeover": ClaimState.TAKEOVER,
    b"done": ClaimState.DONE,
    b"conflict": ClaimState.CONFLICT,
    b"busy": ClaimState.BUSY,
}


def _num(value: float) -> str:
    return repr(float(value))


class RedisStore:
    """:class:`~worker.store.base.Store` on Redis; safe for many threads and processes."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "pabx:cmd:",
        retention_s: float = RETENTION_S,
        label: str = "redis",
        secrets: tuple[str, ...] = (),
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl = max(1, math.ceil(retention_s))
        self._label = label
        self._secrets = secrets
        self._claim = client.register_script(_CLAIM)
        self._reopen = client.register_script(_REOPEN)
        self._mark_sent = client.register_script(_MARK_SENT)
        self._record = client.register_script(_RECORD)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(
        cls, url: str, *, prefix: str = "pabx:cmd:", retention_s: float = RETENTION_S
    ) -> RedisStore:
        """Open ``redis://[:password@]host[:port][/db]`` (or ``rediss://``); connects lazily."""
        label = redact_url(url)
        try:
            raw = urlsplit(url).password
        except ValueError:
            raw = None
        secrets = (raw, unquote(raw)) if raw else ()
        try:
            client = redis.Redis.from_url(
                url,
                socket_connect_timeout=5.0,
                socket_timeout=5.0,
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2),
            )
        except (redis.RedisError, ValueError) as exc:
            raise StoreError(_scrub(f"Redis store {label}: {exc}", secrets)) from exc
        return cls(client, prefix=prefix, retention_s=retention_s, label=label, secrets=secrets)

    def _key(self, command_id: str) -> str:
        return self._prefix + command_id

    def _error(self, exc: Exception) -> StoreError:
        return StoreError(
            _scrub(f"Redis store {self._label}: {type(exc).__name__}: {exc}", self._secrets)
        )

    def _run(self, script: Any, command_id: str, *args: str | bytes | int) -> Any:
        try:
            return script(keys=[self._key(command_id)], args=list(args))
        except redis.RedisError as exc:
            raise self._error(exc) from exc

    def claim(self, command_id: str, fingerprint: str, *, now: float, lease_s: float) -> Claim:
        token = uuid.uuid4().hex
        reply = self._run(
            self._claim, command_id, fingerprint, _num(now), _num(now + lease_s), token, self._ttl
        )
        return _claim_from(reply, token)

    def reopen(self, command_id: str, outcome: bytes, *, now: float, lease_s: float) -> Claim:
        token = uuid.uuid4().hex
        reply = self._run(
            self._reopen, command_id, outcome, _num(now), _num(now + lease_s), token, self._ttl
        )
        return _claim_from(reply, token)

    def mark_sent(
        self, command_id: str, token: str, attempts: int, *, now: float, lease_s: float
    ) -> bool:
        reply = self._run(
            self._mark_sent,
            command_id,
            token,
            attempts,
            _num(now + lease_s),
            _num(now),
            self._ttl,
        )
        return int(reply) == 1

    def record(self, command_id: str, token: str, outcome: bytes, attempts: int) -> bytes:
        reply = self._run(self._record, command_id, outcome, attempts, self._ttl)
        return outcome if reply is None else bytes(reply)

    def release(self, command_id: str, token: str, attempts: int) -> None:
        self._run(self._release, command_id, token, attempts, self._ttl)

    def purge(self, *, older_than: float) -> int:
        """Nothing to do: Redis expires each record ``retention_s`` after its last write.

        Always returns 0; ``older_than`` is ignored (retention is the TTL).
        """
        return 0

    def ping(self) -> None:
        try:
            self._client.ping()
        except redis.RedisError as exc:
            raise self._error(exc) from exc

    def close(self) -> None:
        try:
            self._client.close()
        except redis.RedisError as exc:
            raise self._error(exc) from exc


def _claim_from(reply: Any, token: str) -> Claim:
    """The Claim a _CLAIM or _REOPEN reply ``{kind, first_seen, attempts, extra}`` means."""
    kind = _KINDS[bytes(reply[0])]
    first_seen, attempts, extra = float(reply[1]), int(reply[2]), bytes(reply[3])
    if kind is ClaimState.DONE:
        return Claim(kind, first_seen, attempts, outcome=extra)
    if kind is ClaimState.BUSY:
        return Claim(kind, first_seen, attempts, lease_until=float(extra))
    if kind is ClaimState.CONFLICT:
        return Claim(kind, first_seen, attempts)
    return Claim(kind, first_seen, attempts, token)


def _scrub(message: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        message = message.replace(secret, "***")
    return message
