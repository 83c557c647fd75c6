"""The path of one command: decode → validate → idempotency claim → deadline → PABX → record.

:class:`Processor` is plain logic: the PABX client and the store are passed in,
and the result is a :class:`Decision` that the consumer carries out
(publish, park, delay, then ack). Nothing here imports an AMQP library.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum
from typing import Any, Protocol

from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from worker.circuit import CircuitBreaker
from worker.errors import (
    CircuitOpen,
    InvalidCommand,
    PabxError,
    PabxPermanentError,
    PabxTransientError,
    StoreError,
)
from worker.messages import (
    RETRIES_HEADER,
    Delivery,
    decode_command,
    event_id_for,
    fingerprint,
    header_count,
    raw_event_id,
    readable_command_id,
    replay_generation,
)
from worker.models import ErrorInfo, PabxInfo, RedirectCommand, Status
from worker.outcomes import as_duplicate, build_event, encode
from worker.settings import PabxTarget, Settings
from worker.store.base import RETENTION_S, Claim, ClaimState, Store

__all__ = ["Action", "Decision", "PabxClient", "Policy", "Prepared", "Processor"]

log = logging.getLogger("pabx_worker.pipeline")


class PabxClient(Protocol):
    """Sends a redirect to a PABX; returns the HTTP status (200) or raises PabxError."""

    def redirect(self, target: PabxTarget, channel_id: int, body: Mapping[str, str]) -> int: ...


class Action(StrEnum):
    """What the consumer does with a delivery once it is handled."""

    #: Publish the outcome (and a parked copy for rejected/failed), then ack.
    FINISH = "finish"
    #: Publish the command to a broker-held retry queue, then ack.
    RETRY = "retry"


@dataclass(frozen=True)
class Decision:
    """The result of handling one delivery."""

    action: Action
    event: bytes | None = None
    status: Status | None = None
    error: ErrorInfo | None = None
    attempts: int = 0
    park: bool = False
    duplicate: bool = False
    delay_s: float = 0.0
    command_id: str | None = None


@dataclass(frozen=True)
class Policy:
    """The settings the pipeline needs, derived once from :class:`Settings`."""

    command_ttl_s: float = 120.0
    delivery_limit: int = 10
    in_process_attempts: int = 3
    in_process_max_wait_s: float = 1.0
    max_attempts: int = 12
    lease_s: float = 60.0
    retry_delays_s: tuple[float, ...] = (1.0, 5.0, 30.0)

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        per_try = settings.pabx_connect_timeout_s + settings.pabx_read_timeout_s
        attempts = settings.retry_in_process_attempts
        budget = attempts * per_try + (attempts - 1) * settings.retry_in_process_max_wait_s
        return cls(
            command_ttl_s=settings.command_ttl_s,
            delivery_limit=settings.delivery_limit,
            in_process_attempts=attempts,
            in_process_max_wait_s=settings.retry_in_process_max_wait_s,
            max_attempts=settings.retry_max_attempts,
            # Longer than any in-process run, so a live worker never loses its lease.
            lease_s=budget + 10.0,
            retry_delays_s=settings.retry_delays_s,
        )


@dataclass(frozen=True)
class Prepared:
    """A delivery after the CPU-only steps: decoded, validated, identified."""

    delivery: Delivery
    event_id: str
    command_id: str | None
    command: RedirectCommand | None = None
    fingerprint: str = ""
    target_name: str = "default"
    invalid: str | None = None

    @property
    def call_key(self) -> str | None:
        """Commands with the same key are sent one at a time, in order."""
        return self.command.redirect.ID_CHAMADA if self.command else None


class Processor:
    """Handles deliveries; safe to call from many threads at once."""

    def __init__(
        self,
        *,
        pabx: PabxClient,
        store: Store,
        targets: Mapping[str, PabxTarget],
        policy: Policy,
        passwords: Mapping[str, str] | None = None,
        breaker: CircuitBreaker | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._pabx = pabx
        self._store = store
        self._targets = dict(targets)
        self._policy = policy
        self._passwords = dict(passwords or {})
        self._clock = clock
        #: Shared with the consumer, which pauses while it is open.
        self.breaker = breaker or CircuitBreaker(threshold=1_000_000, reset_s=1.0)

    # -- CPU-only part, run where the message arrived -------------------------------

    def prepare(self, delivery: Delivery) -> Prepared:
        """Decode and validate; never raises."""
        try:
            command = decode_command(delivery)
            self._check_resolvable(command)
        except InvalidCommand as exc:
            command_id = readable_command_id(delivery)
            return Prepared(
                delivery, raw_event_id(delivery.body, command_id), command_id, invalid=str(exc)
            )
        assert command.command_id is not None  # decode_command guarantees it
        body_fp = fingerprint(command)
        return Prepared(
            delivery,
            event_id_for(command.command_id, body_fp, replay_generation(delivery.headers)),
            command.command_id,
            command,
            body_fp,
            command.pabx,
        )

    def _check_resolvable(self, command: RedirectCommand) -> None:
        if command.pabx not in self._targets:
            raise InvalidCommand(f"pabx: no PABX target named {command.pabx!r} is configured")
        body = command.redirect
        if body.SENHA_DISPOSITIVO is None and body.DISPOSITIVO not in self._passwords:
            raise InvalidCommand(
                "redirect.SENHA_DISPOSITIVO: required, and the device file does not know"
                f" DISPOSITIVO {body.DISPOSITIVO!r}"
            )

    # -- I/O part, run on a worker thread ----------------------------------------------

    def store_answers(self) -> bool:
        """Whether the idempotency store answers right now (for readiness)."""
        try:
            self._store.ping()
        except StoreError:
            return False
        return True

    def purge(self) -> int:
        """Drop idempotency records older than the retention period."""
        return self._store.purge(older_than=self._clock() - RETENTION_S)

    def execute(self, prepared: Prepared) -> Decision:
        """Carry the command through; raises StoreError when the store is down."""
        poisoned = prepared.delivery.delivery_count >= self._policy.delivery_limit - 1
        if prepared.invalid is not None or (poisoned and prepared.command is None):
            return self._reject_unusable(prepared, poisoned)
        assert prepared.command is not None and prepared.command_id is not None
        now = self._clock()
        try:
            claim = self._store.claim(
                prepared.command_id, prepared.fingerprint, now=now, lease_s=self._policy.lease_s
            )
        except StoreError:
            if not poisoned:
                raise
            return self._finish(prepared, Status.FAILED, "poison_message", _poison(prepared))
        if claim.state is ClaimState.DONE and self._replayed_after(prepared, claim):
            assert claim.outcome is not None
            claim = self._store.reopen(
                prepared.command_id, claim.outcome, now=now, lease_s=self._policy.lease_s
            )
        if claim.state is ClaimState.DONE:
            return self._replay(prepared, claim)
        if claim.state is ClaimState.CONFLICT:
            return self._finish(
                prepared,
                Status.REJECTED,
                "idempotency_conflict",
                "an earlier command with this command_id had a different body",
            )
        if poisoned:  # its one outcome, recorded when the claim is ours
            if claim.token is None:
                return self._finish(prepared, Status.FAILED, "poison_message", _poison(prepared))
            return self._record(
                prepared,
                claim.token,
                Status.FAILED,
                "poison_message",
                _poison(prepared),
                claim.attempts,
            )
        if claim.state is ClaimState.BUSY:
            wait = (claim.lease_until or now) - now
            return Decision(
                Action.RETRY,
                delay_s=max(wait, 0.0),
                command_id=prepared.command_id,
                attempts=claim.attempts,
            )
        return self._send(prepared, claim, now)

    def _reject_unusable(self, prepared: Prepared, poisoned: bool) -> Decision:
        if poisoned:
            return self._finish(prepared, Status.FAILED, "poison_message", _poison(prepared))
        return self._finish(
            prepared, Status.REJECTED, "invalid_command", prepared.invalid or "invalid"
        )

    @staticmethod
    def _replayed_after(prepared: Prepared, claim: Claim) -> bool:
        """An operator replayed a command that did not end accepted: it may go out again."""
        assert claim.outcome is not None
        if replay_generation(prepared.delivery.headers) == 0:
            return False
        stored = json.loads(claim.outcome)
        return bool(stored["id"] != prepared.event_id and stored["data"]["status"] != "accepted")

    def _replay(self, prepared: Prepared, claim: Claim) -> Decision:
        assert claim.outcome is not None
        data = _stored_data(claim.outcome)
        error = ErrorInfo.model_validate(data["error"]) if data.get("error") else None
        return Decision(
            Action.FINISH,
            event=as_duplicate(claim.outcome),
            status=Status(data["status"]),
            error=error,
            attempts=int(data["attempts"]),
            park=False,
            duplicate=True,
            command_id=prepared.command_id,
        )

    def _deadline(self, command: RedirectCommand, delivery: Delivery, first_seen: float) -> float:
        ttl = timedelta(seconds=self._policy.command_ttl_s)
        if command.expires_at is not None:
            return command.expires_at.timestamp()
        if command.issued_at is not None:
            return (command.issued_at + ttl).timestamp()
        if delivery.timestamp is not None:
            return (delivery.timestamp + ttl).timestamp()
        return first_seen + ttl.total_seconds()

    def _send(self, prepared: Prepared, claim: Claim, now: float) -> Decision:
        command, command_id, token = prepared.command, prepared.command_id, claim.token
        assert command is not None and command_id is not None and token is not None
        deadline = self._deadline(command, prepared.delivery, claim.first_seen)
        attempts = claim.attempts
        if now >= deadline:
            return self._record(
                prepared,
                token,
                Status.EXPIRED,
                "expired",
                "the deadline passed before the command could be sent",
                attempts,
            )
        target = self._targets[command.pabx]
        channel_id = command.channel_id or target.channel_id
        body = self._vendor_body(command)

        def attempt() -> int:
            nonlocal attempts
            if not self.breaker.allow():
                raise CircuitOpen("not sent: the PABX circuit breaker is open")
            if not self._store.mark_sent(
                command_id, token, attempts + 1, now=self._clock(), lease_s=self._policy.lease_s
            ):
                raise _LeaseLost
            attempts += 1
            return self._call_pabx(target, channel_id, body)

        retrying = Retrying(
            stop=stop_after_attempt(self._policy.in_process_attempts)
            | stop_before_delay(max(deadline - now, 0.0)),
            wait=wait_random_exponential(multiplier=0.1, max=self._policy.in_process_max_wait_s),
            retry=retry_if_exception_type(PabxTransientError),
            reraise=True,
        )
        try:
            status_code = retrying(attempt)
        except PabxPermanentError as exc:
            status = Status.REJECTED if exc.code == "pabx_bad_request" else Status.FAILED
            return self._record(
                prepared, token, status, exc.code, str(exc), attempts, exc.status_code
            )
        except (PabxTransientError, RetryError) as exc:
            return self._after_transient(prepared, token, exc, attempts, deadline)
        except _LeaseLost:
            # Another worker took the command over (or finished it): it is theirs now.
            # Come back later through the broker and replay whatever they recorded.
            log.warning("lease lost before sending", extra={"command_id": command_id})
            return Decision(
                Action.RETRY,
                delay_s=self._policy.retry_delays_s[0],
                attempts=attempts,
                command_id=command_id,
            )
        return self._record(prepared, token, Status.ACCEPTED, None, None, attempts, status_code)

    def _call_pabx(self, target: PabxTarget, channel_id: int, body: dict[str, str]) -> int:
        try:
            status_code = self._pabx.redirect(target, channel_id, body)
        except PabxTransientError:
            self.breaker.failure()
            raise
        except PabxPermanentError:
            self.breaker.success()  # it answered: it is up
            raise
        self.breaker.success()
        return status_code

    def _after_transient(
        self, prepared: Prepared, token: str, exc: BaseException, attempts: int, deadline: float
    ) -> Decision:
        assert prepared.command_id is not None
        error = exc if isinstance(exc, PabxError) else PabxTransientError(str(exc))
        if attempts >= self._policy.max_attempts:
            return self._record(
                prepared,
                token,
                Status.FAILED,
                error.code,
                f"{error} (after {attempts} attempts)",
                attempts,
                error.status_code,
            )
        retries = header_count(prepared.delivery.headers, RETRIES_HEADER)
        steps = self._policy.retry_delays_s
        delay = steps[min(retries, len(steps) - 1)]
        if self._clock() + delay >= deadline:
            return self._record(
                prepared,
                token,
                Status.EXPIRED,
                "expired",
                f"the deadline passed while the PABX failed: {error}",
                attempts,
                error.status_code,
            )
        self._store.release(prepared.command_id, token, attempts)
        log.info(
            "pabx transient failure, retrying through the broker",
            extra={
                "command_id": prepared.command_id,
                "attempt": attempts,
                "delay_s": delay,
                "error": str(error),
            },
        )
        return Decision(
            Action.RETRY, delay_s=delay, attempts=attempts, command_id=prepared.command_id
        )

    def _vendor_body(self, command: RedirectCommand) -> dict[str, str]:
        body = command.redirect.model_dump(exclude_none=True)
        body.setdefault("SENHA_DISPOSITIVO", self._passwords.get(command.redirect.DISPOSITIVO))
        return body

    def _record(
        self,
        prepared: Prepared,
        token: str,
        status: Status,
        code: str | None,
        message: str | None,
        attempts: int,
        status_code: int | None = None,
    ) -> Decision:
        assert prepared.command_id is not None
        decision = self._finish(prepared, status, code, message, attempts, status_code)
        assert decision.event is not None
        stored = self._store.record(prepared.command_id, token, decision.event, attempts)
        if stored != decision.event:  # another worker finished first: its outcome stands
            return self._replay(prepared, Claim(ClaimState.DONE, 0.0, attempts, outcome=stored))
        return decision

    def _finish(
        self,
        prepared: Prepared,
        status: Status,
        code: str | None,
        message: str | None,
        attempts: int = 0,
        status_code: int | None = None,
    ) -> Decision:
        error = ErrorInfo(code=code, message=message or code) if code else None  # type: ignore[arg-type]
        pabx = None
        if prepared.command is not None and (attempts or status_code):
            pabx = PabxInfo(name=prepared.target_name, status_code=status_code)
        event = build_event(
            event_id=prepared.event_id,
            status=status,
            command_id=prepared.command_id,
            attempts=attempts,
            command=prepared.command,
            pabx=pabx,
            error=error,
            delivery=prepared.delivery,
        )
        return Decision(
            Action.FINISH,
            event=encode(event),
            status=status,
            error=error,
            attempts=attempts,
            park=status in (Status.REJECTED, Status.FAILED),
            command_id=prepared.command_id,
        )


def _poison(prepared: Prepared) -> str:
    count = prepared.delivery.delivery_count + 1
    return f"delivered {count} times without an outcome: parked, not processed again"


class _LeaseLost(Exception):
    """The claim was taken over before the PABX call: do not send."""


def _stored_data(outcome: bytes) -> dict[str, Any]:
    data = json.loads(outcome)["data"]
    assert isinstance(data, dict)
    return data
