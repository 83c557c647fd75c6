"""Fleet-wide request rate limits per PABX target (SPEC §5).

A target's ``rate_limit`` holds for every worker sharing the store: request
slots are reserved from one schedule kept in the store
(:meth:`~worker.adapters.store.base.Store.reserve_slot`), ``1 / rate_limit`` seconds
apart on the store's clock, and each caller sleeps until its slot. The wait
happens before the command is marked sent, while its lease is kept alive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from worker.adapters.store.base import Store
from worker.contract.settings import PabxTarget

__all__ = ["FleetRateLimit"]


class FleetRateLimit:
    """Paces requests per target through the shared store."""

    def __init__(
        self,
        store: Store,
        targets: Mapping[str, PabxTarget],
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._store = store
        self._intervals = {
            name: 1.0 / target.rate_limit for name, target in targets.items() if target.rate_limit
        }
        self._sleep = sleep

    def limits(self, target: str) -> bool:
        """Whether ``target`` has a rate limit (requests wait for a slot)."""
        return target in self._intervals

    def reserve(self, target: str) -> float:
        """Reserve the next slot for ``target``; seconds until it (0 for an unlimited target)."""
        interval = self._intervals.get(target)
        if interval is None:
            return 0.0
        return self._store.reserve_slot(target, interval_s=interval)

    def wait(self, seconds: float) -> None:
        if seconds > 0:
            self._sleep(seconds)
