"""py-amqp's transport reading in chunks: the same frames, far fewer recv calls."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from amqp.connection import NEGOTIATE_CAPABILITIES

import worker.adapters.amqp_io
from worker.adapters.amqp_io import BufferedTcpTransport


def frame(channel: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", 1, channel, len(payload)) + payload + b"\xce"


class Wire:
    """A socket's recv: hands out what arrived, at most what was asked for, a part at a time."""

    def __init__(self, parts: list[bytes | BaseException]) -> None:
        self.parts = parts
        self.calls: list[int] = []

    def recv(self, n: int) -> bytes:
        self.calls.append(n)
        part = self.parts.pop(0)
        if isinstance(part, BaseException):
            raise part
        if len(part) > n:
            self.parts.insert(0, part[n:])
            part = part[:n]
        return part


def transport(wire: Wire | socket.socket) -> BufferedTcpTransport:
    """A transport reading from ``wire``, set up as py-amqp's connect would leave it."""
    t = BufferedTcpTransport.__new__(BufferedTcpTransport)
    t._read_buffer = b""
    t._quick_recv = wire.recv
    t.raise_on_initial_eintr = True
    t.connected = True
    if isinstance(wire, socket.socket):
        t.sock = wire
    return t


def frames(t: BufferedTcpTransport, n: int) -> Iterator[tuple[int, int, bytes]]:
    for _ in range(n):
        kind, channel, payload = t.read_frame()
        yield kind, channel, bytes(payload)


def test_frames_that_arrived_together_take_one_recv() -> None:
    sent = [frame(1, b"deliver"), frame(1, b"header"), frame(1, b"body" * 100), frame(3, b"ack")]
    wire = Wire([b"".join(sent)])
    got = list(frames(transport(wire), 4))
    assert got == [(1, 1, b"deliver"), (1, 1, b"header"), (1, 1, b"body" * 100), (1, 3, b"ack")]
    assert len(wire.calls) == 1  # py-amqp's own transport: three per frame, twelve


def test_a_frame_split_across_reads_and_a_timeout_keeps_its_bytes() -> None:
    whole = frame(2, b"x" * 50)
    wire = Wire([whole[:5], TimeoutError("timed out"), whole[5:30], whole[30:]])
    t = transport(wire)
    with pytest.raises(socket.timeout):
        t.read_frame()  # cut short: the 5 bytes stay in the buffer
    assert list(frames(t, 1)) == [(1, 2, b"x" * 50)]
    assert t._read_buffer == b""


def test_a_closed_connection_is_an_error() -> None:
    t = transport(Wire([frame(1, b"a")[:3], b""]))
    with pytest.raises(OSError, match="closed"):
        t.read_frame()


# --- waits with a time limit: poll, the socket left as it is ---------------------------------


@pytest.fixture
def pair() -> Iterator[tuple[BufferedTcpTransport, socket.socket]]:
    ours, broker = socket.socketpair()
    yield transport(ours), broker
    ours.close()
    broker.close()


def test_a_read_with_a_time_limit_never_switches_the_socket(
    pair: tuple[BufferedTcpTransport, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    t, broker = pair
    switched: list[float | None] = []
    monkeypatch.setattr(t, "sock", _Recording(t.sock, switched))
    broker.sendall(frame(1, b"deliver"))
    with t.having_timeout(0.5):
        assert list(frames(t, 1)) == [(1, 1, b"deliver")]
    started = time.monotonic()
    with pytest.raises(TimeoutError), t.having_timeout(0.05):
        t.read_frame()
    assert 0.04 <= time.monotonic() - started < 1.0
    assert switched == []  # py-amqp's own: settimeout(0.5), settimeout(None), twice
    # A frame cut short by the time limit keeps its bytes, as before.
    whole = frame(2, b"x" * 40)
    broker.sendall(whole[:10])
    with pytest.raises(TimeoutError), t.having_timeout(0.05):
        t.read_frame()
    broker.sendall(whole[10:])
    with t.having_timeout(0.5):
        assert list(frames(t, 1)) == [(1, 2, b"x" * 40)]


def test_a_read_without_a_time_limit_waits_as_the_socket_does(
    pair: tuple[BufferedTcpTransport, socket.socket],
) -> None:
    t, broker = pair
    threading.Timer(0.1, broker.sendall, (frame(1, b"late"),)).start()
    with t.having_timeout(None):
        assert list(frames(t, 1)) == [(1, 1, b"late")]


def test_py_amqp_waits_when_poll_waits_are_off(
    pair: tuple[BufferedTcpTransport, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    t, _ = pair
    monkeypatch.setattr(worker.adapters.amqp_io, "POLL_WAITS", False)
    switched: list[float | None] = []
    monkeypatch.setattr(t, "sock", _Recording(t.sock, switched))
    with pytest.raises(TimeoutError), t.having_timeout(0.05):
        t.read_frame()
    assert switched == [0.05, None]


def test_decrypted_tls_bytes_count_as_readable() -> None:
    class Tls:
        def pending(self) -> int:
            return 5

        def fileno(self) -> int:
            raise AssertionError("polled although bytes were waiting")

    t = BufferedTcpTransport.__new__(BufferedTcpTransport)
    t.sock = Tls()
    t._wait_readable(0.01)  # returns at once


def test_connections_do_not_ask_for_blocked_notices() -> None:
    capabilities = worker.adapters.amqp_io._Connection.negotiate_capabilities
    assert capabilities["connection.blocked"] is False
    assert {k: v for k, v in capabilities.items() if k != "connection.blocked"} == {
        k: v for k, v in NEGOTIATE_CAPABILITIES.items() if k != "connection.blocked"
    }


class _Recording:
    """A socket whose ``settimeout`` calls are recorded."""

    def __init__(self, sock: socket.socket, calls: list[float | None]) -> None:
        self._sock = sock
        self._calls = calls

    def settimeout(self, value: float | None) -> None:
        self._calls.append(value)
        self._sock.settimeout(value)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)
