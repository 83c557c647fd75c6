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
``pg-pool-1`` / ``pg-pool-8`` / ``pg-pool-16``
    The PostgreSQL store opens at most 1 / 8 / 16 connections (default
    ``worker.adapters.store.postgres.POOL_SIZE``, 4).
``pg-pipelined``
    The PostgreSQL store's claim and first mark of a new command as two statements in one
    pipeline (one round trip, two statements for psycopg to send and read) instead of one
    call of the ``claim_send`` function.
``log-unbatched``
    The connection thread writes each command's log line as it comes (one ``write`` each)
    instead of one ``write`` for a turn's lines.
``log-warning``
    ``LOG_LEVEL=WARNING``: no line per command. What the line costs.
``sqlite-inline-checkpoints``
    SQLite's own WAL checkpoints: the commit that takes the WAL past 1000 pages copies it
    into the file, holding up the store's other steps, instead of the store's checkpoint
    thread (``worker.adapters.store.sqlite.CHECKPOINT_EVERY_S``).
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


def _pg_pool(size: int) -> Callable[[], None]:
    def patch() -> None:
        from worker.adapters.store.postgres import PostgresStore

        PostgresStore.__init__.__kwdefaults__["pool_size"] = size

    return patch


def _pg_pipelined() -> None:
    from typing import Any

    from worker.adapters.store.base import ClaimState
    from worker.adapters.store.postgres import Claim, PostgresStore, _one_row, _send_of

    def insert_and_send(
        self: Any,
        conn: Any,
        command_id: str,
        fingerprint: str,
        call: Any,
        token: str,
        now: float,
        lease_s: float,
    ) -> Any:
        until = now + lease_s
        params = {"id": command_id, "token": token, "now": now, "until": until}
        params.update(fingerprint=fingerprint, key=call.key, order=call.order)
        with conn.pipeline():
            inserted = conn.execute(self._insert, params)
            marked = conn.execute(self._mark_sent_call_sql, params)
        row = _one_row(marked.fetchone())
        if inserted.rowcount != 1 and not row[0]:
            return None
        sent = _send_of(row, command_id, call, now)
        if sent is None:
            sent = self._mark_sent_on(conn, command_id, token, call, now, lease_s)
        if inserted.rowcount == 1:
            return Claim(ClaimState.NEW, now, 0, token), sent
        return None

    PostgresStore._insert_and_send = insert_and_send  # type: ignore[method-assign]


def _log_warning() -> None:
    import worker.runtime

    configure = worker.runtime.configure_logging

    def quiet(**kwargs: object) -> None:
        configure(**{**kwargs, "level": "WARNING"})  # type: ignore[arg-type]

    worker.runtime.configure_logging = quiet  # type: ignore[assignment]


def _log_unbatched() -> None:
    import contextlib

    import worker.consume.consumer

    worker.consume.consumer.batched = contextlib.nullcontext  # type: ignore[assignment]


def _amqp_unbuffered() -> None:
    import worker.adapters.amqp_io

    worker.adapters.amqp_io.CHUNK = 0  # recv exactly what py-amqp asks for, as py-amqp does


def _sqlite_inline_checkpoints() -> None:
    from worker.adapters.store import sqlite

    sqlite.AUTOCHECKPOINT_PAGES = 1000  # SQLite's default
    sqlite.CHECKPOINT_EVERY_S = 1e9  # the thread never wakes


def _amqp_py_waits() -> None:
    import amqp.connection

    import worker.adapters.amqp_io

    worker.adapters.amqp_io.POLL_WAITS = False
    worker.adapters.amqp_io._Connection.negotiate_capabilities = (
        amqp.connection.NEGOTIATE_CAPABILITIES
    )


PATCHES: dict[str, Callable[[], None]] = {
    "amqp-py-waits": _amqp_py_waits,
    "pg-pool-1": _pg_pool(1),
    "pg-pool-8": _pg_pool(8),
    "pg-pool-16": _pg_pool(16),
    "pg-pipelined": _pg_pipelined,
    "log-warning": _log_warning,
    "log-unbatched": _log_unbatched,
    "amqp-unbuffered": _amqp_unbuffered,
    "prefetch-1x": _prefetch(1),
    "prefetch-2x": _prefetch(2),
    "gc-default": _gc_default,
    "sqlite-inline-checkpoints": _sqlite_inline_checkpoints,
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
