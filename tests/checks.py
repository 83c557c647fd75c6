"""Checks of SPEC §5 over what the simulator recorded, shared by the tests that need them."""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = ["WINDOW_S", "most_in_window", "overlapping_calls", "rate_limit_holds"]

#: The window of SPEC §5's rate-limit rule.
WINDOW_S = 5.0


def most_in_window(times: Iterable[float], window_s: float = WINDOW_S) -> int:
    """The largest number of instants that fall in any window ``window_s`` long."""
    ordered = sorted(times)
    best = 0
    for i, start in enumerate(ordered):
        best = max(best, bisect.bisect_right(ordered, start + window_s) - i)
    return best


def rate_limit_holds(times: Iterable[float], rate: float, window_s: float = WINDOW_S) -> bool:
    """SPEC §5: over any window, at most ``rate * window * 1.1`` plus one burst of ``rate``."""
    return most_in_window(times, window_s) <= rate * window_s * 1.1 + rate


def overlapping_calls(requests: Sequence[Mapping[str, Any]]) -> list[str]:
    """Calls (``ID_CHAMADA``) that had two requests open at the PABX at the same time.

    Each request is a simulator record with ``arrived`` and ``ended`` (epoch seconds).
    """
    by_call: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for request in requests:
        ended = request["ended"] if request["ended"] is not None else float("inf")
        by_call[request["body"]["ID_CHAMADA"]].append((request["arrived"], ended))
    bad = []
    for call, spans in by_call.items():
        spans.sort()
        if any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)):
            bad.append(call)
    return sorted(bad)
