"""Experimental worker variants, for measuring a proposed change before anyone makes it.

``python -m bench.variants PATCH[+PATCH...]`` runs ``pabx-worker run`` (configured by the
same ``PABX_WORKER_*`` variables) after monkeypatching the named changes into this process.
The bench runs one with ``--kinds worker,worker:urllib3`` and shows it as its own row. Nothing
here is used by the worker itself: a patch that pays off should become a real change in
``worker/`` (with its tests), and be deleted from here.

Patches:

``trust-env-off``
    ``HttpPabx``'s ``requests.Session`` with ``trust_env = False``: no proxy / netrc lookups
    in ``os.environ`` on every request.
``urllib3``
    ``HttpPabx`` replaced by a ``urllib3.PoolManager`` client (same errors, same timeouts,
    body encoded with ``json.dumps``): none of requests' per-call preparation.
``poll-0.5ms`` / ``poll-10ms``
    ``worker.consumer.BUSY_POLL_S`` set to 0.5 ms / 10 ms (default 2 ms): how much the
    connection thread's polling matters.
``switch-0.5ms``
    ``sys.setswitchinterval(0.0005)`` (default 5 ms): how much GIL hand-over delays between
    the connection thread and the 32 HTTP threads matter.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from typing import Any


def _trust_env_off() -> None:
    import worker.pabx

    original = worker.pabx.HttpPabx.__init__

    def init(self: Any, **kwargs: Any) -> None:
        original(self, **kwargs)
        self._session.trust_env = False

    worker.pabx.HttpPabx.__init__ = init  # type: ignore[method-assign]


def _urllib3() -> None:
    import urllib3

    import worker.app
    from worker.errors import PabxUnreachable, error_for_status
    from worker.pabx import OPERATION

    class Urllib3Pabx:
        def __init__(
            self, *, pool_size: int, connect_timeout_s: float, read_timeout_s: float
        ) -> None:
            self._pool = urllib3.PoolManager(
                num_pools=4,
                maxsize=pool_size,
                retries=False,
                timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            )

        def redirect(self, target: Any, channel_id: int, body: Mapping[str, str]) -> int:
            url = f"{target.url}/requests/{channel_id}/{OPERATION}"
            headers = {
                "x-api-key": target.api_key.get_secret_value(),
                "Content-Type": "application/json",
            }
            try:
                response = self._pool.request(
                    "POST", url, body=json.dumps(body).encode(), headers=headers
                )
            except urllib3.exceptions.TimeoutError as exc:
                raise PabxUnreachable(f"PABX timed out: {type(exc).__name__}") from exc
            except urllib3.exceptions.HTTPError as exc:
                raise PabxUnreachable(f"PABX unreachable: {type(exc).__name__}") from exc
            if response.status != 200:
                raise error_for_status(response.status)
            return int(response.status)

        def close(self) -> None:
            self._pool.clear()

    worker.app.HttpPabx = Urllib3Pabx  # type: ignore[attr-defined,misc]


def _poll(seconds: float) -> Callable[[], None]:
    def patch() -> None:
        import worker.consumer

        worker.consumer.BUSY_POLL_S = seconds

    return patch


def _switch() -> None:
    sys.setswitchinterval(0.0005)


PATCHES: dict[str, Callable[[], None]] = {
    "trust-env-off": _trust_env_off,
    "urllib3": _urllib3,
    "poll-0.5ms": _poll(0.0005),
    "poll-10ms": _poll(0.010),
    "switch-0.5ms": _switch,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    names = [n for n in (args[0] if args else "").split("+") if n]
    unknown = [n for n in names if n not in PATCHES]
    if not names or unknown:
        print(
            f"usage: python -m bench.variants PATCH[+PATCH]; patches: {', '.join(PATCHES)}",
            file=sys.stderr,
        )
        return 2
    for name in names:
        PATCHES[name]()
    from worker.cli import main as cli_main

    sys.argv = ["pabx-worker", "run"]
    cli_main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
