"""Fleet-wide pacing per PABX target: slots from the store, waited for before sending."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tests.checks import most_in_window, rate_limit_holds
from worker.adapters.store.memory import MemoryStore
from worker.consume.ratelimit import FleetRateLimit
from worker.contract.settings import PabxTarget

FREE = PabxTarget(url="http://free", api_key="k", channel_id=1)
PACED = PabxTarget(url="http://paced", api_key="k", channel_id=1, rate_limit=5)


def test_only_targets_with_a_limit_take_slots() -> None:
    store = MemoryStore()
    pace = FleetRateLimit(store, {"free": FREE, "paced": PACED})
    assert [pace.reserve("free") for _ in range(5)] == [0.0] * 5
    waits = [pace.reserve("paced") for _ in range(3)]
    assert waits[0] < 0.01 and 0.19 < waits[1] < 0.21 and 0.39 < waits[2] < 0.41


def test_two_limiters_on_one_store_share_the_schedule() -> None:
    store = MemoryStore()
    first = FleetRateLimit(store, {"paced": PACED})
    second = FleetRateLimit(store, {"paced": PACED})
    waits = [first.reserve("paced"), second.reserve("paced"), first.reserve("paced")]
    assert waits[1] > 0.19 and waits[2] > 0.39


def test_threads_waiting_for_slots_keep_the_window_rule() -> None:
    store = MemoryStore()
    paced = PACED.model_copy(update={"rate_limit": 50})
    pace = FleetRateLimit(store, {"paced": paced})
    sent: list[float] = []

    def one(_: int) -> None:
        pace.wait(pace.reserve("paced"))
        sent.append(time.time())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(100)))
    rate = (len(sent) - 1) / (max(sent) - min(sent))
    assert 45 <= rate <= 55, rate
    assert rate_limit_holds(sent, 50, window_s=1.0)


def test_window_rule_counts_the_busiest_window() -> None:
    assert most_in_window([0, 1, 2, 3, 4, 5, 10], 5) == 6
    assert rate_limit_holds([i / 10 for i in range(66)], 10)  # 66 in 5 s ≤ 55 + 10 + 1
    assert not rate_limit_holds([i / 100 for i in range(100)], 10)
