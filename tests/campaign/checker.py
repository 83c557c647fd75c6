"""Jepsen-style checker: reads only a recorded campaign history and verifies SPEC §5.

Each property is a row counting the items it checked and the violations it found, with up to
``MAX_EXAMPLES`` examples. ``python -m tests.campaign.checker HISTORY.jsonl`` prints the table and
exits 0 when every row is clean, 1 on any violation, 2 when the history cannot be read.

A command is "exposed" when a worker was killed while it may have been in flight: one of its
requests arrived before a ``kill`` fault and its first outcome came after it (or never). SPEC §5
allows a second request only for such commands.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from tests.campaign.history import History, HistoryError, Outcome, Publish, Request, load

__all__ = ["Report", "Row", "check", "main"]

#: Statuses that say the PABX did not act on the request.
NOT_ACTED = frozenset({429, 503})
#: Statuses after which the PABX may have acted (plus no answer at all).
AMBIGUOUS = frozenset({500, 502, 504})
#: Clock slack between the runner, the workers and the simulator.
CLOCK_SLACK_S = 0.5
#: A request arriving this soon after a kill may still have been sent by the killed worker.
KILL_SLACK_S = 0.2
#: The simulator stamps ``ended`` after writing the answer, and notices a client that gave up
#: within 10 ms (its latency and trickle waits poll the connection): the worker may move on
#: to the next command of the call that much earlier.
OVERLAP_SLACK_S = 0.03
#: SPEC §5 rate-limit window.
RATE_WINDOW_S = 5.0
MAX_EXAMPLES = 5
CONFLICT = "idempotency_conflict"
SUPERSEDED = "superseded"


@dataclass
class Row:
    """One checked property: how many items were checked, how many violated it."""

    name: str
    checked: int = 0
    violations: int = 0
    examples: list[str] = field(default_factory=list)
    note: str = ""

    def flag(self, example: str) -> None:
        self.violations += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(example)


@dataclass
class Report:
    """All property rows of one history, plus what is needed to replay it."""

    rows: list[Row]
    seed: int
    minutes: float
    #: ``--store``/``--broker`` arguments of the replay line (empty for the defaults).
    setup: str = ""

    @property
    def ok(self) -> bool:
        return all(row.violations == 0 for row in self.rows)

    def row(self, prefix: str) -> Row:
        """The row whose name starts with ``prefix`` (e.g. ``"3 "``)."""
        for row in self.rows:
            if row.name.startswith(prefix):
                return row
        raise KeyError(prefix)

    def table(self) -> str:
        width = max(len(row.name) for row in self.rows)
        lines = [
            f"campaign history, seed {self.seed}: {'OK' if self.ok else 'VIOLATIONS FOUND'}",
            f"{'property':<{width}}  {'checked':>8}  {'violations':>10}",
        ]
        for row in self.rows:
            mark = "" if row.violations == 0 else "  <-- FAIL"
            lines.append(f"{row.name:<{width}}  {row.checked:>8}  {row.violations:>10}{mark}")
            if row.note:
                lines.append(f"    note: {row.note}")
            lines.extend(f"    e.g. {example}" for example in row.examples)
        lines.append(
            f"replay: python -m tests.campaign --seed {self.seed} --minutes {self.minutes:g}"
            + self.setup
        )
        return "\n".join(lines)


def _acted(request: Request) -> bool:
    return request.status not in NOT_ACTED


def _ambiguous(request: Request) -> bool:
    return request.status is None or request.status in AMBIGUOUS


def _publish_ident(publish: Publish) -> str:
    return publish.command_id or f"key:{publish.key}"


def _outcome_ident(outcome: Outcome) -> str | None:
    if outcome.command_id:
        return outcome.command_id
    return f"key:{outcome.key}" if outcome.key else None


def _span(values: Iterable[float | None]) -> tuple[float, float] | None:
    known = [v for v in values if v is not None]
    return (min(known), max(known)) if known else None


class _Index:
    """The history grouped by command and by call, computed once."""

    def __init__(self, history: History) -> None:
        self.config = history.config
        self.history = history
        self.publishes: dict[str, list[Publish]] = defaultdict(list)
        for publish in history.publishes:
            self.publishes[_publish_ident(publish)].append(publish)
        self.outcomes: dict[str, list[Outcome]] = defaultdict(list)
        for outcome in sorted(history.outcomes, key=lambda o: o.t):
            ident = _outcome_ident(outcome)
            if ident is not None:
                self.outcomes[ident].append(outcome)
        ordered = sorted(history.requests, key=lambda r: r.t)
        self.requests: dict[str, list[Request]] = defaultdict(list)
        self.calls: dict[str, list[Request]] = defaultdict(list)
        for request in ordered:
            if request.command_id is not None:
                self.requests[request.command_id].append(request)
            if request.call is not None:
                self.calls[f"{request.target}|{request.call}"].append(request)
        self.kills = sorted(f.t for f in history.faults if f.fault == "kill")
        self.exposed = {cid for cid in self.requests if self._exposed(cid)}

    def first_outcome_t(self, ident: str) -> float | None:
        outcomes = self.outcomes.get(ident)
        return outcomes[0].t if outcomes else None

    def _exposed(self, cid: str) -> bool:
        first_sent = self.requests[cid][0].t
        done = self.first_outcome_t(cid)
        return any(
            first_sent <= kill + KILL_SLACK_S and (done is None or done >= kill)
            for kill in self.kills
        )

    def end_of(self, request: Request) -> float:
        """When the request stopped being in flight for its worker."""
        if request.ended is not None:
            return request.ended
        done = self.first_outcome_t(request.command_id) if request.command_id else None
        return math.inf if done is None else done

    def orders(self, ident: str) -> tuple[float, float] | None:
        return _span(p.order for p in self.publishes.get(ident, ()))

    def deadlines(self, ident: str) -> tuple[float, float] | None:
        return _span(p.deadline for p in self.publishes.get(ident, ()))


def _own(outcomes: Sequence[Outcome]) -> list[Outcome]:
    """Outcomes about this command's own body (an idempotency conflict is another message)."""
    return [o for o in outcomes if o.error_code != CONFLICT]


def _lost(ix: _Index) -> Row:
    row = Row("1  every published command has an outcome")
    for ident in ix.publishes:
        row.checked += 1
        if ident not in ix.outcomes:
            row.flag(f"{ident} lost")
    return row


def _one_event_id(ix: _Index) -> Row:
    row = Row("1  one event id per command")
    for ident, outcomes in ix.outcomes.items():
        ids = sorted({o.event_id for o in _own(outcomes)})
        row.checked += 1
        if len(ids) > 1:
            row.flag(f"{ident}: event ids {', '.join(ids)}")
    return row


def _duplicates(ix: _Index) -> Row:
    row = Row("2  duplicates repeat the event id")
    for ident, outcomes in ix.outcomes.items():
        own = _own(outcomes)
        if not own:
            continue
        first = next((o for o in own if not o.duplicate), own[0]).event_id
        for outcome in own:
            if outcome.duplicate:
                row.checked += 1
                if outcome.event_id != first:
                    row.flag(f"{ident}: duplicate {outcome.event_id} != {first}")
    return row


def _acted_count(requests: Sequence[Request], retry_ambiguous: bool) -> int:
    """Requests the PABX may have acted on; with RETRY_AMBIGUOUS an ambiguous one that was
    resent is the opted-in exception, so only the last request of such a chain counts."""
    last = len(requests) - 1
    return sum(
        1
        for i, r in enumerate(requests)
        if _acted(r) and not (retry_ambiguous and _ambiguous(r) and i < last)
    )


def _at_most_once(ix: _Index) -> Row:
    row = Row("3  at most once toward the PABX")
    allowance = len(ix.kills) * ix.config.concurrency
    surplus_total = 0
    for cid, requests in ix.requests.items():
        row.checked += 1
        acted = _acted_count(requests, ix.config.retry_ambiguous)
        surplus = max(0, acted - 1)
        surplus_total += surplus
        if surplus and cid not in ix.exposed:
            row.flag(f"{cid}: {acted} acted-on requests, not in flight at a kill")
    if surplus_total > allowance:
        row.flag(f"surplus {surplus_total} > allowance {allowance}")
    row.note = (
        f"surplus {surplus_total}, allowance {allowance} "
        f"({len(ix.kills)} kills x concurrency {ix.config.concurrency})"
    )
    return row


def _no_ambiguous_resend(ix: _Index) -> Row:
    row = Row("4  no resend after an ambiguous failure")
    if ix.config.retry_ambiguous:
        row.note = "not checked: retry_ambiguous is on"
        return row
    for cid, requests in ix.requests.items():
        first = next((i for i, r in enumerate(requests) if _ambiguous(r)), None)
        if first is None:
            continue
        row.checked += 1
        later = requests[first + 1 :]
        if later and cid not in ix.exposed:
            status = requests[first].status
            row.flag(f"{cid}: {len(later)} request(s) after status {status}")
    return row


def _attempts(ix: _Index) -> Row:
    row = Row("5  attempts >= requests recorded")
    for ident, outcomes in ix.outcomes.items():
        own = _own(outcomes)
        if not own:
            continue
        counted = [o for o in own if not o.duplicate] or own
        attempts = max(o.attempts for o in counted)
        recorded = len(ix.requests.get(ident, ()))
        row.checked += 1
        if attempts < recorded:
            row.flag(f"{ident}: attempts {attempts} < {recorded} requests")
    return row


def _overlap_example(call: str, a: Request, b: Request) -> str:
    return f"{call}: {a.command_id}@{a.t:.3f} overlaps {b.command_id}@{b.t:.3f}"


def _no_overlap(ix: _Index) -> Row:
    row = Row("6  no overlapping requests per call")
    for call, requests in ix.calls.items():
        in_flight: list[tuple[float, Request]] = []
        for request in requests:
            row.checked += 1
            in_flight = [(end, r) for end, r in in_flight if end > request.t + OVERLAP_SLACK_S]
            for _, other in in_flight:
                if not {other.command_id, request.command_id} & ix.exposed:
                    row.flag(_overlap_example(call, other, request))
            in_flight.append((ix.end_of(request), request))
    row.note = "a request never ended counts as in flight until its command's first outcome"
    return row


def _issue_order(ix: _Index) -> Row:
    row = Row("6  applied in issue order per call")
    for call, requests in ix.calls.items():
        newest: tuple[float, str] | None = None  # highest issue time applied so far
        for request in requests:
            cid = request.command_id
            span = ix.orders(cid) if cid and request.status == 200 else None
            if cid is None or span is None:
                continue
            row.checked += 1
            if newest is not None and span[1] < newest[0]:
                row.flag(
                    f"{call}: {cid} (issued {span[1]:.3f}) after {newest[1]} ({newest[0]:.3f})"
                )
            if newest is None or span[0] > newest[0]:
                newest = (span[0], cid)
    return row


def _superseded_unsent(ix: _Index) -> Row:
    row = Row("6b superseded commands were never sent")
    for ident, outcomes in ix.outcomes.items():
        if not any(o.error_code == SUPERSEDED for o in outcomes):
            continue
        row.checked += 1
        acted = sum(1 for r in ix.requests.get(ident, ()) if _acted(r))
        # A killed worker may have sent it before a newer command took the call (SPEC §5).
        if acted and ident not in ix.exposed:
            row.flag(f"{ident}: superseded after {acted} acted-on request(s)")
    return row


def _accepted_answered(ix: _Index) -> Row:
    row = Row("6c accepted commands had a 200")
    for ident, outcomes in ix.outcomes.items():
        if not any(o.status == "accepted" for o in outcomes):
            continue
        row.checked += 1
        if not any(r.status == 200 for r in ix.requests.get(ident, ())):
            row.flag(f"{ident}: accepted without a 200 request")
    return row


def _rate_schedules(ix: _Index) -> dict[str, list[tuple[float, float | None]]]:
    schedules = {
        name: [(-math.inf, target.rate_limit)] for name, target in ix.config.targets.items()
    }
    for fault in sorted(ix.history.faults, key=lambda f: f.t):
        target = fault.detail.get("target")
        if fault.fault != "rate_limit" or not isinstance(target, str):
            continue
        rate = fault.detail.get("rate")
        value = float(rate) if isinstance(rate, int | float) else None
        schedules.setdefault(target, [(-math.inf, None)]).append((fault.t, value))
    return schedules


def _max_rate(schedule: list[tuple[float, float | None]], start: float, end: float) -> float | None:
    """Highest rate in force during [start, end); None if any part of it is unlimited."""
    in_force = [rate for t, rate in schedule if t <= start][-1:]
    in_force += [rate for t, rate in schedule if start < t < end]
    if not in_force or None in in_force:
        return None
    return max(rate for rate in in_force if rate is not None)


def _rate_windows(
    row: Row, target: str, schedule: list[tuple[float, float | None]], times: list[float]
) -> None:
    end_index = 0
    for start_index, start in enumerate(times):
        end = start + RATE_WINDOW_S
        while end_index < len(times) and times[end_index] < end:
            end_index += 1
        rate = _max_rate(schedule, start, end)
        if rate is None:
            continue
        row.checked += 1
        count = end_index - start_index
        limit = rate * RATE_WINDOW_S * 1.1 + rate
        if count > limit:
            row.flag(f"{target}: {count} requests in 5 s from {start:.3f} > {limit:.1f}")


def _rate_limit(ix: _Index) -> Row:
    row = Row("7  rate limit per target (5 s window)")
    for target, schedule in _rate_schedules(ix).items():
        if all(rate is None for _, rate in schedule):
            continue
        times = sorted(r.t for r in ix.history.requests if r.target == target)
        _rate_windows(row, target, schedule, times)
    return row


def _expired_late(ix: _Index) -> Row:
    row = Row("8  expired only after the deadline")
    for outcome in ix.history.outcomes:
        ident = _outcome_ident(outcome)
        span = ix.deadlines(ident) if ident and outcome.status == "expired" else None
        if span is None:
            continue
        row.checked += 1
        if outcome.t < span[0] - CLOCK_SLACK_S:
            row.flag(f"{ident}: expired at {outcome.t:.3f}, deadline {span[0]:.3f}")
    return row


def _no_late_request(ix: _Index) -> Row:
    row = Row("8  no request after the deadline")
    for cid, requests in ix.requests.items():
        span = ix.deadlines(cid)
        if span is None:
            continue
        for request in requests:
            row.checked += 1
            if request.t > span[1] + CLOCK_SLACK_S:
                row.flag(f"{cid}: request at {request.t:.3f}, deadline {span[1]:.3f}")
    return row


PROPERTIES: tuple[Callable[[_Index], Row], ...] = (
    _lost,
    _one_event_id,
    _duplicates,
    _at_most_once,
    _no_ambiguous_resend,
    _attempts,
    _no_overlap,
    _issue_order,
    _superseded_unsent,
    _accepted_answered,
    _rate_limit,
    _expired_late,
    _no_late_request,
)


def _minutes(history: History) -> float:
    if history.config.minutes is not None:
        return history.config.minutes
    times = [
        *(p.t for p in history.publishes),
        *(r.t for r in history.requests),
        *(o.t for o in history.outcomes),
    ]
    span = max(times, default=history.config.t) - history.config.t
    return max(1, math.ceil(span / 60))


def check(history: History) -> Report:
    """Verify every SPEC §5 property over one recorded history."""
    ix = _Index(history)
    rows = [prop(ix) for prop in PROPERTIES]
    config = history.config
    setup = "" if config.store == "redis" else f" --store {config.store}"
    setup += "" if config.broker == "single" else f" --broker {config.broker}"
    return Report(rows=rows, seed=config.seed, minutes=_minutes(history), setup=setup)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.campaign.checker", description=__doc__)
    parser.add_argument("history", help="the campaign history (JSON Lines)")
    args = parser.parse_args(argv)
    try:
        history = load(args.history)
    except HistoryError as exc:
        print(f"unreadable history: {exc}", file=sys.stderr)
        return 2
    report = check(history)
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
