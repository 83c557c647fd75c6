"""Chaos harness: sizes, the tally of a scenario, and a monitor of a worker's state.

The world of a scenario (simulator, private topology, outcome reader) is the kit's
:class:`tests.kit.rig.Rig`, re-exported here; the processes and the breaking TCP proxy are
in :mod:`tests.kit` too.

Every scenario sends commands whose ``command_id`` is also their ``ID_CHAMADA`` and ``DADOS``
(:func:`tests.kit.samples.counted_command`), so PABX requests recorded by the simulator can be
counted per command. The tally of a scenario is printed as a table (visible with ``pytest -s``)
and appended as one JSON line to ``bench/results/chaos.jsonl`` (git-ignored;
``PABX_CHAOS_RESULTS`` names another file).

``PABX_CHAOS_FULL=1`` (``make chaos``) selects the full sizes; without it the reduced ones,
which run inside ``make test``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.kit.processes import ROOT
from tests.kit.rig import Rig

__all__ = ["FULL", "MODE", "RESULTS_FILE", "Rig", "StateMonitor", "Tally", "report", "size"]

FULL = os.environ.get("PABX_CHAOS_FULL", "").strip().lower() not in ("", "0", "false", "no")
MODE = "full" if FULL else "reduced"
RESULTS_FILE = Path(
    os.environ.get("PABX_CHAOS_RESULTS", ROOT / "bench" / "results" / "chaos.jsonl")
)


def size(reduced: Any, full: Any) -> Any:
    """The reduced value inside ``make test``, the full one under ``make chaos``."""
    return full if FULL else reduced


# -- the tally ----------------------------------------------------------------------------


@dataclass
class Tally:
    """What happened to one scenario's commands."""

    scenario: str
    sent: list[str]
    events: dict[str, list[dict[str, Any]]]
    requests: Counter[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, scenario: str, rig: Rig, sent: list[str], **extra: Any) -> Tally:
        rig.poll()
        mine = set(sent)
        events = {cid: evs for cid, evs in rig.events().items() if cid in mine}
        requests_ = Counter({cid: n for cid, n in rig.requests_by_command().items() if cid in mine})
        return cls(scenario, sent, events, requests_, extra)

    @property
    def statuses(self) -> Counter[str]:
        return Counter(evs[0]["data"]["status"] for evs in self.events.values())

    @property
    def lost(self) -> list[str]:
        return [cid for cid in self.sent if not self.events.get(cid)]

    @property
    def multiple_outcomes(self) -> list[str]:
        """Commands with more than one distinct event id: never allowed."""
        return [cid for cid, evs in self.events.items() if len({e["id"] for e in evs}) > 1]

    @property
    def republished(self) -> int:
        """Events received again with the same id (allowed: e.g. killed before the ack)."""
        return sum(len(evs) - 1 for evs in self.events.values())

    @property
    def only_as_duplicate(self) -> list[str]:
        """Commands whose every event says ``duplicate: true`` (the first one was never sent)."""
        return [cid for cid, evs in self.events.items() if all(e["data"]["duplicate"] for e in evs)]

    @property
    def surplus_requests(self) -> int:
        return sum(n - 1 for n in self.requests.values() if n > 1)

    @property
    def sent_twice(self) -> list[str]:
        return [cid for cid, n in self.requests.items() if n > 1]

    def row(self) -> dict[str, Any]:
        statuses = self.statuses
        return {
            "scenario": self.scenario,
            "mode": MODE,
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
            "sent": len(self.sent),
            "outcomes": {
                s: statuses.get(s, 0) for s in ("accepted", "rejected", "failed", "expired")
            },
            "error_codes": dict(
                Counter(
                    (evs[0]["data"]["error"] or {}).get("code", "-")
                    for evs in self.events.values()
                    if evs[0]["data"]["error"]
                )
            ),
            "lost": len(self.lost),
            "multiple_outcomes": len(self.multiple_outcomes),
            "republished_same_id": self.republished,
            "outcome_only_as_duplicate": len(self.only_as_duplicate),
            "pabx_requests": sum(self.requests.values()),
            "surplus_pabx_requests": self.surplus_requests,
            "commands_sent_twice": len(self.sent_twice),
            **self.extra,
        }

    def report(self) -> dict[str, Any]:
        return report(self.row())


def report(row: dict[str, Any]) -> dict[str, Any]:
    """Print a scenario's table and append it to :data:`RESULTS_FILE` as one JSON line."""
    row = {"mode": MODE, "at": datetime.now(UTC).isoformat(timespec="seconds"), **row}
    print(format_table(row))
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS_FILE.open("a", encoding="utf-8") as out:
        out.write(json.dumps(row, default=str) + "\n")
    return row


def format_table(row: dict[str, Any]) -> str:
    title = f" chaos: {row['scenario']} [{row['mode']}] "
    lines = ["", f"+{title:-^74}+"]
    for key, value in row.items():
        if key in ("scenario", "mode", "at"):
            continue
        if isinstance(value, dict):
            value = " ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, float):
            value = f"{value:.2f}"
        lines.append(f"| {key.replace('_', ' '):<30} {value!s:>41} |")
    lines.append("+" + "-" * 74 + "+")
    return "\n".join(lines)


class StateMonitor:
    """Samples a worker's state every few milliseconds and keeps the changes."""

    def __init__(self, worker: Any, every_s: float = 0.005) -> None:
        self._worker = worker
        self._every = every_s
        self.changes: list[tuple[float, bool, bool, bool]] = []
        #: (time, commands in flight) at every change.
        self.in_flight: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[bool, bool, bool]:
        state = self._worker.state
        return state.connected, state.consuming, self._worker.ready.is_set()

    def _run(self) -> None:
        last = None
        last_in_flight = -1
        while not self._stop.is_set():
            now = self._sample()
            if now != last:
                self.changes.append((time.monotonic(), *now))
                last = now
            in_flight = self._worker.state.in_flight
            if in_flight != last_in_flight:
                self.in_flight.append((time.monotonic(), in_flight))
                last_in_flight = in_flight
            self._stop.wait(self._every)

    def peak_in_flight(self, since: float) -> int:
        """The most commands in flight at once after ``since``."""
        return max((n for t, n in self.in_flight if t >= since), default=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def between(self, start: float, end: float) -> list[tuple[float, bool, bool, bool]]:
        """The state at ``start`` and every change up to ``end``."""
        before = [c for c in self.changes if c[0] <= start]
        return before[-1:] + [c for c in self.changes if start < c[0] <= end]

    def ready_flips(self) -> int:
        """How many times readiness went from true to false."""
        flips, was = 0, False
        for _, _, _, ready in self.changes:
            if was and not ready:
                flips += 1
            was = ready
        return flips
