"""What a bench run is asked to do: the consumer kinds, the options, and the one error."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

__all__ = [
    "KINDS",
    "REPO",
    "BenchError",
    "Options",
    "is_worker",
    "label",
    "require_loopback",
    "tag",
]

REPO = Path(__file__).resolve().parent.parent

KINDS = ("worker", "pika", "faststream")
LABELS = {"worker": "pabx-worker", "pika": "pika tutorial", "faststream": "FastStream"}


def is_worker(kind: str) -> bool:
    """``worker``, or ``worker:PATCH+PATCH`` (an experimental variant, see bench.variants)."""
    return kind == "worker" or kind.startswith("worker:")


def tag(kind: str) -> str:
    """A file-name friendly form of a kind."""
    return kind.replace(":", "-").replace("+", "-")


def label(kind: str) -> str:
    if kind.startswith("worker:"):
        return f"pabx-worker [{kind.partition(':')[2]}]"
    return LABELS[kind]


class BenchError(Exception):
    """A scenario could not be run (a process did not start, the broker refused, …)."""


@dataclass
class Options:
    amqp_url: str
    commands: int = 5000
    latencies: tuple[float, ...] = (0.0, 20.0)
    concurrency: int = 32
    store: str = "sqlite"
    #: The command queue's type (``QUEUE_TYPE``), for every consumer.
    queue_type: str = "quorum"
    kinds: tuple[str, ...] = KINDS
    scale: bool = False
    #: With ``scale``: the worker's process counts, and the stores they share.
    scale_processes: tuple[int, ...] = (1, 2)
    scale_stores: tuple[str, ...] = ("sqlite", "redis", "postgres")
    repeat: int = 1
    tutorial_commands: int | None = None
    paced: bool = True
    paced_seconds: float = 6.0
    #: A fixed rate for every paced run (None: half of each consumer's own drain rate).
    paced_rate: float | None = None
    batch_commands: int = 20_000
    idle: bool = True
    idle_seconds: float = 3.0
    soak: int = 0
    soak_chunk: int = 10_000
    peer_confirms: bool = True
    #: Paced runs also deliver their commands to a bare consumer (bench.probe).
    probe: bool = False
    redis_url: str = "redis://127.0.0.1:6379/14"
    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/test"
    log_dir: Path = REPO / "bench" / "results" / "logs"
    py_spy_dir: Path | None = None
    #: py-spy record options: only the thread holding the GIL, 100 Hz, without pausing it.
    py_spy_args: tuple[str, ...] = ("--gil", "--rate", "100", "--nonblocking")
    progress: Callable[[str], None] = print


def require_loopback(url: str, what: str) -> None:
    """The bench only talks to servers on this machine."""
    host = urlsplit(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise BenchError(f"{what} must be on a loopback address (127.0.0.0/8, ::1), got {host!r}")
