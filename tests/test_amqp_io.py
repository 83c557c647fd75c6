"""py-amqp's transport reading in chunks: the same frames, far fewer recv calls."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

import pytest

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


def transport(wire: Wire) -> BufferedTcpTransport:
    t = BufferedTcpTransport.__new__(BufferedTcpTransport)
    t._read_buffer = b""
    t._quick_recv = wire.recv
    t.raise_on_initial_eintr = True
    t.connected = True
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
