"""Redis idempotency store: one hash per command id, every operation one Lua script.

Layout: ``{prefix}{command_id}`` is a hash with the fields ``fp``, ``first_seen``,
``updated_at``, ``state``, ``token`` (absent when nobody holds a lease),
``lease_until``, ``attempts``, ``outcome`` (absent until there is one; stored as
the raw bytes), ``call_key`` (the call the command holds or held, once sent with one)
and ``send_id`` (the last ``mark_sent``'s own id, see Retries). The per-call record
is the hash ``{space}call:{call_key}`` with ``holder``, ``holder_until``, ``newest``,
``newest_order`` and ``updated_at``; the request schedule of a PABX target is the
string ``{space}slot:{target}`` (its next free slot, epoch seconds). ``space`` is the
prefix without its trailing ``cmd:`` (``pabx:`` for the default ``pabx:cmd:``), or
``{prefix}#`` for a prefix that does not end in ``cmd:``: a command id never contains
``#``, so command keys and call/slot keys cannot collide. Lease and call times are
the caller's ``now`` written as ``repr(float)`` strings, so they come back exactly.

Atomicity: each method is a single ``EVALSHA`` (``register_script``), and Redis runs
a script to completion before any other command, so many threads and many processes
can claim the same id and exactly one gets ``NEW``. ``mark_sent`` checks the token,
checks and takes the call hash and counts the attempt in one script (both keys in
``KEYS``); ``claim_and_send`` runs the claim and, when it took the lease, that same
step, in one script. ``renew``, ``record`` and ``release`` are not given the call key: their
scripts read ``call_key`` from the command hash and build the call hash's name from
the call prefix passed in ``ARGV``. Touching a key not declared in ``KEYS`` is fine
on a single Redis (and with replicas), not on Redis Cluster, which this store does
not support.

Fencing: ``mark_sent``, ``renew``, ``record`` and ``release`` compare the caller's
token with the hash's inside the script; a stale token changes nothing (``record``
still answers an outcome already stored).

Clock: ``reserve_slot`` reads Redis' own ``TIME`` inside its script, so every worker
on every host shares one schedule per target whatever their clocks say.

Retention: every write (claim or reopen that takes the lease, mark_sent, renew, record,
release, reserve_slot) refreshes ``EXPIRE`` to ``retention_s`` (default
:data:`RETENTION_S`) on each key it writes (command hash, call hash, slot key), so
Redis drops a key ``retention_s`` after it was last written. :meth:`RedisStore.purge`
has nothing left to do and returns 0 without touching Redis.

Retries: the client retries a command twice on a connection error or timeout (fast
backoff), which survives a restarted Redis or a stale pooled connection. Replaying a
script that had in fact run is harmless: a replayed claim or reopen answers ``BUSY``
(its own lease), record/release/renew are idempotent for the same token, and a
replayed ``mark_sent`` carries the same ``send_id``, which the script recognises and
answers ``SENT`` with the stored count instead of counting the attempt twice. A
replayed ``reserve_slot`` uses up one more slot (the caller waits one interval more).

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

from worker.adapters.store import redact_url
from worker.adapters.store.base import (
    RETENTION_S,
    CallRef,
    Claim,
    ClaimState,
    Send,
    SendState,
    hold_until,
)
from worker.contract.errors import ConfigurationError, StoreError
from worker.logs import redact_message

__all__ = ["RedisStore"]

# Lua fragments shared by _CLAIM and _REOPEN, which both take ARGV[2] now, ARGV[3]
# lease_until, ARGV[4] token and ARGV[5] ttl_s.
_READ = """
local rec = redis.call('HMGET', KEYS[1], 'fp', 'first_seen', 'state', 'lease_until',
                       'attempts', 'outcome', 'token')
"""
_TAKE_LEASE = """
redis.call('HSET', KEYS[1], 'state', 'claimed', 'token', ARGV[4], 'lease_until', ARGV[3],
           'updated_at', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[5])
"""
# An existing record without an outcome: busy while leased, else taken over.
_CLAIM_EXISTING = (
    """
local mine = rec[7] == ARGV[4]
if not mine and rec[3] ~= 'released' and tonumber(rec[4]) > tonumber(ARGV[2]) then
  return {'busy', rec[2], attempts, rec[4]}
end
local kind = 'new'
if rec[3] == 'sent' and not mine then kind = 'takeover' end
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

# The mark_sent step; A = {token, now, lease_until, ttl_s, command_id, send_id, call_key,
# order}, KEYS[1] record, KEYS[2] call hash (absent without a call). Returns {'sent',
# attempts}, {'lease_lost'}, {'superseded', newer} or {'call_busy', holder_until}.
_MARK_STEP = """
local function mark_sent(A)
  local rec = redis.call('HMGET', KEYS[1], 'token', 'outcome', 'send_id', 'attempts')
  if rec[1] ~= A[1] or rec[2] then
    return {'lease_lost'}
  end
  if rec[3] == A[6] then
    return {'sent', tonumber(rec[4])}
  end
  if KEYS[2] then
    local call = redis.call('HMGET', KEYS[2], 'holder', 'holder_until', 'newest', 'newest_order')
    local order = tonumber(A[8])
    if call[3] and call[3] ~= A[5] and tonumber(call[4]) > order then
      return {'superseded', call[3]}
    end
    if call[1] and call[1] ~= A[5] and tonumber(call[2]) > tonumber(A[2]) then
      return {'call_busy', call[2]}
    end
    redis.call('HSET', KEYS[2], 'holder', A[5], 'holder_until', A[3], 'updated_at', A[2])
    if not call[3] or order >= tonumber(call[4]) then
      redis.call('HSET', KEYS[2], 'newest', A[5], 'newest_order', A[8])
    end
    redis.call('EXPIRE', KEYS[2], A[4])
    redis.call('HSET', KEYS[1], 'call_key', A[7])
  end
  local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'state', 'sent', 'lease_until', A[3], 'updated_at', A[2],
             'send_id', A[6])
  redis.call('EXPIRE', KEYS[1], A[4])
  return {'sent', attempts}
end
"""

# ARGV token, now, lease_until, ttl_s, command_id, send_id, call_key, order.
_MARK_SENT = _MARK_STEP + "return mark_sent(ARGV)\n"

# KEYS as _MARK_SENT; ARGV as _CLAIM, then command_id, send_id, call_key, order. The claim's
# reply, then, when it took the lease, the mark_sent step's reply after it.
_CLAIM_AND_SEND = (
    _MARK_STEP
    + "local function claim()\n"
    + _CLAIM
    + """end
local c = claim()
if c[1] ~= 'new' and c[1] ~= 'takeover' then
  return c
end
local s = mark_sent({ARGV[4], ARGV[2], ARGV[3], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]})
return {c[1], c[2], c[3], c[4], s[1], s[2]}
"""
)

# Shared by _RECORD and _RELEASE: ``rec[4]`` is the record's call_key; ARGV[3] now,
# ARGV[4] ttl_s, ARGV[5] command_id, ARGV[6] the call hashes' prefix, ARGV[7] until when
# to keep holding the call (0: let go now). The call hash is named from the record, not
# declared in KEYS (single Redis only; see the module notes).
_LET_GO_OF_CALL = """
if rec[4] then
  local call = ARGV[6] .. rec[4]
  if redis.call('HGET', call, 'holder') == ARGV[5] then
    if tonumber(ARGV[7]) > 0 then
      redis.call('HSET', call, 'holder_until', ARGV[7], 'updated_at', ARGV[3])
    else
      redis.call('HDEL', call, 'holder')
      redis.call('HSET', call, 'holder_until', '0', 'updated_at', ARGV[3])
    end
    redis.call('EXPIRE', call, ARGV[4])
  end
end
"""

# KEYS[1] record; ARGV token, lease_until, now, ttl_s, command_id, call prefix. Returns 1 or 0.
_RENEW = """
local rec = redis.call('HMGET', KEYS[1], 'token', 'outcome', 'fp', 'call_key')
if rec[1] ~= ARGV[1] or rec[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'lease_until', ARGV[2], 'updated_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
if rec[4] then
  local call = ARGV[6] .. rec[4]
  if redis.call('HGET', call, 'holder') == ARGV[5] then
    redis.call('HSET', call, 'holder_until', ARGV[2], 'updated_at', ARGV[3])
    redis.call('EXPIRE', call, ARGV[4])
  end
end
return 1
"""

# KEYS[1] record; ARGV token, outcome, now, ttl_s, command_id, call prefix, hold until. Returns
# {'stored', outcome} (this one, or an earlier one, which wins), {'lost'} (stale token,
# nothing stored) or {'gone'} (the record expired: nothing is created).
_RECORD = (
    """
local rec = redis.call('HMGET', KEYS[1], 'token', 'outcome', 'fp', 'call_key')
if not rec[3] then
  return {'gone'}
end
if rec[2] then
  return {'stored', rec[2]}
end
if rec[1] ~= ARGV[1] then
  return {'lost'}
end
redis.call('HSET', KEYS[1], 'state', 'done', 'outcome', ARGV[2], 'updated_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'token')
redis.call('EXPIRE', KEYS[1], ARGV[4])
"""
    + _LET_GO_OF_CALL
    + """
return {'stored', ARGV[2]}
"""
)

# KEYS[1] record; ARGV token, (unused), now, ttl_s, command_id, call prefix, hold until.
# Returns 1 when released.
_RELEASE = (
    """
local rec = redis.call('HMGET', KEYS[1], 'token', 'outcome', 'fp', 'call_key')
if rec[1] ~= ARGV[1] or rec[2] then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'released', 'updated_at', ARGV[3])
redis.call('HDEL', KEYS[1], 'token')
redis.call('EXPIRE', KEYS[1], ARGV[4])
"""
    + _LET_GO_OF_CALL
    + """
return 1
"""
)

# KEYS[1] the target's slot key; ARGV interval_s, ttl_s. Redis' own clock: TIME is read
# inside the script (Redis >= 5 replicates a script's effects, so this is allowed).
# Returns the wait as a string (a Lua number would come back truncated to an integer).
_RESERVE_SLOT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local slot = now
local nxt = redis.call('GET', KEYS[1])
if nxt and tonumber(nxt) > now then
  slot = tonumber(nxt)
end
redis.call('SET', KEYS[1], string.format('%.17g', slot + tonumber(ARGV[1])), 'EX', ARGV[2])
return string.format('%.17g', slot - now)
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
    """:class:`~worker.adapters.store.base.Store` on Redis; safe for many threads and processes."""

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
        space = prefix.removesuffix("cmd:") if prefix.endswith("cmd:") else prefix + "#"
        self._call_prefix = space + "call:"
        self._slot_prefix = space + "slot:"
        self._ttl = max(1, math.ceil(retention_s))
        self._label = label
        self._secrets = secrets
        self._claim = client.register_script(_CLAIM)
        self._reopen = client.register_script(_REOPEN)
        self._mark_sent = client.register_script(_MARK_SENT)
        self._claim_and_send = client.register_script(_CLAIM_AND_SEND)
        self._renew = client.register_script(_RENEW)
        self._record = client.register_script(_RECORD)
        self._release = client.register_script(_RELEASE)
        self._reserve_slot = client.register_script(_RESERVE_SLOT)

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
        except ValueError as exc:  # a malformed URL: no connection is tried yet
            message = _scrub(f"PABX_WORKER_STORE_URL: Redis store {label}: {exc}", secrets)
            raise ConfigurationError(message) from None
        except redis.RedisError as exc:
            raise StoreError(_scrub(f"Redis store {label}: {exc}", secrets)) from exc
        return cls(client, prefix=prefix, retention_s=retention_s, label=label, secrets=secrets)

    def _key(self, command_id: str) -> str:
        return self._prefix + command_id

    def _call_key(self, call_key: str) -> str:
        return self._call_prefix + call_key

    def _slot_key(self, target: str) -> str:
        return self._slot_prefix + target

    def _error(self, exc: Exception) -> StoreError:
        return StoreError(
            _scrub(f"Redis store {self._label}: {type(exc).__name__}: {exc}", self._secrets)
        )

    def _run(self, script: Any, command_id: str, *args: str | bytes | int) -> Any:
        return self._eval(script, [self._key(command_id)], *args)

    def _eval(self, script: Any, keys: list[str], *args: str | bytes | int) -> Any:
        try:
            return script(keys=keys, args=list(args))
        except redis.RedisError as exc:
            raise self._error(exc) from exc

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
        reply = self._eval(
            self._claim_and_send,
            self._send_keys(command_id, call),
            fingerprint,
            _num(now),
            _num(now + lease_s),
            token,
            self._ttl,
            *self._send_args(command_id, call),
        )
        claim = _claim_from(reply[:4], token)
        return claim, (_send_from(reply[4:]) if len(reply) > 4 else None)

    def mark_sent(
        self, command_id: str, token: str, call: CallRef | None, *, now: float, lease_s: float
    ) -> Send:
        reply = self._eval(
            self._mark_sent,
            self._send_keys(command_id, call),
            token,
            _num(now),
            _num(now + lease_s),
            self._ttl,
            *self._send_args(command_id, call),
        )
        return _send_from(reply)

    def _send_keys(self, command_id: str, call: CallRef | None) -> list[str]:
        keys = [self._key(command_id)]
        if call is not None:
            keys.append(self._call_key(call.key))
        return keys

    @staticmethod
    def _send_args(command_id: str, call: CallRef | None) -> tuple[str, ...]:
        return (
            command_id,
            uuid.uuid4().hex,  # this send's id: a replay by the client's retry is recognised
            call.key if call is not None else "",
            _num(call.order if call is not None else 0.0),
        )

    def renew(self, command_id: str, token: str, *, now: float, lease_s: float) -> bool:
        reply = self._run(
            self._renew,
            command_id,
            token,
            _num(now + lease_s),
            _num(now),
            self._ttl,
            command_id,
            self._call_prefix,
        )
        return int(reply) == 1

    def record(
        self, command_id: str, token: str, outcome: bytes, *, now: float, hold_call_s: float = 0.0
    ) -> bytes | None:
        reply = self._run(
            self._record,
            command_id,
            token,
            outcome,
            _num(now),
            self._ttl,
            command_id,
            self._call_prefix,
            _num(hold_until(now, hold_call_s)),
        )
        match bytes(reply[0]):
            case b"stored":
                return bytes(reply[1])
            case b"lost":
                return None
        return outcome  # the record is gone (expired): nothing to keep it in

    def release(self, command_id: str, token: str, *, now: float, hold_call_s: float = 0.0) -> None:
        self._run(
            self._release,
            command_id,
            token,
            "",
            _num(now),
            self._ttl,
            command_id,
            self._call_prefix,
            _num(hold_until(now, hold_call_s)),
        )

    def reserve_slot(self, target: str, *, interval_s: float) -> float:
        reply = self._eval(
            self._reserve_slot, [self._slot_key(target)], _num(interval_s), self._ttl
        )
        return max(0.0, float(reply))

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


def _send_from(reply: Any) -> Send:
    """The Send a mark_sent step's reply ``{state, detail}`` means."""
    match bytes(reply[0]):
        case b"sent":
            return Send(SendState.SENT, int(reply[1]))
        case b"superseded":
            return Send(SendState.SUPERSEDED, newer=bytes(reply[1]).decode())
        case b"call_busy":
            return Send(SendState.CALL_BUSY, busy_until=float(reply[1]))
    return Send(SendState.LEASE_LOST)


def _scrub(message: str, secrets: tuple[str, ...]) -> str:
    """``message`` with URL passwords masked, and any whole word equal to the password.

    Never a substring of other words: a short password must not garble the message.
    """
    return redact_message(message, secrets)
