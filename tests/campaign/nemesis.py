"""The campaign's nemesis: random faults, overlapping in time, each for a few seconds.

Every choice comes from one ``random.Random(seed)``. A fault holds the resource it breaks
(a worker, a target's simulator, a target's proxy, the store) so two faults never fight
over one; different resources break at the same time. Each fault is recorded once it is
over, as ``{"kind": "fault", "t": start, "end": ..., "fault": ..., "detail": {...}}``.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["FAULTS", "Nemesis", "World"]


class World(Protocol):
    """What the nemesis can break and mend (the campaign runner implements it)."""

    workers: int
    targets: tuple[str, ...]
    store_pausable: bool
    #: Broker nodes that may be stopped (1-based; empty without a private cluster).
    broker_nodes: tuple[int, ...]

    def kill_worker(self, index: int) -> int: ...
    def terminate_worker(self, index: int) -> int | None: ...
    def start_worker(self, index: int) -> None: ...
    def broker_cut(self) -> int: ...
    def set_faults(self, target: str, **faults: Any) -> None: ...
    def clear_faults(self, target: str) -> None: ...
    def set_rate_limit(self, target: str, rate: float | None) -> None: ...

    rates: dict[str, float | None]

    def target_down(self, target: str) -> None: ...
    def target_up(self, target: str) -> None: ...
    def store_pause(self) -> None: ...
    def store_resume(self) -> None: ...
    def node_stop(self, node: int) -> None: ...
    def node_start(self, node: int) -> float: ...


#: Simulator fault settings of each PABX fault (``PUT /_sim/faults`` replaces them all).
SIM_FAULTS: dict[str, dict[str, Any]] = {
    "pabx_storm_503": {"error_rate": 1.0, "fail_status": 503},
    "pabx_storm_500": {"error_rate": 1.0, "fail_status": 500},
    "pabx_hang": {"hang": True},
    # 30 bytes at 100 ms: 3 s, past connect + read timeout (2 s), so the answer is cut.
    "pabx_trickle": {"trickle_ms": 100, "trickle_bytes": 30},
    "latency_spike": {"latency_ms": 500, "latency_max_ms": 2200},
}

#: The faults the nemesis picks from, with their weights.
FAULTS: dict[str, int] = {
    "kill": 3,
    "sigterm": 2,
    "broker_cut": 2,
    "pabx_storm": 3,
    "pabx_hang": 2,
    "pabx_trickle": 2,
    "latency_spike": 2,
    "target_down": 2,
    "store_pause": 2,
    "node_stop": 2,
    "rate_limit": 1,
}
#: Rates the nemesis moves a rate-limited target between.
RATES = (10.0, 20.0, 30.0)

Record = Callable[[dict[str, Any]], None]


class Nemesis:
    """Starts a fault every 1 to 4 s until stopped; each runs in its own thread."""

    def __init__(self, world: World, seed: int, record: Record, log: Callable[[str], None]) -> None:
        self._world = world
        self._rng = random.Random(f"nemesis-{seed}")
        self._record = record
        self._log = log
        self._stop = threading.Event()
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._faults: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._run, name="nemesis", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop picking faults, and wait for the running ones to be mended."""
        self._stop.set()
        self._thread.join(30)
        for fault in self._faults:
            fault.join(60)

    # -- choosing ----------------------------------------------------------------------

    def _run(self) -> None:
        self._stop.wait(self._rng.uniform(2.0, 4.0))  # let the fleet warm up first
        while not self._stop.is_set():
            self._launch()
            self._stop.wait(self._rng.uniform(1.0, 4.0))

    def _launch(self) -> None:
        kinds = [k for k in FAULTS if self._possible(k)]
        kind = self._rng.choices(kinds, weights=[FAULTS[k] for k in kinds])[0]
        duration = self._rng.uniform(2.0, 6.0)
        plan = self._plan(kind)
        if plan is None:
            return
        resource, action = plan
        thread = threading.Thread(
            target=self._hold, args=(kind, resource, action, duration), daemon=True
        )
        self._faults.append(thread)
        thread.start()

    def _possible(self, kind: str) -> bool:
        if kind == "store_pause":
            return self._world.store_pausable
        if kind == "node_stop":
            return bool(self._world.broker_nodes)
        return True

    def _plan(self, kind: str) -> tuple[str, Callable[[float], dict[str, Any]]] | None:
        """The resource a fault breaks (free at the moment) and the action, or None."""
        rng, world = self._rng, self._world
        if kind in ("kill", "sigterm"):
            index = rng.randrange(world.workers)
            act = self._kill if kind == "kill" else self._sigterm
            return f"worker{index}", lambda d: act(index, d)
        if kind == "broker_cut":
            return "broker", self._broker_cut
        if kind == "node_stop":
            node = rng.choice(world.broker_nodes)
            # One node at a time: the quorum queues keep a majority of their three members.
            return "broker-node", lambda d: self._node_stop(node, d)
        if kind == "rate_limit":
            limited = [t for t in world.targets if world.rates.get(t)]
            if not limited:
                return None
            target = rng.choice(limited)
            rate = rng.choice([r for r in RATES if r != world.rates[target]])
            return "fleet", lambda d: self._rate_limit(target, rate)
        target = rng.choice(world.targets)
        if kind == "target_down":
            return f"proxy-{target}", lambda d: self._target_down(target, d)
        if kind == "store_pause":
            return "store", self._store_pause
        name = f"pabx_storm_{rng.choice([503, 500])}" if kind == "pabx_storm" else kind
        return f"sim-{target}", lambda d: self._sim_fault(target, name, d)

    def _hold(
        self, kind: str, resource: str, action: Callable[[float], dict[str, Any]], duration: float
    ) -> None:
        with self._lock:
            if resource in self._busy:
                return
            self._busy.add(resource)
        start = time.time()
        detail: dict[str, Any] = {}
        try:
            detail = action(duration)
        except Exception as exc:  # a fault that could not be applied is still recorded
            detail = {"error": repr(exc)}
        finally:
            with self._lock:
                self._busy.discard(resource)
        end = time.time()
        # A rate limit holds from when every worker has it (lower) or one may (higher).
        start = float(detail.pop("effective_t", start))
        self._record({"kind": "fault", "t": start, "end": end, "fault": kind, "detail": detail})
        self._log(f"fault {kind} {detail} {end - start:.1f}s")

    # -- the faults --------------------------------------------------------------------

    def _kill(self, index: int, duration: float) -> dict[str, Any]:
        pid = self._world.kill_worker(index)
        self._stop.wait(duration / 2)
        self._world.start_worker(index)
        return {"worker": index, "pid": pid}

    def _sigterm(self, index: int, duration: float) -> dict[str, Any]:
        code = self._world.terminate_worker(index)
        self._stop.wait(duration / 2)
        self._world.start_worker(index)
        return {"worker": index, "exit_code": code}

    def _rate_limit(self, target: str, rate: float) -> dict[str, Any]:
        """A rolling restart of the fleet with a new rate; recorded when it is in force."""
        before = self._world.rates[target] or 0.0
        started = time.time()
        self._world.set_rate_limit(target, rate)
        effective = started if rate > before else time.time()
        return {"target": target, "rate": rate, "effective_t": effective}

    def _broker_cut(self, duration: float) -> dict[str, Any]:
        return {"connections": self._world.broker_cut()}

    def _node_stop(self, node: int, duration: float) -> dict[str, Any]:
        self._world.node_stop(node)
        try:
            self._stop.wait(duration)
        finally:
            back_in = self._world.node_start(node)
        return {"node": node, "back_in_s": round(back_in, 1)}

    def _target_down(self, target: str, duration: float) -> dict[str, Any]:
        self._world.target_down(target)
        try:
            self._stop.wait(duration)
        finally:
            self._world.target_up(target)
        return {"target": target, "mode": "refuse"}

    def _store_pause(self, duration: float) -> dict[str, Any]:
        self._world.store_pause()
        try:
            self._stop.wait(duration)
        finally:
            self._world.store_resume()
        return {"signal": "SIGSTOP"}

    def _sim_fault(self, target: str, name: str, duration: float) -> dict[str, Any]:
        faults = SIM_FAULTS[name]
        self._world.set_faults(target, **faults)
        try:
            self._stop.wait(duration)
        finally:
            with contextlib.suppress(Exception):
                self._world.clear_faults(target)
        return {"target": target, **faults}
