"""systemd ``Type=notify``: a real ``pabx-worker run`` speaks the ``sd_notify`` protocol.

The test plays systemd: it binds the datagram socket, names it in ``NOTIFY_SOCKET`` with a
short ``WATCHDOG_USEC``, and reads what the worker sends: ``READY=1`` once it consumes
(the broker sees its consumer), ``WATCHDOG=1`` again and again, ``STOPPING=1`` on SIGTERM.
"""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kit.events import Peer
from tests.kit.processes import WorkerProcess
from worker.contract.settings import Settings

pytestmark = pytest.mark.integration

#: Short, so that several pings come within a test (the unit files ask for 30 s).
WATCHDOG_USEC = 300_000


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # A short directory: a socket path must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="sd-") as directory:
        path = str(Path(directory) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(30)
        yield sock, path
        sock.close()


def receive(sock: socket.socket) -> set[str]:
    """The lines of the next datagram."""
    return set(sock.recv(4096).decode().splitlines())


def consumers(peer: Peer, queue: str) -> int:
    return int(peer.channel.queue_declare(queue, passive=True).method.consumer_count)


def test_ready_once_consuming_then_watchdog_then_stopping(
    settings: Settings, peer: Peer, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    worker = WorkerProcess(settings, NOTIFY_SOCKET=path, WATCHDOG_USEC=str(WATCHDOG_USEC))
    try:
        while "READY=1" not in (lines := receive(sock)):
            pass
        assert consumers(peer, settings.command_queue) == 1  # READY only once consuming
        assert any(line.startswith("STATUS=consuming") for line in lines)
        pings = 0
        while pings < 3:
            pings += "WATCHDOG=1" in receive(sock)
        code, _ = worker.terminate(30)
        seen: set[str] = set()
        sock.settimeout(5)
        while "STOPPING=1" not in seen:
            seen |= receive(sock)
        assert code == 0, worker.log[-3000:]
    finally:
        worker.close()


def test_no_watchdog_pings_for_another_process(
    settings: Settings, peer: Peer, notify_socket: tuple[socket.socket, str]
) -> None:
    """``WATCHDOG_PID`` names another process (a wrapper's): READY=1 still, no pings."""
    sock, path = notify_socket
    worker = WorkerProcess(
        settings, NOTIFY_SOCKET=path, WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID="1"
    )
    try:
        sent = [receive(sock)]
        while "READY=1" not in sent[-1]:
            sent.append(receive(sock))
        worker.terminate(30)
        sock.settimeout(5)
        while "STOPPING=1" not in sent[-1]:
            sent.append(receive(sock))
        assert not any("WATCHDOG=1" in lines for lines in sent)
    finally:
        worker.close()
