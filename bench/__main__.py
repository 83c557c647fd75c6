"""``python -m bench`` (``make bench``): pabx-worker against a pika tutorial consumer and a
FastStream handler, on the local RabbitMQ and the PABX simulator, in one run.

Prints a table and writes JSON (default ``bench/results/latest.json``). Exit status 0 when
every scenario completed (every command got its outcome), 1 otherwise, 2 for bad usage.
Numbers drift on a shared 2-core machine: compare the ratios of one run, not absolute rates.

Examples::

    python -m bench                                   # 5000 commands at 0 and 20 ms
    python -m bench --commands 3000 --scale           # + 1, 2, N worker processes per store
    python -m bench --scale --scale-processes 1,2,4 --scale-stores sqlite
    python -m bench.plots bench/results/latest.json   # the plots again, from the JSON
    python -m bench --quick                           # tiny smoke run (the test suite's)
    python -m bench --kinds worker --latencies 20 --py-spy bench/results/profiles
    python -m bench --soak 100000 --kinds worker --latencies 0 --no-paced
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from bench.options import KINDS, REPO, BenchError, Options
from bench.report import print_report, write_json
from bench.results import BenchResults
from bench.run import run_bench

DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672/%2F"


def _floats(text: str) -> tuple[float, ...]:
    if text.strip().lower() == "none":  # no drains: only idle / soak / batch
        return ()
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas: {text!r}"
        ) from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("latencies must be >= 0")
    return values


def _kinds(text: str) -> tuple[str, ...]:
    from bench.variants import PATCHES

    values = tuple(v.strip() for v in text.split(",") if v.strip())
    for value in values:
        kind, _, patches = value.partition(":")
        bad = kind not in KINDS or (patches and kind != "worker")
        bad = bad or any(p not in PATCHES for p in patches.split("+") if patches)
        if bad:
            raise argparse.ArgumentTypeError(
                f"kinds are {', '.join(KINDS)}, or worker:PATCH[+PATCH] with patches"
                f" {', '.join(PATCHES)}; got {value!r}"
            )
    if not values:
        raise argparse.ArgumentTypeError("no kind given")
    return values


SCALE_STORES = ("sqlite", "redis", "postgres")


def scale_processes(text: str) -> tuple[int, ...]:
    """``1,2,N`` → (1, 2, cpu count): whole numbers >= 1 or N, deduplicated and sorted."""
    values: set[int] = set()
    for item in (v.strip() for v in text.split(",")):
        if item.upper() == "N":
            values.add(os.cpu_count() or 1)
        elif item.isascii() and item.isdigit() and int(item) >= 1:
            values.add(int(item))
        else:
            raise argparse.ArgumentTypeError(
                f"process counts are whole numbers >= 1 or N (the CPU count): {text!r}"
            )
    return tuple(sorted(values))


def scale_stores(text: str) -> tuple[str, ...]:
    """``sqlite,redis`` → ("sqlite", "redis"): stores several processes can share, in order."""
    values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not values or any(v not in SCALE_STORES for v in values):
        raise argparse.ArgumentTypeError(
            f"stores are {', '.join(SCALE_STORES)}, comma separated; got {text!r}"
        )
    return values


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("Examples::")[-1],
    )
    p.add_argument("--commands", type=_positive, default=5000, help="commands per drain (5000)")
    p.add_argument(
        "--latencies",
        type=_floats,
        default=(0.0, 20.0),
        help="PABX latencies in ms, comma separated (0,20); none: no drains",
    )
    p.add_argument(
        "--concurrency",
        type=_positive,
        default=32,
        help="worker CONCURRENCY and FastStream prefetch (32)",
    )
    p.add_argument(
        "--queue-type",
        choices=("quorum", "classic"),
        default="quorum",
        help="the command queue's type, QUEUE_TYPE, for every consumer (quorum)",
    )
    p.add_argument(
        "--store",
        choices=("sqlite", "redis", "postgres", "memory"),
        default="sqlite",
        help="the worker's idempotency store in the main scenarios (sqlite)",
    )
    p.add_argument(
        "--scale",
        action="store_true",
        help="also drain with 1, 2, … worker processes sharing each store in turn",
    )
    p.add_argument(
        "--scale-processes",
        type=scale_processes,
        default="1,2,N",
        metavar="COUNTS",
        help="worker processes with --scale; N is the CPU count (1,2,N)",
    )
    p.add_argument(
        "--scale-stores",
        type=scale_stores,
        default=",".join(SCALE_STORES),
        metavar="STORES",
        help="stores the processes share with --scale; SQLite: one file (sqlite,redis,postgres)",
    )
    p.add_argument(
        "--kinds",
        type=_kinds,
        default=KINDS,
        help="consumers to run: worker,pika,faststream (all); worker:PATCH[+PATCH] adds an"
        " experimental variant of the worker (see bench/variants.py)",
    )
    p.add_argument(
        "--repeat",
        type=_positive,
        default=1,
        help="drains per consumer and latency; the fastest is reported (1)",
    )
    p.add_argument(
        "--tutorial-commands",
        type=_positive,
        default=None,
        help="fewer commands for the one-at-a-time pika peer (same as --commands)",
    )
    p.add_argument(
        "--no-paced",
        dest="paced",
        action="store_false",
        help="skip the paced (half of max rate) latency runs",
    )
    p.add_argument("--paced-seconds", type=float, default=6.0, help="length of a paced run (6)")
    p.add_argument(
        "--paced-rate",
        type=float,
        default=None,
        metavar="R",
        help="publish every paced run at R commands/s, to compare latencies at one load"
        " (default: half of each consumer's own drain rate)",
    )
    p.add_argument(
        "--probe",
        action="store_true",
        help="paced runs also route their commands to a bare consumer of a second queue of"
        " the same type: the broker's own publish→delivery latency, command by command",
    )
    p.add_argument(
        "--batch-commands",
        type=int,
        default=20_000,
        help="commands for the batch publish measurement; 0 skips it (20000)",
    )
    p.add_argument("--no-idle", dest="idle", action="store_false", help="skip idle RSS")
    p.add_argument(
        "--soak",
        type=int,
        default=0,
        metavar="N",
        help="also drain N commands in chunks and watch the worker's RSS (0: off)",
    )
    p.add_argument(
        "--no-peer-confirms",
        dest="peer_confirms",
        action="store_false",
        help="the pika peer publishes without confirms (the bare tutorial)",
    )
    p.add_argument(
        "--amqp-url",
        default=os.environ.get(
            "PABX_WORKER_AMQP_URL", os.environ.get("TEST_AMQP_URL", DEFAULT_AMQP)
        ),
    )
    p.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    )
    p.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "BENCH_POSTGRES_URL",
            os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
        ),
    )
    p.add_argument(
        "--json",
        type=Path,
        default=REPO / "bench" / "results" / "latest.json",
        help="where to write the results (bench/results/latest.json)",
    )
    p.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        metavar="DIR",
        help="record each worker drain with py-spy (must be installed) into DIR",
    )
    p.add_argument(
        "--py-spy-args",
        default="--gil --rate 100 --nonblocking",
        help="py-spy record options with --py-spy (default: %(default)s)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny run: 50 commands, 0 ms, small batch (for the smoke test)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p


def options_from(args: argparse.Namespace) -> Options:
    options = Options(
        amqp_url=args.amqp_url,
        commands=args.commands,
        latencies=args.latencies,
        concurrency=args.concurrency,
        queue_type=args.queue_type,
        store=args.store,
        kinds=args.kinds,
        scale=args.scale,
        scale_processes=args.scale_processes,
        scale_stores=args.scale_stores,
        repeat=args.repeat,
        tutorial_commands=args.tutorial_commands,
        paced=args.paced,
        paced_seconds=args.paced_seconds,
        paced_rate=args.paced_rate,
        batch_commands=args.batch_commands,
        idle=args.idle,
        soak=args.soak,
        peer_confirms=args.peer_confirms,
        probe=args.probe,
        redis_url=args.redis_url,
        postgres_url=args.postgres_url,
        log_dir=args.json.parent / "logs",
        py_spy_dir=args.py_spy,
        py_spy_args=tuple(shlex.split(args.py_spy_args)),
        progress=(lambda _m: None) if args.quiet else (lambda m: print(m, flush=True)),
    )
    if args.quick:
        options.commands = min(args.commands, 50)
        options.latencies = (0.0,)
        options.batch_commands = min(args.batch_commands, 500)
        options.paced_seconds = 1.0
        options.idle_seconds = 1.0
    return options


def _plot(results: BenchResults, json_path: Path) -> None:
    """The PNG plots beside the JSON; without matplotlib (the bench extra), one line says so."""
    try:
        from bench.plots import write_plots
    except ImportError as exc:
        if not (exc.name or "").startswith("matplotlib"):
            raise
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return
    for path in write_plots(results, json_path):
        print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # The worker processes get exactly the settings the bench gives them.
    for key in [k for k in os.environ if k.startswith("PABX_WORKER_")]:
        del os.environ[key]
    try:
        results = run_bench(options_from(args))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    write_json(results, args.json)
    print_report(results)
    print(f"results written to {args.json}")
    _plot(results, args.json)
    failed = [r.name for r in results.runs() if not r.complete]
    for extra, part in (("batch", results.batch), ("idle", results.idle), ("soak", results.soak)):
        if part is not None and part.error:
            failed.append(extra)
    failed += [f"error: {e}" for e in results.errors]
    if failed:
        print(f"incomplete: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
