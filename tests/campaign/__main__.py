"""Run a campaign.

``python -m tests.campaign --minutes M --seed S [--store redis|postgres|sqlite]
[--broker single|cluster] [--history PATH]``
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
from pathlib import Path

from tests.campaign.runner import Options, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.campaign", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--store", choices=("redis", "postgres", "sqlite"), default="redis")
    parser.add_argument(
        "--broker",
        choices=("single", "cluster"),
        default="single",
        help="the machine's RabbitMQ node, or a private three-node cluster whose nodes 2 and 3"
        " the nemesis stops and starts",
    )
    parser.add_argument("--history", type=Path, default=None)
    parser.add_argument("--rate", type=float, default=50.0, help="commands per second")
    parser.add_argument("--drain", type=float, default=120.0, help="longest wait at the end (s)")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the fleet's clean-up stops the worker processes too.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    print(f"seed {seed}", flush=True)
    options = Options(
        minutes=args.minutes,
        seed=seed,
        store=args.store,
        broker=args.broker,
        history=args.history,
        rate=args.rate,
        drain_s=args.drain,
    )
    return run(options)


if __name__ == "__main__":
    sys.exit(main())
