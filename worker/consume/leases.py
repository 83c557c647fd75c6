"""Keeps the leases of the commands this process is handling alive (SPEC §5).

A claim's lease lets another worker take a command over once it lapses. A live
worker must never lose it while a request of its own may be in flight: a slow
answer, a rate-limit wait or a call held by another worker can each outlast any
fixed lease. :class:`LeaseKeeper` renews every lease it holds every third of the
lease, so only a worker that stopped running (killed, frozen, cut off from the
store for longer than a lease) lets its leases lapse.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from worker.adapters.store.base import Store
from worker.contract.errors import StoreError

__all__ = ["LeaseKeeper"]

log = logging.getLogger("pabx_worker.leases")


class LeaseKeeper:
    """Renews held leases on a thread of its own; :meth:`start` and :meth:`stop` own it."""

    def __init__(
        self, store: Store, *, lease_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._lease_s = lease_s
        self._clock = clock
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def every_s(self) -> float:
        """How often held leases are renewed."""
        return self._lease_s / 3

    @contextmanager
    def holding(self, command_id: str, token: str) -> Iterator[None]:
        """Keep the lease ``token`` on ``command_id`` alive for the duration of the block."""
        with self._lock:
            self._held[command_id] = token
        try:
            yield
        finally:
            with self._lock:
                if self._held.get(command_id) == token:
                    del self._held[command_id]

    def renew_all(self) -> int:
        """Renew every held lease once; returns how many were lost to another worker."""
        with self._lock:
            held = list(self._held.items())
        lost = 0
        for command_id, token in held:
            try:
                renewed = self._store.renew(
                    command_id, token, now=self._clock(), lease_s=self._lease_s
                )
            except StoreError as exc:  # the step that needs it will wait for the store
                log.debug("lease renewal failed", extra={"error": str(exc)})
                return lost
            if not renewed:
                lost += 1
                log.warning("lease lost to another worker", extra={"command_id": command_id})
        return lost

    def start(self) -> LeaseKeeper:
        self._thread = threading.Thread(target=self._run, name="pabx-leases", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.renew_all()
