"""Experimental worker variants, for measuring a proposed change before anyone makes it.

``python -m bench.variants PATCH[+PATCH...]`` runs ``pabx-worker run`` (configured by the
same ``PABX_WORKER_*`` variables) after monkeypatching the named changes into this process.
The bench runs one with ``--kinds worker,worker:poll-0.5ms`` and shows it as its own row. Nothing
here is used by the worker itself: a patch that pays off should become a real change in
``worker/`` (with its tests), and be deleted from here.

Patches:

``poll-0.5ms`` / ``poll-2ms`` / ``poll-5ms``
    ``worker.consume.consumer.BUSY_POLL_S`` set to 0.5 / 2 / 5 ms (default 10 ms): how much the
    connection thread's polling matters.
``single-acks``
    One ``basic.ack`` per delivery instead of one ``multiple`` ack per run of consecutive
    confirmed deliveries.
``amqp-unbuffered``
    py-amqp reads the socket field by field (three ``recv`` calls a frame) instead of in
    chunks of ``worker.adapters.amqp_io.CHUNK``.
``amqp-py-waits``
    py-amqp's own waits: the socket switched to timeout mode and back around each read
    with a time limit, and ``connection.blocked`` notices asked for (a zero-timeout read
    before every publish).
``gc-default``
    The interpreter's own collector settings (700 allocations between young collections,
    nothing frozen) instead of those ``pabx-worker run`` sets.
``prefetch-1x`` / ``prefetch-2x``
    The broker hands over CONCURRENCY / twice CONCURRENCY deliveries at a time.
``switch-0.5ms`` / ``switch-1ms``
    ``sys.setswitchinterval(0.0005)`` / ``(0.001)`` (default 5 ms): how much GIL hand-over
    delays between the connection thread and the 32 HTTP threads matter.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def _poll(seconds: float) -> Callable[[], None]:
    def patch() -> None:
        import worker.consume.consumer

        worker.consume.consumer.BUSY_POLL_S = seconds

    return patch


def _switch(seconds: float) -> Callable[[], None]:
    def patch() -> None:
        sys.setswitchinterval(seconds)

    return patch


def _single_acks() -> None:
    from worker.consume.acks import Acks

    def flush(self: Acks) -> list[tuple[int, bool]]:
        frames = [(tag, False) for tag in sorted(self._ready)]
        for tag in self._ready:
            self._gone.add(tag)
        self._ready.clear()
        while self._open and self._open[0] in self._gone:
            self._gone.remove(self._open.popleft())
        return frames

    Acks.flush = flush  # type: ignore[method-assign]


def _gc_default() -> None:
    import worker.runtime

    worker.runtime.tune_gc = lambda: None  # type: ignore[assignment]


def _prefetch(per_thread: int) -> Callable[[], None]:
    def patch() -> None:
        import worker.consume.consumer

        worker.consume.consumer.PREFETCH_PER_THREAD = per_thread

    return patch


def _amqp_unbuffered() -> None:
    import worker.adapters.amqp_io

    worker.adapters.amqp_io.CHUNK = 0  # recv exactly what py-amqp asks for, as py-amqp does


def _amqp_py_waits() -> None:
    import amqp.connection

    import worker.adapters.amqp_io

    worker.adapters.amqp_io.POLL_WAITS = False
    worker.adapters.amqp_io._Connection.negotiate_capabilities = (
        amqp.connection.NEGOTIATE_CAPABILITIES
    )


PATCHES: dict[str, Callable[[], None]] = {
    "amqp-py-waits": _amqp_py_waits,
    "amqp-unbuffered": _amqp_unbuffered,
    "prefetch-1x": _prefetch(1),
    "prefetch-2x": _prefetch(2),
    "gc-default": _gc_default,
    "single-acks": _single_acks,
    "poll-0.5ms": _poll(0.0005),
    "poll-2ms": _poll(0.002),
    "poll-5ms": _poll(0.005),
    "switch-0.5ms": _switch(0.0005),
    "switch-1ms": _switch(0.001),
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
