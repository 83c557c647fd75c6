"""What a drain or a paced run measured: outcomes, statuses, latencies, PABX requests."""

from __future__ import annotations

import json
from typing import Any

from bench.broker import OutcomeReader
from bench.commands import command_id, index_of_call, index_of_command, parse_rfc3339
from bench.context import Scenario
from bench.results import RunResult, SlowRequest
from bench.sampling import summary_ms

__all__ = ["analyse"]


def _outcomes(
    result: RunResult, prefix: str, reader: OutcomeReader, stamps: dict[int, float]
) -> None:
    """Outcomes, their statuses, publish → outcome latencies and the throughput."""
    arrivals: list[float] = []
    pub_to_outcome: list[float] = []
    statuses: dict[str, int] = {}
    for cid, arrived in reader.arrivals.items():
        index = index_of_command(prefix, cid)
        if index is None or index not in stamps:
            continue
        arrivals.append(arrived)
        pub_to_outcome.append(arrived - stamps[index])
        body = reader.bodies.get(cid)
        if body is not None:
            try:
                status = str(json.loads(body)["data"]["status"])
            except (ValueError, KeyError, TypeError):
                status = "unparsable"
            statuses[status] = statuses.get(status, 0) + 1
    result.outcomes = len(arrivals)
    result.statuses = statuses
    result.latency_ms = {"publish_to_outcome": summary_ms(pub_to_outcome)}
    if len(arrivals) >= 2:
        first, last = min(arrivals), max(arrivals)
        span = last - first
        result.first_outcome, result.last_outcome = first, last
        result.duration_s = round(span, 3)
        result.throughput = round(len(arrivals) / span, 1) if span > 0 else None


def _pabx_requests(
    result: RunResult,
    prefix: str,
    stamps: dict[int, float],
    requests_seen: list[dict[str, Any]],
    probe: dict[str, float] | None,
) -> None:
    """Publish → PABX latencies (first request per command), requests and repeats."""
    pub_to_pabx: list[float] = []
    slow: list[tuple[float, float, int]] = []
    per_command: dict[int, int] = {}
    for record in requests_seen:
        body = record.get("body")
        call = body.get("ID_CHAMADA") if isinstance(body, dict) else None
        index = index_of_call(prefix, call) if isinstance(call, str) else None
        if index is None or index not in stamps:
            continue
        per_command[index] = per_command.get(index, 0) + 1
        if per_command[index] == 1:
            pub_to_pabx.append(parse_rfc3339(record["received_at"]) - stamps[index])
            slow.append((pub_to_pabx[-1], stamps[index], index))
    result.latency_ms["publish_to_pabx"] = summary_ms(pub_to_pabx)
    probed: dict[int, float] = {}
    if probe is not None:
        for index, stamp in stamps.items():
            delivered = probe.get(command_id(prefix, index))
            if delivered is not None:
                probed[index] = delivered - stamp
        result.latency_ms["publish_to_probe"] = summary_ms(list(probed.values()))
    if slow:  # when the slowest ones were published (seconds into the run): stalls?
        t0 = min(stamps.values())
        result.slowest_publish_to_pabx = [
            SlowRequest(
                published_at_s=round(at - t0, 3),
                ms=round(lat * 1000, 1),
                probe_ms=round(probed[index] * 1000, 1) if index in probed else None,
            )
            for lat, at, index in sorted(slow, reverse=True)[:8]
        ]
    result.pabx_requests = sum(per_command.values())
    result.pabx_repeated = sum(n - 1 for n in per_command.values())


def analyse(
    result: RunResult,
    scenario: Scenario,
    reader: OutcomeReader,
    stamps: dict[int, float],
    requests_seen: list[dict[str, Any]],
    probe: dict[str, float] | None = None,
) -> None:
    """Fill ``result`` from the outcome reader and the requests the simulator recorded
    (and, with ``--probe``, when each command reached the broker probe)."""
    _outcomes(result, scenario.prefix, reader, stamps)
    _pabx_requests(result, scenario.prefix, stamps, requests_seen, probe)
    result.complete = result.outcomes == result.commands and not result.error
