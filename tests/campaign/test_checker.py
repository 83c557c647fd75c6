"""The checker catches each SPEC §5 violation in a hand-built history; a clean one passes."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from tests.campaign.checker import Report, check
from tests.campaign.history import (
    Config,
    Event,
    Fault,
    History,
    HistoryError,
    Outcome,
    Publish,
    Request,
    TargetConfig,
    append,
    load,
)

E = TypeVar("E", Publish, Request, Outcome, Fault)
ROOT = Path(__file__).resolve().parents[2]
CONFIG = Config(
    t=99.0,
    seed=7,
    workers=2,
    concurrency=2,
    retry_ambiguous=False,
    command_ttl_s=30.0,
    targets={"a": TargetConfig(rate_limit=20.0), "b": TargetConfig(rate_limit=None)},
)


def pub(
    cid: str | None, t: float, order: float, *, call: str = "default:X", key: str = ""
) -> Publish:
    return Publish(
        t=t,
        key=key or f"k-{cid}-{t}",
        command_id=cid,
        call=call,
        pabx="default",
        order=order,
        deadline=order + 30.0,
        valid=cid is not None,
    )


def req(
    cid: str | None,
    t: float,
    status: int | None = 200,
    *,
    call: str | None = "default:X",
    ended: float | None = None,
    target: str = "a",
) -> Request:
    end = t + 0.05 if ended is None and status is not None else ended
    return Request(t=t, ended=end, target=target, command_id=cid, call=call, status=status)


def out(
    cid: str | None,
    t: float,
    status: str = "accepted",
    *,
    attempts: int = 1,
    duplicate: bool = False,
    event_id: str = "",
    key: str | None = None,
    code: str | None = None,
) -> Outcome:
    return Outcome(
        t=t,
        command_id=cid,
        key=key,
        event_id=event_id or f"ev-{cid or key}",
        status=status,
        error_code=code,
        error_message=None,
        attempts=attempts,
        duplicate=duplicate,
    )


def kill(t: float) -> Fault:
    return Fault(t=t, end=None, fault="kill", detail={"worker": 0})


def clean() -> History:
    """Accepted, in-order, duplicate, superseded, expired, garbage and 429-then-200 commands."""
    return History(
        config=CONFIG,
        publishes=[
            pub("c1", 100.0, 100.0),
            pub("c2", 100.5, 100.5),
            pub(None, 100.6, 100.6, key="garbage"),
            pub("c4", 101.0, 99.0),  # older than c2 for the same call: superseded
            replace(pub("c5", 101.0, 70.0, call="default:Z"), deadline=102.0),
            replace(pub("c1", 103.0, 103.0), copy=1),
            pub("c6", 104.0, 104.0, call="default:Y"),
        ],
        requests=[
            req("c1", 100.1),
            req("c2", 100.6),
            req("c6", 104.1, 429),
            req("c6", 104.5),
        ],
        outcomes=[
            out("c1", 100.2),
            out("c2", 100.7),
            out(None, 100.7, "rejected", key="garbage", code="invalid_command"),
            out("c4", 101.1, "rejected", attempts=0, code="superseded"),
            out("c5", 102.1, "expired", attempts=0, code="expired"),
            out("c1", 103.1, attempts=1, duplicate=True),
            out("c6", 104.6, attempts=2),
        ],
        faults=[Fault(t=102.0, end=103.0, fault="pabx_storm", detail={"status": 503})],
    )


def with_(history: History, *events: Event, drop: tuple[Event, ...] = ()) -> History:
    """The history plus some events, minus others."""

    def keep(items: list[E], kind: type[E]) -> list[E]:
        added = [e for e in events if isinstance(e, kind)]
        return [e for e in items if e not in drop] + added

    return replace(
        history,
        publishes=keep(history.publishes, Publish),
        requests=keep(history.requests, Request),
        outcomes=keep(history.outcomes, Outcome),
        faults=keep(history.faults, Fault),
    )


def assert_caught(report: Report, prefix: str, example: str) -> None:
    row = report.row(prefix)
    assert not report.ok
    assert row.violations >= 1, report.table()
    assert any(example in e for e in row.examples), report.table()


def test_clean_history_passes() -> None:
    report = check(clean())
    assert report.ok, report.table()
    assert report.row("1  every").checked == 6  # c1, c2, garbage, c4, c5, c6
    assert report.row("2 ").checked == 1
    assert report.row("6b").checked == 1
    assert "seed 7" in report.table()
    assert "python -m tests.campaign --seed 7 --minutes 1" in report.table()


def test_lost_command() -> None:
    history = with_(clean(), drop=(out("c2", 100.7),))
    assert_caught(check(history), "1  every", "c2 lost")


def test_lost_garbage_matched_by_key() -> None:
    garbage = out(None, 100.7, "rejected", key="garbage", code="invalid_command")
    history = with_(clean(), drop=(garbage,))
    assert_caught(check(history), "1  every", "key:garbage")


def test_double_send_without_kill() -> None:
    history = with_(clean(), req("c1", 101.5))
    assert_caught(check(history), "3 ", "c1: 2 acted-on")


def test_overlapping_requests_for_one_call() -> None:
    history = with_(clean(), req("c2", 100.105), drop=(req("c2", 100.6),))
    assert_caught(check(history), "6  no overlapping", "c1@100.100 overlaps c2@100.105")


def test_hung_request_stays_in_flight_until_its_outcome() -> None:
    hung = req("c2", 100.6, None, ended=None)
    history = with_(clean(), hung, drop=(req("c2", 100.6),))
    history = with_(history, pub("c7", 101.0, 101.0), req("c7", 100.65), out("c7", 101.0))
    assert_caught(check(history), "6  no overlapping", "c2@100.600 overlaps c7@100.650")
    later = with_(history, req("c7", 100.8), drop=(req("c7", 100.65),))
    assert check(later).row("6  no overlapping").violations == 0


def test_undercounted_attempts() -> None:
    history = with_(clean(), out("c6", 104.6, attempts=1), drop=(out("c6", 104.6, attempts=2),))
    assert_caught(check(history), "5 ", "c6: attempts 1 < 2")


def test_resend_after_ambiguous_failure() -> None:
    history = with_(
        clean(),
        pub("c7", 105.0, 105.0, call="default:W"),
        req("c7", 105.1, 502, call="default:W"),
        req("c7", 106.0, call="default:W"),
        out("c7", 106.1, attempts=2),
    )
    report = check(history)
    assert_caught(report, "4 ", "c7: 1 request(s) after status 502")
    allowed = check(replace(history, config=replace(CONFIG, retry_ambiguous=True)))
    assert allowed.ok, allowed.table()


def test_resend_after_no_answer() -> None:
    history = with_(
        clean(),
        pub("c7", 105.0, 105.0, call="default:W"),
        req("c7", 105.1, None, call="default:W", ended=105.2),
        req("c7", 106.0, 503, call="default:W"),
        out("c7", 106.1, "failed", attempts=2, code="pabx_unreachable"),
    )
    assert_caught(check(history), "4 ", "after status None")


def test_two_event_ids_for_one_command() -> None:
    history = with_(clean(), out("c2", 110.0, duplicate=True, event_id="ev-other"))
    report = check(history)
    assert_caught(report, "1  one event id", "ev-c2, ev-other")
    assert_caught(report, "2 ", "ev-other != ev-c2")


def test_idempotency_conflict_may_carry_its_own_event_id() -> None:
    conflict = out("c2", 110.0, "rejected", event_id="ev-conflict", code="idempotency_conflict")
    assert check(with_(clean(), conflict)).ok


def test_expired_before_deadline() -> None:
    early = out("c5", 101.2, "expired", attempts=0, code="expired")
    history = with_(clean(), early, drop=(out("c5", 102.1, "expired", attempts=0, code="expired"),))
    assert_caught(check(history), "8  expired", "c5: expired at 101.200")


def test_request_after_deadline() -> None:
    history = with_(clean(), req("c5", 103.0, call="default:Z"))
    assert_caught(check(history), "8  no request", "c5: request at 103.000")


def test_rate_limit_breach() -> None:
    # rate 20/s: at most 20 x 5 x 1.1 + 20 = 130 requests in any 5 s window.
    burst = [req(None, 200.0 + i * 0.01, 429, call=None) for i in range(131)]
    assert_caught(check(with_(clean(), *burst)), "7 ", "a: 131 requests")
    assert check(with_(clean(), *burst[:130])).ok


def test_rate_limit_follows_rate_changes() -> None:
    # b is unlimited until a rate_limit fault sets 1/s: at most 1 x 5 x 1.1 + 1 = 6.5 per window.
    change = Fault(t=200.0, end=None, fault="rate_limit", detail={"target": "b", "rate": 1.0})
    before = [req(None, 190.0 + i * 0.1, call=None, target="b") for i in range(20)]
    after = [req(None, 200.0 + i * 0.1, call=None, target="b") for i in range(7)]
    assert check(with_(clean(), change, *before)).ok
    assert_caught(check(with_(clean(), change, *after)), "7 ", "b: 7 requests")
    lifted = Fault(t=210.0, end=None, fault="rate_limit", detail={"target": "b", "rate": None})
    late = [req(None, 211.0 + i * 0.1, call=None, target="b") for i in range(20)]
    assert check(with_(clean(), change, lifted, *late)).ok


def test_out_of_order_application() -> None:
    history = with_(
        clean(),
        pub("new", 200.0, 200.0, call="default:Q"),
        pub("old", 200.1, 199.0, call="default:Q"),
        req("new", 200.2, call="default:Q"),
        req("old", 200.4, call="default:Q"),
        out("new", 200.3),
        out("old", 200.5),
    )
    assert_caught(check(history), "6  applied", "old (issued 199.000) after new")


def test_superseded_command_that_was_sent() -> None:
    history = with_(clean(), req("c4", 100.3))
    assert_caught(check(history), "6b", "c4: superseded after 1")


def test_accepted_without_a_200() -> None:
    history = with_(clean(), req("c2", 100.6, 500), drop=(req("c2", 100.6),))
    assert_caught(check(history), "6c", "c2: accepted without a 200")


def double_sent_at_kill(cid: str, call: str) -> tuple[Event, ...]:
    """Sent at 300.1, the worker killed at 300.3 before recording, resent by another at 305."""
    return (
        pub(cid, 300.0, 300.0, call=call),
        req(cid, 300.1, call=call),
        req(cid, 305.0, call=call),
        out(cid, 305.1, attempts=2),
    )


def test_double_send_in_flight_at_a_kill_is_allowed() -> None:
    history = with_(clean(), kill(300.3), *double_sent_at_kill("k1", "default:K1"))
    report = check(history)
    assert report.ok, report.table()
    assert "surplus 1, allowance 2" in report.row("3 ").note


def test_double_sends_beyond_the_kill_allowance() -> None:
    history = with_(
        clean(),
        kill(300.3),
        *double_sent_at_kill("k1", "default:K1"),
        *double_sent_at_kill("k2", "default:K2"),
        *double_sent_at_kill("k3", "default:K3"),
    )
    assert_caught(check(history), "3 ", "surplus 3 > allowance 2")


def test_double_send_long_after_a_kill_is_not_excused() -> None:
    history = with_(clean(), kill(50.0), req("c1", 101.5))
    assert_caught(check(history), "3 ", "c1: 2 acted-on requests, not in flight at a kill")


def all_events(history: History) -> list[Event]:
    return [
        history.config,
        *history.publishes,
        *history.requests,
        *history.outcomes,
        *history.faults,
    ]


def test_append_and_load_round_trip(tmp_path: Path) -> None:
    original = with_(clean(), kill(300.0))
    by_path = tmp_path / "by-path.jsonl"
    for event in all_events(original):
        append(by_path, event)
    assert load(by_path) == original
    buffer = io.StringIO()
    for event in all_events(original):
        append(buffer, event)
    by_file = tmp_path / "by-file.jsonl"
    by_file.write_text(buffer.getvalue())
    assert load(by_file) == original


@pytest.mark.parametrize(
    "text",
    ["", "{not json}\n", '{"kind": "publish", "t": 1.0}\n', '{"kind": "config", "t": "x"}\n'],
)
def test_unreadable_histories(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(HistoryError):
        load(path)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.campaign.checker", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def write(path: Path, history: History) -> Path:
    for event in all_events(history):
        append(path, event)
    return path


def test_cli_exit_codes(tmp_path: Path) -> None:
    ok = run_cli(str(write(tmp_path / "ok.jsonl", clean())))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "--seed 7" in ok.stdout
    lost = with_(clean(), drop=(out("c2", 100.7),))
    bad = run_cli(str(write(tmp_path / "lost.jsonl", lost)))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "c2 lost" in bad.stdout
    (tmp_path / "garbage.jsonl").write_text("not json\n")
    assert run_cli(str(tmp_path / "garbage.jsonl")).returncode == 2
    assert run_cli(str(tmp_path / "missing.jsonl")).returncode == 2


def test_replay_line_names_the_store_and_broker(tmp_path: Path) -> None:
    default = check(clean()).table().splitlines()[-1]
    assert default == "replay: python -m tests.campaign --seed 7 --minutes 1"
    history = replace(clean(), config=replace(CONFIG, store="postgres", broker="cluster"))
    loaded = load(write(tmp_path / "pg.jsonl", history))
    assert check(loaded).table().splitlines()[-1] == (
        "replay: python -m tests.campaign --seed 7 --minutes 1 --store postgres --broker cluster"
    )
