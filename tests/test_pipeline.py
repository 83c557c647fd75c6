"""The path of one command through Processor, on the fake PABX and the memory store."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from worker.adapters.store.base import CallRef, Send, SendState
from worker.adapters.store.memory import MemoryStore
from worker.consume.circuit import CircuitBreaker, CircuitState
from worker.consume.pipeline import Decision, Finish, Policy, Processor, Requeue, Retry
from worker.contract.errors import PabxOutcomeUnknown, PabxUnreachable, StoreError
from worker.contract.messages import Delivery
from worker.contract.models import OutcomeEvent, Status
from worker.contract.settings import PabxTarget, Settings
from worker.tools.fakes import FakePabx

TARGET = PabxTarget(url="http://pabx.invalid", api_key="k", channel_id=17)
NOW = 1_800_000_000.0


def command(**changes: Any) -> dict[str, Any]:
    redirect = {
        "DISPOSITIVO": "1125000",
        "SENHA_DISPOSITIVO": "4567",
        "DISPOSITIVO_DESTINO": "1132000",
        "ID_CHAMADA": "08/07/24 10:46:19 010A 0974/00",
        "PRIORIDADE": 0,
        "DADOS": "111222333-44;Fulano",
    }
    redirect.update(changes.pop("redirect", {}))
    return {
        "command_id": "cmd-1",
        "type": "redirect",
        "version": 1,
        "redirect": redirect,
        **changes,
    }


def delivery(body: Any = None, **props: Any) -> Delivery:
    raw = body if isinstance(body, bytes) else json.dumps(body or command()).encode()
    return Delivery(body=raw, **props)


class Clock:
    def __init__(self) -> None:
        self.now = NOW
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(
    pabx: FakePabx,
    clock: Clock,
    store: MemoryStore | None = None,
    targets: dict[str, PabxTarget] | None = None,
    **policy: Any,
) -> Processor:
    return Processor(
        pabx=pabx,
        store=store or MemoryStore(clock=clock),
        targets=targets or {"default": TARGET},
        policy=Policy(in_process_max_wait_s=0.01, **policy),
        passwords={"7000": "secret-from-file"},
        clock=clock,
        sleep=clock.sleep,
    )


def run(processor: Processor, d: Delivery) -> Decision:
    return processor.execute(processor.prepare(d))


def event(decision: Decision) -> OutcomeEvent:
    assert isinstance(decision, Finish), decision
    return OutcomeEvent.model_validate_json(decision.event)


def test_valid_command_is_sent_once_with_the_vendor_body_and_accepted(clock: Clock) -> None:
    pabx = FakePabx()
    decision = run(make(pabx, clock), delivery())
    assert isinstance(decision, Finish) and decision.status is Status.ACCEPTED
    assert len(pabx.requests) == 1
    sent = pabx.requests[0]
    assert sent.channel_id == 17
    assert sent.body["PRIORIDADE"] == "0"  # integers reach the PABX as strings
    assert sent.body["SENHA_DISPOSITIVO"] == "4567"
    outcome = event(decision)
    assert outcome.type == "pabx.redirect.accepted"
    assert outcome.data.attempts == 1 and outcome.data.duplicate is False
    assert outcome.data.pabx is not None and outcome.data.pabx.status_code == 200
    assert "4567" not in decision.event.decode()  # type: ignore[union-attr]
    assert not decision.park


def test_channel_id_of_the_command_wins_over_the_target(clock: Clock) -> None:
    pabx = FakePabx()
    run(make(pabx, clock), delivery(command(channel_id=99)))
    assert pabx.requests[0].channel_id == 99


@pytest.mark.parametrize(
    ("status", "expected", "code"),
    [
        (400, Status.REJECTED, "pabx_bad_request"),
        (401, Status.FAILED, "pabx_unauthorized"),
        (403, Status.FAILED, "pabx_forbidden"),
        (404, Status.FAILED, "pabx_error"),
    ],
)
def test_permanent_answers_are_not_retried(
    clock: Clock, status: int, expected: Status, code: str
) -> None:
    pabx = FakePabx([status])
    decision = run(make(pabx, clock), delivery())
    assert len(pabx.requests) == 1
    assert decision.status is expected and decision.park
    assert decision.error is not None and decision.error.code == code
    assert event(decision).data.pabx.status_code == status  # type: ignore[union-attr]


def test_transient_answers_are_retried_in_process(clock: Clock) -> None:
    pabx = FakePabx([503, 503])
    decision = run(make(pabx, clock), delivery())
    assert decision.status is Status.ACCEPTED
    assert len(pabx.requests) == 3 and event(decision).data.attempts == 3


def test_transient_failures_past_the_in_process_budget_go_to_a_retry_queue(clock: Clock) -> None:
    store = MemoryStore()
    pabx = FakePabx([PabxUnreachable("down")] * 3)
    processor = make(pabx, clock, store)
    decision = run(processor, delivery())
    assert isinstance(decision, Retry) and decision.attempts == 3
    assert decision.delay_s == 1.0
    # back from the retry queue: the release let it be claimed again, attempts carried on
    again = run(processor, delivery(headers={"x-pabx-retries": 1}))
    assert again.status is Status.ACCEPTED and event(again).data.attempts == 4


def test_attempt_budget_exhausted_fails_the_command(clock: Clock) -> None:
    pabx = FakePabx([503] * 3)
    decision = run(make(pabx, clock, max_attempts=3), delivery())
    assert decision.status is Status.FAILED and decision.park
    assert decision.error is not None and decision.error.code == "pabx_unreachable"
    assert event(decision).data.attempts == 3 == len(pabx.requests)


def test_retry_near_the_deadline_comes_back_and_expires_only_after_it(clock: Clock) -> None:
    expires = datetime.fromtimestamp(NOW + 0.5, UTC).isoformat()
    pabx = FakePabx([503] * 3)
    processor = make(pabx, clock)
    decision = run(processor, delivery(command(expires_at=expires)))
    assert isinstance(decision, Retry)
    clock.now += decision.delay_s  # back from the retry queue, past the deadline
    again = run(processor, delivery(command(expires_at=expires), headers={"x-pabx-retries": 1}))
    assert again.status is Status.EXPIRED and not again.park and len(pabx.requests) == 3


def test_deadline_passing_during_a_store_wait_means_no_request(clock: Clock) -> None:
    class SlowStore(MemoryStore):
        def mark_sent(self, *args: Any, **kwargs: Any) -> Send:
            sent = super().mark_sent(*args, **kwargs)
            clock.now += 60  # the store answered a minute late
            return sent

    pabx = FakePabx()
    expires = datetime.fromtimestamp(NOW + 30, UTC).isoformat()
    decision = run(make(pabx, clock, SlowStore(clock=clock)), delivery(command(expires_at=expires)))
    assert decision.status is Status.EXPIRED and pabx.requests == []


def test_past_deadline_is_expired_without_calling_the_pabx(clock: Clock) -> None:
    pabx = FakePabx()
    expires = datetime.fromtimestamp(NOW - 1, UTC).isoformat()
    decision = run(make(pabx, clock), delivery(command(expires_at=expires)))
    assert decision.status is Status.EXPIRED and pabx.requests == []


@pytest.mark.parametrize("source", ["issued_at", "timestamp", "first_seen"])
def test_deadline_falls_back_to_ttl(clock: Clock, source: str) -> None:
    pabx = FakePabx()
    old = datetime.fromtimestamp(NOW - 200, UTC)
    store = MemoryStore()
    if source == "issued_at":
        d = delivery(command(issued_at=old.isoformat()))
    elif source == "timestamp":
        d = delivery(timestamp=old)
    else:
        store.claim(
            "cmd-1", make(pabx, clock).prepare(delivery()).fingerprint, now=NOW - 200, lease_s=1
        )
        d = delivery()
    decision = run(make(pabx, clock, store, command_ttl_s=120), d)
    assert decision.status is Status.EXPIRED and pabx.requests == []


def test_same_command_again_replays_the_stored_outcome(clock: Clock) -> None:
    pabx = FakePabx()
    processor = make(pabx, clock)
    first = run(processor, delivery())
    later = command(issued_at=datetime.now(UTC).isoformat())  # new timestamp: still a duplicate
    second = run(processor, delivery(later))
    assert len(pabx.requests) == 1
    assert second.duplicate and second.status is Status.ACCEPTED and not second.park
    assert event(second).id == event(first).id and event(second).data.duplicate is True


def test_same_id_other_body_is_a_conflict(clock: Clock) -> None:
    pabx = FakePabx()
    processor = make(pabx, clock)
    run(processor, delivery())
    decision = run(processor, delivery(command(redirect={"DISPOSITIVO_DESTINO": "1"})))
    assert len(pabx.requests) == 1
    assert decision.status is Status.REJECTED and decision.park
    assert decision.error is not None and decision.error.code == "idempotency_conflict"


def test_command_in_flight_elsewhere_waits_in_a_retry_queue(clock: Clock) -> None:
    store = MemoryStore()
    pabx = FakePabx()
    processor = make(pabx, clock, store)
    prepared = processor.prepare(delivery())
    store.claim("cmd-1", prepared.fingerprint, now=NOW, lease_s=30)
    decision = processor.execute(prepared)
    assert isinstance(decision, Retry) and decision.delay_s == 30
    assert pabx.requests == []


def test_lapsed_lease_after_a_send_is_taken_over_and_counts_attempts(clock: Clock) -> None:
    store = MemoryStore()
    pabx = FakePabx()
    processor = make(pabx, clock, store)
    prepared = processor.prepare(delivery())
    claim = store.claim("cmd-1", prepared.fingerprint, now=NOW - 100, lease_s=30)
    assert claim.token is not None
    sent = store.mark_sent("cmd-1", claim.token, None, now=NOW - 100, lease_s=30)
    assert sent.attempts == 1  # then the worker died
    decision = processor.execute(prepared)
    assert decision.status is Status.ACCEPTED and event(decision).data.attempts == 2


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "not JSON"),
        (json.dumps(command(redirect={"PRIORIDADE": 20})).encode(), "PRIORIDADE"),
        (json.dumps(command(redirect={"PRIORIDAD": "1"})).encode(), "PRIORIDAD"),
        (json.dumps(command(pabx="nowhere")).encode(), "nowhere"),
        (json.dumps(command(redirect={"SENHA_DISPOSITIVO": None})).encode(), "SENHA_DISPOSITIVO"),
    ],
)
def test_invalid_commands_are_rejected_and_parked(clock: Clock, body: bytes, fragment: str) -> None:
    pabx = FakePabx()
    decision = run(make(pabx, clock), delivery(body, message_id="m-1"))
    assert decision.status is Status.REJECTED and decision.park and pabx.requests == []
    assert decision.error is not None and decision.error.code == "invalid_command"
    assert fragment in decision.error.message


def test_garbage_without_any_id_is_correlated_by_amqp_properties(clock: Clock) -> None:
    decision = run(make(FakePabx(), clock), delivery(b"\xff\xfe", correlation_id="corr-9"))
    data = event(decision).data
    assert data.command_id is None and data.amqp is not None
    assert data.amqp.correlation_id == "corr-9"
    again = run(make(FakePabx(), clock), delivery(b"\xff\xfe", correlation_id="corr-9"))
    assert event(again).id == event(decision).id  # deterministic for the same bytes


def test_event_without_a_command_id_leaves_subject_out_rather_than_null(clock: Clock) -> None:
    decision = run(make(FakePabx(), clock), delivery(b"\xff\xfe"))
    assert isinstance(decision, Finish)
    wire = json.loads(decision.event)
    assert "subject" not in wire
    assert wire["source"] == "pabx-worker"  # no target could be read


def test_source_names_the_site_then_the_target(clock: Clock) -> None:
    decision = run(make(FakePabx(), clock, event_source="pabx-worker/sp-dc1"), delivery())
    outcome = event(decision)
    assert outcome.source == "pabx-worker/sp-dc1/default"
    assert outcome.subject == outcome.data.command_id


def test_event_source_setting_reaches_the_policy() -> None:
    settings = Settings(event_source="urn:acme:pabx-worker:rj")
    assert Policy.from_settings(settings).event_source == "urn:acme:pabx-worker:rj"


@pytest.mark.parametrize("value", ["", "site a"])
def test_event_source_is_a_uri_reference_without_spaces(value: str) -> None:
    with pytest.raises(ValueError, match="event_source"):
        Settings(event_source=value)


def test_device_password_comes_from_the_device_file(clock: Clock) -> None:
    pabx = FakePabx()
    body = command(redirect={"DISPOSITIVO": "7000", "SENHA_DISPOSITIVO": None})
    body["redirect"].pop("SENHA_DISPOSITIVO")
    decision = run(make(pabx, clock), delivery(body))
    assert decision.status is Status.ACCEPTED
    assert pabx.requests[0].body["SENHA_DISPOSITIVO"] == "secret-from-file"


def test_message_at_the_delivery_limit_is_parked_as_poison(clock: Clock) -> None:
    pabx = FakePabx()
    decision = run(make(pabx, clock, delivery_limit=5), delivery(delivery_count=4))
    assert decision.status is Status.FAILED and decision.park and pabx.requests == []
    assert decision.error is not None and decision.error.code == "poison_message"
    below = run(make(pabx, clock, delivery_limit=5), delivery(delivery_count=3))
    assert below.status is Status.ACCEPTED


def test_expired_outcome_is_recorded_so_a_resend_replays_it(clock: Clock) -> None:
    pabx = FakePabx()
    processor = make(pabx, clock)
    expires = datetime.fromtimestamp(NOW - 1, UTC).isoformat()
    first = run(processor, delivery(command(expires_at=expires)))
    fresh = (datetime.fromtimestamp(NOW, UTC) + timedelta(minutes=5)).isoformat()
    second = run(processor, delivery(command(expires_at=fresh)))
    assert second.duplicate and second.status is Status.EXPIRED
    assert event(second).id == event(first).id and pabx.requests == []


def test_lost_lease_means_no_request(clock: Clock) -> None:
    class StolenStore(MemoryStore):
        def mark_sent(self, *args: Any, **kwargs: Any) -> Send:
            return Send(SendState.LEASE_LOST)

    pabx = FakePabx()
    decision = run(make(pabx, clock, StolenStore()), delivery())
    assert isinstance(decision, Retry) and pabx.requests == []


def test_purge_drops_records_past_retention(clock: Clock) -> None:
    store = MemoryStore()
    processor = make(FakePabx(), clock, store)
    run(processor, delivery())
    assert processor.purge() == 0
    clock.now += 49 * 3600
    assert processor.purge() == 1


def test_poison_copy_of_a_finished_command_replays_its_outcome(clock: Clock) -> None:
    pabx = FakePabx()
    processor = make(pabx, clock, delivery_limit=5)
    first = run(processor, delivery())
    again = run(processor, delivery(delivery_count=4))
    assert again.duplicate and again.status is Status.ACCEPTED
    assert event(again).id == event(first).id and len(pabx.requests) == 1


def test_poison_outcome_is_recorded_for_later_copies(clock: Clock) -> None:
    pabx = FakePabx()
    processor = make(pabx, clock, delivery_limit=5)
    poisoned = run(processor, delivery(delivery_count=4))
    resent = run(processor, delivery())
    assert resent.duplicate and resent.status is Status.FAILED
    assert event(resent).id == event(poisoned).id and pabx.requests == []


def test_invalid_poison_message_fails_as_poison(clock: Clock) -> None:
    decision = run(make(FakePabx(), clock, delivery_limit=5), delivery(b"{", delivery_count=4))
    assert decision.status is Status.FAILED
    assert decision.error is not None and decision.error.code == "poison_message"


def test_replayed_failed_command_is_sent_again_under_a_new_event_id(clock: Clock) -> None:
    pabx = FakePabx([403])
    processor = make(pabx, clock)
    failed = run(processor, delivery())
    assert failed.status is Status.FAILED
    replayed = run(processor, delivery(headers={"x-pabx-replay": 1}))
    assert replayed.status is Status.ACCEPTED and not replayed.duplicate
    assert event(replayed).id != event(failed).id and event(replayed).data.attempts == 2
    again = run(processor, delivery(headers={"x-pabx-replay": 1}))  # a redelivered replay
    assert again.duplicate and event(again).id == event(replayed).id
    assert len(pabx.requests) == 2


def test_replaying_an_accepted_command_never_sends_it_again(clock: Clock) -> None:
    pabx = FakePabx()
    processor = make(pabx, clock)
    accepted = run(processor, delivery())
    replayed = run(processor, delivery(headers={"x-pabx-replay": 1}))
    assert replayed.duplicate and event(replayed).id == event(accepted).id
    assert len(pabx.requests) == 1


# -- SPEC §5: what is resent, order per call, fencing, pacing, breakers ----------------


@pytest.mark.parametrize(
    "answer", [500, 502, 504, PabxOutcomeUnknown("PABX read timed out: ReadTimeoutError")]
)
def test_ambiguous_failure_is_not_resent_by_default(clock: Clock, answer: Any) -> None:
    pabx = FakePabx([answer, 200])
    decision = run(make(pabx, clock), delivery())
    assert len(pabx.requests) == 1
    assert decision.status is Status.FAILED and decision.park
    assert decision.error is not None and decision.error.code == "pabx_outcome_unknown"
    assert "RETRY_AMBIGUOUS" in decision.error.message
    assert event(decision).data.attempts == 1


def test_retry_ambiguous_resends_and_counts_every_request(clock: Clock) -> None:
    pabx = FakePabx([500, PabxOutcomeUnknown("reset")])
    decision = run(make(pabx, clock, retry_ambiguous=True), delivery())
    assert decision.status is Status.ACCEPTED
    assert len(pabx.requests) == 3 == event(decision).data.attempts


def test_not_sent_failures_are_resent_even_without_retry_ambiguous(clock: Clock) -> None:
    pabx = FakePabx([429, PabxUnreachable("refused")])
    decision = run(make(pabx, clock), delivery())
    assert decision.status is Status.ACCEPTED and len(pabx.requests) == 3


def _at(seconds: float) -> str:
    return datetime.fromtimestamp(NOW + seconds, UTC).isoformat()


def test_older_command_for_a_call_already_redirected_is_superseded(clock: Clock) -> None:
    pabx = FakePabx()
    processor = make(pabx, clock)
    newer = run(processor, delivery(command(command_id="new", issued_at=_at(-1))))
    older = run(processor, delivery(command(command_id="old", issued_at=_at(-2))))
    assert newer.status is Status.ACCEPTED and len(pabx.requests) == 1
    assert older.status is Status.REJECTED and not older.park
    assert older.error is not None and older.error.code == "superseded"
    assert "new" in older.error.message
    again = run(processor, delivery(command(command_id="old", issued_at=_at(-2))))
    assert again.duplicate and event(again).id == event(older).id


def test_commands_for_other_calls_or_targets_are_not_superseded(clock: Clock) -> None:
    pabx = FakePabx()
    other = PabxTarget(url="http://other.invalid", api_key="k", channel_id=1)
    processor = make(pabx, clock, targets={"default": TARGET, "b": other})
    run(processor, delivery(command(command_id="new", issued_at=_at(-1))))
    call = command(command_id="c2", issued_at=_at(-2), redirect={"ID_CHAMADA": "other"})
    target = command(command_id="c3", issued_at=_at(-2), pabx="b")
    assert run(processor, delivery(call)).status is Status.ACCEPTED
    assert run(processor, delivery(target)).status is Status.ACCEPTED


def test_call_held_by_another_worker_waits_then_goes_through_the_broker(clock: Clock) -> None:
    store = MemoryStore(clock=clock)
    pabx = FakePabx()
    processor = make(pabx, clock, store, request_s=2.0)
    holder = processor.prepare(delivery(command(command_id="holder", issued_at=_at(-5))))
    claim = store.claim("holder", holder.fingerprint, now=NOW, lease_s=30)
    call = CallRef(holder.call_key or "", NOW - 5)
    assert store.mark_sent("holder", claim.token or "", call, now=NOW, lease_s=30).attempts == 1
    decision = run(processor, delivery(command(issued_at=_at(-1))))
    assert isinstance(decision, Retry) and pabx.requests == []
    assert decision.delay_s >= 1.0 and sum(clock.slept) >= 2.0  # waited in process first
    store.record("holder", claim.token or "", b"{}", now=clock())
    assert run(processor, delivery(command(issued_at=_at(-1)))).status is Status.ACCEPTED


@pytest.mark.parametrize(
    ("answer", "retry_ambiguous", "held_s"),
    [
        (PabxOutcomeUnknown("PABX timed out after the request was sent"), False, 4.0),
        (PabxOutcomeUnknown("PABX connection lost after the request was sent"), True, 4.0),
        (500, False, 0.0),  # answered: the PABX is done with it
        (503, False, 0.0),
    ],
)
def test_a_call_stays_held_after_a_request_that_got_no_answer(
    clock: Clock, answer: Any, retry_ambiguous: bool, held_s: float
) -> None:
    """The PABX may still be carrying out an unanswered request: the next command for
    the call waits the read timeout again, so the two never overlap at the PABX."""
    store = MemoryStore(clock=clock)
    answers = [answer] * (3 if retry_ambiguous or answer == 503 else 1)
    processor = make(
        FakePabx(answers), clock, store, unanswered_hold_s=4.0, retry_ambiguous=retry_ambiguous
    )
    first = run(processor, delivery(command(command_id="first", issued_at=_at(-2))))
    assert isinstance(first, Retry) or first.status is Status.FAILED
    done_at = clock()
    newer = processor.prepare(delivery(command(command_id="newer", issued_at=_at(-1))))
    claim = store.claim("newer", newer.fingerprint, now=done_at, lease_s=30)
    sent = store.mark_sent(
        "newer", claim.token or "", CallRef(newer.call_key or "", NOW - 1), now=done_at, lease_s=30
    )
    if held_s:
        assert sent == Send(SendState.CALL_BUSY, busy_until=done_at + held_s)
    else:
        assert sent.state is SendState.SENT


def test_outcome_is_not_recorded_by_a_worker_that_lost_its_lease(clock: Clock) -> None:
    class TakenOver(MemoryStore):
        def record(self, *args: Any, **kwargs: Any) -> bytes | None:
            return None

    pabx = FakePabx()
    decision = run(make(pabx, clock, TakenOver(clock=clock)), delivery())
    assert isinstance(decision, Retry)


def test_rate_limit_slot_is_waited_for_before_the_command_is_marked_sent(clock: Clock) -> None:
    steps: list[str] = []

    class Watched(MemoryStore):
        def reserve_slot(self, target: str, *, interval_s: float) -> float:
            steps.append("slot")
            return super().reserve_slot(target, interval_s=interval_s)

        def mark_sent(self, *args: Any, **kwargs: Any) -> Send:
            steps.append(f"mark after {sum(clock.slept):.1f}s")
            return super().mark_sent(*args, **kwargs)

    paced = TARGET.model_copy(update={"rate_limit": 2.0})
    processor = make(FakePabx(), clock, Watched(clock=clock), targets={"default": paced})
    for n in range(3):
        decision = run(processor, delivery(command(command_id=f"c{n}", issued_at=_at(n))))
        assert decision.status is Status.ACCEPTED
    assert steps == [
        "slot",
        "mark after 0.0s",
        "slot",
        "mark after 0.5s",
        "slot",
        "mark after 1.0s",
    ]


def test_rate_limit_slot_past_the_deadline_expires_without_a_request(clock: Clock) -> None:
    store = MemoryStore(clock=clock)
    paced = TARGET.model_copy(update={"rate_limit": 0.1})
    store.reserve_slot("default", interval_s=60)  # the next slot is a minute away
    pabx = FakePabx()
    decision = run(
        make(pabx, clock, store, targets={"default": paced}), delivery(command(expires_at=_at(30)))
    )
    assert decision.status is Status.EXPIRED and pabx.requests == []
    assert decision.error is not None and "rate limit" in decision.error.message


def test_one_target_down_does_not_stop_the_other(clock: Clock) -> None:
    down = PabxTarget(url="http://down.invalid", api_key="k", channel_id=1, name="a")
    up = PabxTarget(url="http://up.invalid", api_key="k", channel_id=1, name="b")

    class Pabx(FakePabx):
        def redirect(self, target: PabxTarget, channel_id: int, body: Any) -> int:
            if target.name == "a":
                raise PabxUnreachable("refused")
            return super().redirect(target, channel_id, body)

    pabx = Pabx()
    processor = Processor(
        pabx=pabx,
        store=MemoryStore(clock=clock),
        targets={"a": down, "b": up},
        policy=Policy(in_process_max_wait_s=0.01),
        breakers={"a": CircuitBreaker(threshold=2, reset_s=60, clock=clock)},
        clock=clock,
        sleep=clock.sleep,
    )
    first = run(processor, delivery(command(command_id="a1", pabx="a")))
    assert isinstance(first, Retry)
    assert processor.breakers["a"].state is CircuitState.OPEN
    held = run(processor, delivery(command(command_id="a2", pabx="a")))
    assert isinstance(held, Retry) and held.attempts == 0  # not sent: circuit open
    for n in range(3):
        assert run(processor, delivery(command(command_id=f"b{n}", pabx="b"))).status is (
            Status.ACCEPTED
        )
    assert processor.breakers["b"].state is CircuitState.CLOSED


def test_store_outage_after_the_send_waits_and_records_without_resending(clock: Clock) -> None:
    class Flaky(MemoryStore):
        failures = 2

        def record(self, *args: Any, **kwargs: Any) -> bytes | None:
            if self.failures:
                self.failures -= 1
                raise StoreError("down")
            return super().record(*args, **kwargs)

    pabx = FakePabx()
    processor = make(pabx, clock, Flaky(clock=clock))
    decision = run(processor, delivery())
    assert decision.status is Status.ACCEPTED and len(pabx.requests) == 1
    assert processor.store_breaker.state is CircuitState.CLOSED


def test_store_down_at_the_claim_holds_the_command_until_it_answers(clock: Clock) -> None:
    class Flaky(MemoryStore):
        failures = 2

        def claim(self, *args: Any, **kwargs: Any) -> Any:
            if self.failures:
                self.failures -= 1
                raise StoreError("down")
            return super().claim(*args, **kwargs)

    pabx = FakePabx()
    store = Flaky(clock=clock)
    processor = make(pabx, clock, store)
    decision = run(processor, delivery())
    assert isinstance(decision, Finish) and decision.status is Status.ACCEPTED
    assert store.failures == 0 and len(pabx.requests) == 1
    assert processor.store_breaker.state is CircuitState.CLOSED


def test_store_down_at_the_claim_while_stopping_gives_the_command_back(clock: Clock) -> None:
    class Down(MemoryStore):
        def claim(self, *args: Any, **kwargs: Any) -> Any:
            raise StoreError("down")

        def ping(self) -> None:
            raise StoreError("down")

    pabx = FakePabx()
    processor = make(pabx, clock, Down(clock=clock))
    processor.stopping.set()
    decision = run(processor, delivery())
    assert isinstance(decision, Requeue) and pabx.requests == []
    assert processor.store_breaker.state is not CircuitState.CLOSED


def test_a_poisoned_command_ends_even_while_the_store_is_down(clock: Clock) -> None:
    class Down(MemoryStore):
        def claim(self, *args: Any, **kwargs: Any) -> Any:
            raise StoreError("down")

    pabx = FakePabx()
    processor = make(pabx, clock, Down(clock=clock), delivery_limit=3)
    decision = run(processor, delivery(redelivered=True, delivery_count=2))
    assert isinstance(decision, Finish) and decision.status is Status.FAILED
    assert decision.error is not None and decision.error.code == "poison_message"
    assert pabx.requests == []


def test_an_unexpected_error_gives_the_command_back_instead_of_killing_the_thread(
    clock: Clock,
) -> None:
    class Broken(MemoryStore):
        def claim(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug")

    decision = run(make(FakePabx(), clock, Broken(clock=clock)), delivery())
    assert decision == Requeue("handling failed")


@pytest.mark.parametrize("user_id", [None, "intruder"])
def test_producer_not_listed_for_the_target_is_rejected_and_nothing_sent(
    clock: Clock, user_id: str | None
) -> None:
    guarded = TARGET.model_copy(update={"allowed_producers": ("crm", "esb")})
    pabx = FakePabx()
    processor = make(pabx, clock, targets={"default": guarded})
    refused = run(processor, delivery(user_id=user_id))
    assert refused.status is Status.REJECTED and refused.park and pabx.requests == []
    assert refused.error is not None and refused.error.code == "producer_not_allowed"
    allowed = run(processor, delivery(user_id="crm"))  # the id was not used up by the refusal
    assert allowed.status is Status.ACCEPTED and len(pabx.requests) == 1


def test_targets_without_a_producer_list_accept_anyone(clock: Clock) -> None:
    assert run(make(FakePabx(), clock), delivery(user_id="anyone")).status is Status.ACCEPTED


class _Steps(MemoryStore):
    """Records which store step marked each request sent."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock=clock)
        self.steps: list[str] = []

    def claim_and_send(self, *args: Any, **kwargs: Any) -> tuple[Any, Send | None]:
        self.steps.append("claim_and_send")
        return super().claim_and_send(*args, **kwargs)

    def claim(self, *args: Any, **kwargs: Any) -> Any:
        self.steps.append("claim")
        return super().claim(*args, **kwargs)

    def mark_sent(self, *args: Any, **kwargs: Any) -> Send:
        self.steps.append("mark_sent")
        return super().mark_sent(*args, **kwargs)


def test_claim_and_first_mark_are_one_store_step_when_nothing_comes_between(
    clock: Clock,
) -> None:
    store = _Steps(clock)
    pabx = FakePabx()
    decision = run(make(pabx, clock, store), delivery(command(issued_at=_at(-1))))
    assert isinstance(decision, Finish) and decision.status is Status.ACCEPTED
    assert event(decision).data.attempts == 1 and len(pabx.requests) == 1
    # claim_and_send runs claim + mark_sent (the memory store's two-call form) and no more.
    assert store.steps == ["claim_and_send", "claim", "mark_sent"]


@pytest.mark.parametrize(
    "why",
    ["rate limit", "no issue time", "half-open circuit", "past the deadline", "poisoned"],
)
def test_claim_stays_alone_when_something_comes_before_the_mark(clock: Clock, why: str) -> None:
    store = _Steps(clock)
    target, props, body = TARGET, {}, command(issued_at=_at(-1))
    if why == "rate limit":
        target = TARGET.model_copy(update={"rate_limit": 5.0})
    elif why == "no issue time":
        body = command()
    elif why == "past the deadline":
        body = command(issued_at=_at(-1), expires_at=_at(-0.5))
    elif why == "poisoned":
        props = {"delivery_count": 50}
    processor = make(FakePabx(), clock, store, targets={"default": target})
    if why == "half-open circuit":
        breaker = CircuitBreaker(threshold=1, reset_s=1.0, clock=clock)
        breaker.failure()
        clock.now += 2  # open → half-open after reset_s
        assert breaker.state is CircuitState.HALF_OPEN
        processor.breakers["default"] = breaker
    run(processor, delivery(body, **props))
    assert "claim_and_send" not in store.steps and store.steps[0] == "claim"
