"""The path of one command: decode → validate → claim → deadline → pace → mark sent → PABX → record.

:class:`Processor` is plain logic: the PABX client and the store are passed in.
:meth:`Processor.prepare` turns a delivery into a :data:`Prepared` (:class:`Valid` or
:class:`Unusable`) and :meth:`Processor.execute` turns that into the one
:data:`Decision` about it (:class:`Finish`, :class:`Retry` or :class:`Requeue`), which the
consumer carries out. Neither raises. Nothing here imports an AMQP library.

What may be sent again (SPEC §5): a failure where the request never reached the
PABX (:class:`~worker.contract.errors.PabxUnreachable`: refused, connect timeout, 429, 503)
is retried, first here, then through the broker-held retry queues. An ambiguous
one (:class:`~worker.contract.errors.PabxOutcomeUnknown`) ends ``failed`` /
``pabx_outcome_unknown`` unless ``RETRY_AMBIGUOUS`` is set. Every request is
counted in the store before it goes out, so an outcome's ``attempts`` is the
store's count.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, NamedTuple, Protocol, TypeAlias, TypeVar

from tenacity import (
    RetryError,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_random_exponential,
)

from worker.adapters.store.base import (
    RETENTION_S,
    CallRef,
    Claim,
    ClaimState,
    Send,
    SendState,
    Store,
)
from worker.consume.circuit import CircuitBreaker, CircuitState
from worker.consume.leases import LeaseKeeper
from worker.consume.ratelimit import FleetRateLimit
from worker.contract import headers as hdr
from worker.contract.errors import (
    CircuitOpen,
    InvalidCommand,
    PabxBadRequest,
    PabxError,
    PabxOutcomeUnknown,
    PabxPermanentError,
    PabxTransientError,
    PabxUnreachable,
    StoreError,
)
from worker.contract.messages import (
    Delivery,
    decode_command,
    event_id_for,
    fingerprint,
    header_count,
    raw_event_id,
    readable_command_id,
    replay_generation,
)
from worker.contract.models import ErrorCode, ErrorInfo, PabxInfo, RedirectCommand, Status
from worker.contract.outcomes import SOURCE, as_duplicate, build_event, encode
from worker.contract.settings import PabxTarget, Settings
from worker.tracing import NO_TRACING, Span, Tracing

__all__ = [
    "Decision",
    "Finish",
    "PabxClient",
    "Policy",
    "Prepared",
    "Processor",
    "Requeue",
    "Retry",
    "Unusable",
    "Valid",
]

log = logging.getLogger("pabx_worker.pipeline")

T = TypeVar("T")

#: First and longest pause between looks at a call another worker holds.
CALL_POLL_S = (0.01, 0.2)
#: First and longest pause between pings of a store that stopped answering.
STORE_POLL_S = (0.1, 2.0)


class PabxClient(Protocol):
    """Sends a redirect to a PABX; returns the HTTP status (200) or raises PabxError."""

    def redirect(self, target: PabxTarget, channel_id: int, body: Mapping[str, str]) -> int: ...


@dataclass(frozen=True)
class Finish:
    """The command has its outcome: publish the event (and a parked copy), then ack."""

    event: bytes
    status: Status
    command_id: str | None
    error: ErrorInfo | None = None
    attempts: int = 0
    #: Publish a copy of the command to the parked queue (never for a duplicate).
    park: bool = False
    #: The outcome was recorded before: ``event`` is that outcome, marked duplicate.
    duplicate: bool = False
    #: W3C trace context (``traceparent``, ``tracestate``) for the outcome's AMQP headers.
    trace: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Retry:
    """Not done yet: publish the command to the retry queue nearest ``delay_s``, then ack."""

    delay_s: float
    attempts: int
    command_id: str | None
    #: W3C trace context of the command's span, for its log line.
    trace: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Requeue:
    """Not handled here (the worker is stopping, or handling failed): the broker redelivers it."""

    reason: str


#: What becomes of one delivery.
Decision: TypeAlias = Finish | Retry | Requeue


@dataclass(frozen=True)
class Policy:
    """The settings the pipeline needs, derived once from :class:`Settings`."""

    command_ttl_s: float = 120.0
    delivery_limit: int = 10
    in_process_attempts: int = 3
    in_process_max_wait_s: float = 1.0
    max_attempts: int = 12
    lease_s: float = 30.0
    retry_delays_s: tuple[float, ...] = (1.0, 5.0, 30.0)
    retry_ambiguous: bool = False
    #: The longest one PABX request may take (connect + read timeout).
    request_s: float = 8.0
    #: How long a command keeps holding its call after a request of its went unanswered:
    #: the PABX may still be carrying it out (the read timeout, once more).
    unanswered_hold_s: float = 5.0
    #: CloudEvents ``source`` of outcome events (the deployment).
    event_source: str = SOURCE

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        request_s = settings.pabx_connect_timeout_s + settings.pabx_read_timeout_s
        return cls(
            command_ttl_s=settings.command_ttl_s,
            delivery_limit=settings.delivery_limit,
            in_process_attempts=settings.retry_in_process_attempts,
            in_process_max_wait_s=settings.retry_in_process_max_wait_s,
            max_attempts=settings.retry_max_attempts,
            lease_s=settings.lease_seconds(),
            retry_delays_s=settings.retry_delays_s,
            retry_ambiguous=settings.retry_ambiguous,
            request_s=request_s,
            unanswered_hold_s=settings.pabx_read_timeout_s,
            event_source=settings.event_source,
        )


@dataclass(frozen=True)
class Valid:
    """A command that can be carried out: decoded, validated, its target known."""

    delivery: Delivery
    event_id: str
    command_id: str
    command: RedirectCommand
    fingerprint: str
    #: The lease token this delivery claims with: a claim repeated after a store outage
    #: (its first answer lost) finds its own lease instead of a busy one.
    claim_token: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def target_name(self) -> str:
        return self.command.pabx

    @cached_property
    def call_key(self) -> str:
        """Commands with the same key (``pabx:ID_CHAMADA``) are sent one at a time, in order."""
        return f"{self.command.pabx}:{self.command.redirect.ID_CHAMADA}"

    @cached_property
    def issued(self) -> float | None:
        """When the command was issued, as a Unix time (:func:`_issued`); None when it
        carries neither (first seen stands in)."""
        return _issued(self.command, self.delivery)

    @cached_property
    def expires(self) -> float | None:
        """Its ``expires_at`` as a Unix time, or None."""
        expires_at = self.command.expires_at
        return None if expires_at is None else expires_at.timestamp()


@dataclass(frozen=True)
class Unusable:
    """A delivery that can never be carried out as sent; it ends ``rejected``."""

    delivery: Delivery
    event_id: str
    command_id: str | None
    #: Why, for the outcome's error message.
    reason: str
    code: ErrorCode = ErrorCode.INVALID_COMMAND
    #: The command, when it was valid but may not be carried out (``producer_not_allowed``).
    command: RedirectCommand | None = None

    @property
    def call_key(self) -> None:
        return None

    @property
    def issued(self) -> float | None:
        """When the command was issued, as a Unix time (:func:`_issued`), or None."""
        return _issued(self.command, self.delivery)


#: A delivery after the CPU-only steps.
Prepared: TypeAlias = Valid | Unusable


def _issued(command: RedirectCommand | None, delivery: Delivery) -> float | None:
    """The command's ``issued_at``, else the message's timestamp, as a Unix time."""
    issued = (command.issued_at if command is not None else None) or delivery.timestamp
    return None if issued is None else issued.timestamp()


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
        breakers: Mapping[str, CircuitBreaker] | None = None,
        leases: LeaseKeeper | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._pabx = pabx
        self._tracing = tracing
        self._store = store
        self._targets = dict(targets)
        self._policy = policy
        self._passwords = dict(passwords or {})
        self._clock = clock
        self._sleep = sleep
        self._leases = leases or LeaseKeeper(store, lease_s=policy.lease_s, clock=clock)
        self._pace = FleetRateLimit(store, targets, sleep=sleep)
        given = dict(breakers or {})
        #: One circuit per PABX target; the consumer pauses only while every one is open.
        self.breakers = {
            name: given.get(name) or CircuitBreaker(threshold=1_000_000, reset_s=1.0)
            for name in self._targets
        }
        #: The store's circuit: open from a failed store call until a ping answers.
        self.store_breaker = CircuitBreaker(threshold=1, reset_s=STORE_POLL_S[0])
        #: Set when the worker stops: store waits give up.
        self.stopping = threading.Event()

    # -- CPU-only part, run where the message arrived -------------------------------

    def prepare(self, delivery: Delivery) -> Prepared:
        """Decode and validate; never raises."""
        try:
            return self._prepare(delivery)
        except Exception as exc:  # a bug, not bad input: reject the message, do not die
            log.exception("could not decode a message")
            return Unusable(
                delivery,
                raw_event_id(delivery.body),
                None,
                f"the message could not be decoded ({type(exc).__name__})",
            )

    def _prepare(self, delivery: Delivery) -> Prepared:
        try:
            command = decode_command(delivery)
            self._check_resolvable(command)
            command_id = _known(command.command_id)
        except InvalidCommand as exc:
            readable = readable_command_id(delivery)
            return Unusable(delivery, raw_event_id(delivery.body, readable), readable, str(exc))
        refusal = self._producer_refusal(command, delivery.user_id)
        if refusal is not None:  # not recorded: the id stays free for an allowed producer
            return Unusable(
                delivery,
                raw_event_id(delivery.body, command_id),
                command_id,
                refusal,
                ErrorCode.PRODUCER_NOT_ALLOWED,
                command,
            )
        body_fp = fingerprint(command)
        return Valid(
            delivery,
            event_id_for(command_id, body_fp, replay_generation(delivery.headers)),
            command_id,
            command,
            body_fp,
        )

    def _producer_refusal(self, command: RedirectCommand, user_id: str | None) -> str | None:
        """Why this producer may not command the target (SPEC §9), or None if it may."""
        allowed = self._targets[command.pabx].allowed_producers
        if allowed is None or (user_id is not None and user_id in allowed):
            return None
        who = f"user_id {user_id!r}" if user_id else "a message without user_id"
        return f"pabx {command.pabx!r} does not accept commands from {who}"

    def _check_resolvable(self, command: RedirectCommand) -> None:
        if command.pabx not in self._targets:
            raise InvalidCommand(f"pabx: no PABX target named {command.pabx!r} is configured")
        body = command.redirect
        if body.SENHA_DISPOSITIVO is None and body.DISPOSITIVO not in self._passwords:
            raise InvalidCommand(
                "redirect.SENHA_DISPOSITIVO: required, and the device file does not know"
                f" DISPOSITIVO {body.DISPOSITIVO!r}"
            )

    # -- the store's health -----------------------------------------------------------

    def store_answers(self) -> bool:
        """Whether the idempotency store answers right now (for readiness)."""
        try:
            self._store.ping()
        except StoreError:
            self.store_breaker.failure()
            return False
        self.store_breaker.success()
        return True

    def wait_for_store(self) -> bool:
        """Block until the store answers again (True) or the worker stops (False)."""
        pause = STORE_POLL_S[0]
        while not self.stopping.wait(pause):
            if self.store_answers():
                return True
            pause = min(pause * 2, STORE_POLL_S[1])
        return False

    def _durably(self, step: Callable[[], T]) -> T:
        """Run a store step that follows the claim; while the store is down, wait and redo it.

        Giving up instead would leave a lease that blocks the command, or a sent request
        without its record. Every such step is safe to repeat with the same token.
        """
        while True:
            try:
                result = step()
            except StoreError as exc:
                self.store_breaker.failure()
                log.warning("store unavailable; waiting for it", extra={"error": str(exc)})
                if not self.wait_for_store():
                    raise
                continue
            self.store_breaker.success()
            return result

    def purge(self) -> int:
        """Drop idempotency records older than the retention period."""
        return self._store.purge(older_than=self._clock() - RETENTION_S)

    # -- I/O part, run on a worker thread ----------------------------------------------

    def execute(self, prepared: Prepared) -> Decision:
        """Decide what becomes of one delivery in its own span (SPEC §8); never raises."""
        with self._tracing.command_span(prepared.delivery.headers) as span:
            decision = self._decide(prepared)
            if span.recording:
                _describe_span(span, prepared, decision)
                if isinstance(decision, Retry):
                    decision = replace(decision, trace=self._tracing.current())
        return decision

    def _decide(self, prepared: Prepared) -> Decision:
        """Decide what becomes of one delivery; never raises.

        While the store does not answer at the claim, the command waits here rather than
        in a retry queue (the consumer pauses meanwhile); a worker stopping then, or an
        unexpected error, gives the delivery back to the broker.
        """
        try:
            match prepared:
                case Unusable():
                    poison = _poison(prepared, self._policy.delivery_limit)
                    if poison is not None:
                        return self._finish(prepared, *poison)
                    return self._finish(prepared, Status.REJECTED, prepared.code, prepared.reason)
                case Valid():
                    return self._execute(prepared)
        except StoreError:
            return Requeue("the store does not answer and the worker is stopping")
        except Exception:
            log.exception("command handling failed", extra={"command_id": prepared.command_id})
            return Requeue("handling failed")

    def _execute(self, prepared: Valid) -> Decision:
        # Past the delivery limit, a command gets its one outcome: failed, poison_message
        # (recorded when the claim is ours), unless it is already done or in conflict.
        poison = _poison(prepared, self._policy.delivery_limit)
        claimed = self._claim(prepared, poison)
        if not isinstance(claimed, tuple):
            return claimed
        (claim, sent), now, command_id = claimed, self._clock(), prepared.command_id
        if claim.state is ClaimState.DONE and self._replayed_after(prepared, claim):
            claim = self._durably(
                lambda: self._store.reopen(
                    command_id, claim.outcome or b"", now=now, lease_s=self._policy.lease_s
                )
            )
        match claim.state:
            case ClaimState.DONE:
                return self._duplicate(prepared, claim.outcome or b"")
            case ClaimState.CONFLICT:
                return self._finish(
                    prepared,
                    Status.REJECTED,
                    ErrorCode.IDEMPOTENCY_CONFLICT,
                    "an earlier command with this command_id had a different body",
                )
            case ClaimState.BUSY if poison is not None:
                return self._finish(prepared, *poison)
            case ClaimState.BUSY:
                wait = (claim.lease_until or now) - now
                return Retry(max(wait, 0.0), claim.attempts, command_id)
        token = claim.token or ""
        if poison is not None:
            return self._record(prepared, token, *poison, claim.attempts)
        with self._leases.holding(command_id, token):
            return self._send(prepared, claim, token, now, sent)

    def _claim(
        self, prepared: Valid, poison: _Ending | None
    ) -> tuple[Claim, Send | None] | Decision:
        """Claim the command; while the store is down, wait for it (a poisoned one ends).

        When nothing has to happen between the claim and marking the first request sent
        (:meth:`_sends_at_once`), both are one store step and the send comes back with it.
        """
        call = self._sends_at_once(prepared, poison)
        while True:
            now = self._clock()
            try:
                if call is not None:
                    claimed = self._store.claim_and_send(
                        prepared.command_id,
                        prepared.fingerprint,
                        call,
                        now=now,
                        lease_s=self._policy.lease_s,
                        token=prepared.claim_token,
                    )
                else:
                    claim = self._store.claim(
                        prepared.command_id,
                        prepared.fingerprint,
                        now=now,
                        lease_s=self._policy.lease_s,
                        token=prepared.claim_token,
                    )
                    claimed = (claim, None)
            except StoreError as exc:
                self.store_breaker.failure()
                if poison is not None:
                    return self._finish(prepared, *poison)
                log.warning("store unavailable; command held", extra={"error": str(exc)})
                if not self.wait_for_store():
                    raise
                continue
            self.store_breaker.success()
            return claimed

    def _sends_at_once(self, prepared: Valid, poison: _Ending | None) -> CallRef | None:
        """The call to mark sent together with the claim, or None to claim alone.

        Only when the first request would go out right after the claim: not poisoned, no
        rate limit slot to wait for, the target's circuit closed, and a deadline and issue
        order that do not depend on when the command was first seen, with time left.
        """
        command = prepared.command
        if poison is not None or self._pace.limits(command.pabx) or self.stopping.is_set():
            return None
        if self.breakers[command.pabx].state is not CircuitState.CLOSED:
            return None
        if prepared.issued is None:
            return None  # first seen, the issue order: known only once claimed
        if self._clock() >= self._deadline(prepared, 0.0):
            return None
        return self._call(prepared, 0.0)

    @staticmethod
    def _replayed_after(prepared: Valid, claim: Claim) -> bool:
        """An operator replayed a command that did not end accepted: it may go out again."""
        if claim.outcome is None or replay_generation(prepared.delivery.headers) == 0:
            return False
        stored = json.loads(claim.outcome)
        return bool(stored["id"] != prepared.event_id and stored["data"]["status"] != "accepted")

    def _duplicate(self, prepared: Valid, outcome: bytes) -> Finish:
        """Answer a command already done with its recorded outcome, marked duplicate."""
        data = _stored_data(outcome)
        error = ErrorInfo.model_validate(data["error"]) if data.get("error") else None
        return Finish(
            as_duplicate(outcome),
            Status(data["status"]),
            prepared.command_id,
            error,
            int(data["attempts"]),
            duplicate=True,
        )

    def _deadline(self, prepared: Valid, first_seen: float) -> float:
        """``expires_at``, else COMMAND_TTL after it was issued (or first seen)."""
        if prepared.expires is not None:
            return prepared.expires
        issued = prepared.issued
        return (first_seen if issued is None else issued) + self._policy.command_ttl_s

    @staticmethod
    def _call(prepared: Valid, first_seen: float) -> CallRef:
        """The call and this command's place in its issue order (SPEC §5)."""
        issued = prepared.issued
        return CallRef(prepared.call_key, first_seen if issued is None else issued)

    def _send(
        self, prepared: Valid, claim: Claim, token: str, now: float, sent: Send | None = None
    ) -> Decision:
        deadline = self._deadline(prepared, claim.first_seen)
        if now >= deadline:
            return self._record(
                prepared,
                token,
                Status.EXPIRED,
                ErrorCode.EXPIRED,
                "the deadline passed before the command could be sent",
                claim.attempts,
            )
        attempt = _Attempt(self, prepared, token, self._call(prepared, claim.first_seen))
        attempt.attempts = claim.attempts
        attempt.deadline = deadline
        attempt.sent = sent
        try:
            status_code = self._attempts(attempt, deadline)
        except _Stopped as stop:
            return self._stopped(prepared, token, stop, attempt.attempts)
        except PabxPermanentError as exc:
            status = Status.REJECTED if isinstance(exc, PabxBadRequest) else Status.FAILED
            return self._record(
                prepared,
                token,
                status,
                exc.code,
                str(exc),
                attempt.attempts,
                exc.status_code,
                hold_call_s=self._hold_after(attempt),
            )
        except PabxOutcomeUnknown as exc:
            if self._policy.retry_ambiguous:
                return self._after_transient(
                    prepared, token, exc, attempt.attempts, deadline, self._hold_after(attempt)
                )
            return self._record(
                prepared,
                token,
                Status.FAILED,
                exc.code,
                f"{exc}: the PABX may have carried it out; not resent (RETRY_AMBIGUOUS is off)",
                attempt.attempts,
                exc.status_code,
                hold_call_s=self._hold_after(attempt),
            )
        except (PabxTransientError, RetryError) as exc:
            return self._after_transient(
                prepared, token, exc, attempt.attempts, deadline, self._hold_after(attempt)
            )
        return self._record(
            prepared, token, Status.ACCEPTED, None, None, attempt.attempts, status_code
        )

    def _hold_after(self, attempt: _Attempt) -> float:
        """How long the command keeps its call once done: see :attr:`Policy.unanswered_hold_s`."""
        return self._policy.unanswered_hold_s if attempt.unanswered else 0.0

    def _attempts(self, attempt: _Attempt, deadline: float) -> int:
        """The request, sent again in process (tenacity) while that can help: at most
        IN_PROCESS_ATTEMPTS in all, the last one starting before the deadline.

        The first goes out directly; tenacity comes in only after a failure worth another
        try, its first call raising that failure again, so that its stop, wait and retry
        rules apply as if it had made the first request itself."""
        try:
            return attempt()
        except Exception as exc:
            if self._policy.in_process_attempts < 2 or not self._worth_resending(exc):
                raise
            first: BaseException | None = exc

        def again() -> int:
            nonlocal first
            if first is not None:
                failure, first = first, None
                raise failure
            return attempt()

        retrying = Retrying(
            stop=stop_after_attempt(self._policy.in_process_attempts)
            | stop_before_delay(max(deadline - self._clock(), 0.0)),
            wait=wait_random_exponential(multiplier=0.1, max=self._policy.in_process_max_wait_s),
            retry=retry_if_exception(self._worth_resending),
            reraise=True,
        )
        return retrying(again)

    def _worth_resending(self, exc: BaseException) -> bool:
        """In-process retries: what was not sent, and ambiguous failures when opted in."""
        if isinstance(exc, CircuitOpen):
            return False  # the breaker will not close within the in-process budget
        if isinstance(exc, PabxUnreachable):
            return True
        return isinstance(exc, PabxOutcomeUnknown) and self._policy.retry_ambiguous

    def _stopped(self, prepared: Valid, token: str, stop: _Stopped, attempts: int) -> Decision:
        """A reason not to send found before the request went out."""
        command_id = prepared.command_id
        match stop:
            case _LeaseLost():
                # Another worker took the command over (or finished it): it is theirs now.
                # Come back later through the broker and replay whatever they recorded.
                log.warning("lease lost before sending", extra={"command_id": command_id})
                return Retry(self._policy.retry_delays_s[0], attempts, command_id)
            case _Superseded(newer=newer):
                return self._record(
                    prepared,
                    token,
                    Status.REJECTED,
                    ErrorCode.SUPERSEDED,
                    f"a newer command for this call was already sent: {newer}",
                    attempts,
                    park=False,
                )
            case _PastDeadline(reason=reason):
                return self._record(
                    prepared, token, Status.EXPIRED, ErrorCode.EXPIRED, reason, attempts
                )
            case _CallBusy(until=until):
                self._durably(lambda: self._store.release(command_id, token, now=self._clock()))
                delay = max(until - self._clock(), self._policy.retry_delays_s[0])
                return Retry(delay, attempts, command_id)
        raise TypeError(f"unhandled stop {stop!r}")  # pragma: no cover

    def _call_pabx(self, target_name: str, channel_id: int, body: dict[str, str]) -> int:
        breaker = self.breakers[target_name]
        try:
            status_code = self._pabx.redirect(self._targets[target_name], channel_id, body)
        except PabxTransientError:
            breaker.failure()
            raise
        except PabxPermanentError:
            breaker.success()  # it answered: it is up
            raise
        breaker.success()
        return status_code

    def _after_transient(
        self,
        prepared: Valid,
        token: str,
        exc: BaseException,
        attempts: int,
        deadline: float,
        hold_call_s: float = 0.0,
    ) -> Decision:
        command_id = prepared.command_id
        error = exc if isinstance(exc, PabxError) else PabxUnreachable(str(exc))
        if attempts >= self._policy.max_attempts:
            return self._record(
                prepared,
                token,
                Status.FAILED,
                error.code,
                f"{error} (after {attempts} attempts)",
                attempts,
                error.status_code,
                hold_call_s=hold_call_s,
            )
        now = self._clock()
        if now >= deadline:  # expired only once the deadline has really passed
            return self._record(
                prepared,
                token,
                Status.EXPIRED,
                ErrorCode.EXPIRED,
                f"the deadline passed while the PABX failed: {error}",
                attempts,
                error.status_code,
                hold_call_s=hold_call_s,
            )
        retries = header_count(prepared.delivery.headers, hdr.RETRIES)
        steps = self._policy.retry_delays_s
        delay = steps[min(retries, len(steps) - 1)]
        if delay > deadline - now:  # come back by the deadline, not a whole step past it
            delay = max((step for step in steps if step <= deadline - now), default=steps[0])
        self._durably(
            lambda: self._store.release(
                command_id, token, now=self._clock(), hold_call_s=hold_call_s
            )
        )
        log.info(
            "pabx transient failure, retrying through the broker",
            extra={
                "command_id": command_id,
                "attempt": attempts,
                "delay_s": delay,
                "error": str(error),
            },
        )
        return Retry(delay, attempts, command_id)

    def _vendor_body(self, command: RedirectCommand) -> dict[str, str]:
        body = command.redirect.model_dump(exclude_none=True)
        body.setdefault("SENHA_DISPOSITIVO", self._passwords.get(command.redirect.DISPOSITIVO))
        return body

    def _record(
        self,
        prepared: Valid,
        token: str,
        status: Status,
        code: ErrorCode | None,
        message: str | None,
        attempts: int,
        status_code: int | None = None,
        *,
        park: bool | None = None,
        hold_call_s: float = 0.0,
    ) -> Decision:
        command_id = prepared.command_id
        decision = self._finish(prepared, status, code, message, attempts, status_code, park=park)
        event = decision.event
        stored = self._durably(
            lambda: self._store.record(
                command_id, token, event, now=self._clock(), hold_call_s=hold_call_s
            )
        )
        if stored is None:  # our lease was taken over: the new holder's outcome will stand
            log.warning("lease lost before recording", extra={"command_id": command_id})
            return Retry(self._policy.retry_delays_s[0], attempts, command_id)
        if stored != event:  # another worker finished first: its outcome stands
            return self._duplicate(prepared, stored)
        return decision

    def _finish(
        self,
        prepared: Prepared,
        status: Status,
        code: ErrorCode | None,
        message: str | None,
        attempts: int = 0,
        status_code: int | None = None,
        *,
        park: bool | None = None,
    ) -> Finish:
        error = ErrorInfo(code=code, message=message or code.value) if code else None
        pabx = None
        if prepared.command is not None and (attempts or status_code):
            pabx = PabxInfo(name=prepared.command.pabx, status_code=status_code)
        trace = self._tracing.current()
        event = build_event(
            event_id=prepared.event_id,
            traceparent=trace.get("traceparent"),
            status=status,
            command_id=prepared.command_id,
            attempts=attempts,
            command=prepared.command,
            pabx=pabx,
            error=error,
            delivery=prepared.delivery,
            source=self._policy.event_source,
        )
        return Finish(
            encode(event),
            status,
            prepared.command_id,
            error,
            attempts,
            park=status in (Status.REJECTED, Status.FAILED) if park is None else park,
            trace=trace,
        )


class _Attempt:
    """One PABX request of a command, as tenacity calls it: check, pace, mark, send."""

    def __init__(self, processor: Processor, prepared: Valid, token: str, call: CallRef) -> None:
        command = prepared.command
        self.p = processor
        self.command_id = prepared.command_id
        self.target_name = command.pabx
        self.channel_id = command.channel_id or processor._targets[command.pabx].channel_id
        self.body = processor._vendor_body(command)
        self.token = token
        self.call = call
        self.attempts = 0
        self.deadline = 0.0
        #: The first request's mark, when the claim made it (no rate limit to wait for).
        self.sent: Send | None = None
        #: A request went out and no answer came: the PABX may still be carrying it out.
        self.unanswered = False

    def __call__(self) -> int:
        p = self.p
        if not p.breakers[self.target_name].allow():
            raise CircuitOpen("not sent: the PABX target's circuit breaker is open")
        with self._probe_returned_unless_sent():
            if self.sent is None:
                self._wait_for_slot()
            self._mark_sent()
            if p._clock() >= self.deadline:  # a store step may have waited out the deadline
                raise _PastDeadline("the deadline passed before the request could go out")
        try:
            return p._call_pabx(self.target_name, self.channel_id, self.body)
        except PabxOutcomeUnknown as exc:
            self.unanswered = self.unanswered or exc.status_code is None
            raise

    @contextmanager
    def _probe_returned_unless_sent(self) -> Iterator[None]:
        try:
            yield
        except _Stopped:
            self.p.breakers[self.target_name].abandon()
            raise

    def _wait_for_slot(self) -> None:
        """The fleet-wide rate limit: before the command is marked sent (SPEC §5)."""
        p = self.p
        wait = p._durably(lambda: p._pace.reserve(self.target_name))
        left = self.deadline - p._clock()
        if wait >= left:  # no slot in time: it expires at its deadline, not before
            p._pace.wait(left)
            raise _PastDeadline(
                f"the rate limit of PABX {self.target_name!r} has no slot before the deadline"
            )
        p._pace.wait(wait)

    def _mark_sent(self) -> None:
        """Count the request in the store, holding the call; wait while another command has it."""
        p = self.p
        pause = CALL_POLL_S[0]
        # Another worker's request is bounded by request_s; wait about that long in process.
        give_up_at = p._clock() + p._policy.request_s + 1.0
        while True:
            sent, self.sent = self.sent, None  # marked with the claim: the first time only
            if sent is None:
                sent = p._durably(
                    lambda: p._store.mark_sent(
                        self.command_id,
                        self.token,
                        self.call,
                        now=p._clock(),
                        lease_s=p._policy.lease_s,
                    )
                )
            now = p._clock()
            match sent.state:
                case SendState.SENT:
                    self.attempts = sent.attempts
                    return
                case SendState.LEASE_LOST:
                    raise _LeaseLost()
                case SendState.SUPERSEDED:
                    raise _Superseded(sent.newer or "?")
            until = sent.busy_until or now
            if now >= self.deadline:
                raise _PastDeadline("the deadline passed while another command held the call")
            if now >= give_up_at:
                raise _CallBusy(until)
            p._sleep(min(pause, max(self.deadline - now, 0.0)))
            pause = min(pause * 2, CALL_POLL_S[1])


class _Stopped(Exception):
    """Not sent, for a reason found before the request went out."""


class _LeaseLost(_Stopped):
    """The claim was taken over before the PABX call: do not send."""


class _Superseded(_Stopped):
    def __init__(self, newer: str) -> None:
        super().__init__(newer)
        self.newer = newer

    __match_args__ = ("newer",)


class _PastDeadline(_Stopped):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    __match_args__ = ("reason",)


class _CallBusy(_Stopped):
    def __init__(self, until: float) -> None:
        super().__init__(until)
        self.until = until

    __match_args__ = ("until",)


def _known(command_id: str | None) -> str:
    """A command id the caller has already checked is there."""
    if command_id is None:
        raise InvalidCommand("command_id: missing")
    return command_id


class _Ending(NamedTuple):
    """An outcome's status, error code and message, before it is built."""

    status: Status
    code: ErrorCode
    message: str


def _poison(prepared: Prepared, delivery_limit: int) -> _Ending | None:
    """The outcome of a delivery at the delivery limit, or None if it is not there yet."""
    count = prepared.delivery.delivery_count + 1
    if count < delivery_limit:
        return None
    message = f"delivered {count} times without an outcome: parked, not processed again"
    return _Ending(Status.FAILED, ErrorCode.POISON_MESSAGE, message)


def _describe_span(span: Span, prepared: Prepared, decision: Decision) -> None:
    """The command span's attributes (SPEC §8): ids, target, status, attempts, duplicate."""
    command = prepared.command
    attributes: dict[str, Any] = {
        "pabx.command_id": prepared.command_id,
        "pabx.call_id": command.redirect.ID_CHAMADA if command else None,
        "pabx.target": command.pabx if command else None,
    }
    match decision:
        case Finish():
            attributes["pabx.status"] = decision.status.value
            attributes["pabx.attempts"] = decision.attempts
            attributes["pabx.duplicate"] = decision.duplicate
            if decision.error is not None and decision.status is not Status.ACCEPTED:
                span.fail(decision.error.code.value)
        case Retry():
            attributes["pabx.status"] = "retry"
            attributes["pabx.attempts"] = decision.attempts
        case Requeue():
            attributes["pabx.status"] = "requeue"
    span.set(attributes)


def _stored_data(outcome: bytes) -> dict[str, Any]:
    data = json.loads(outcome)["data"]
    if not isinstance(data, dict):
        raise ValueError("a stored outcome without a data object")
    return data
