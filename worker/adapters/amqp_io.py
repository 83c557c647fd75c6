"""py-amqp's socket transport, reading the socket in chunks instead of field by field.

py-amqp reads a frame in three ``recv`` calls (its 7-byte header, the payload, the
frame-end octet), so a delivery (method, header and body frames) costs nine system calls
and nine hand-overs of the GIL to the worker's other threads, and a publisher confirm
three. :class:`BufferedTcpTransport` and :class:`BufferedSslTransport` ask ``recv`` for up
to :data:`CHUNK` bytes at a time and serve frames from what they got, so one call usually
brings several frames. What py-amqp does with the buffer is unchanged: a read cut short by
a timeout keeps its bytes for the next one. :class:`Transport` is the kombu transport that
opens connections with them (``Connection(url, transport=Transport)``).
"""

from __future__ import annotations

import errno
from typing import Any

from amqp.transport import SSLTransport, TCPTransport
from kombu.transport import pyamqp

__all__ = ["CHUNK", "BufferedSslTransport", "BufferedTcpTransport", "Transport"]

#: Most bytes one ``recv`` asks for.
CHUNK = 65536


class _Chunked:
    """``_read`` of py-amqp's transports, asking ``recv`` for whole chunks."""

    _quick_recv: Any
    _read_buffer: bytes
    raise_on_initial_eintr: bool
    #: errno values after which py-amqp's own ``_read`` tries again.
    _retry_errnos: tuple[int, ...] = (errno.EAGAIN, errno.EINTR)

    def _read(self, n: int, initial: bool = False) -> bytes:
        """Exactly ``n`` bytes: from the buffer, then from the socket a chunk at a time."""
        rbuf = self._read_buffer
        if len(rbuf) >= n:  # the common case once a chunk came in: no system call
            self._read_buffer = rbuf[n:]
            return rbuf[:n]
        recv = self._quick_recv
        try:
            while len(rbuf) < n:
                try:
                    chunk = recv(max(n - len(rbuf), CHUNK))
                except OSError as exc:
                    if exc.errno in self._retry_errnos:
                        if initial and self.raise_on_initial_eintr:
                            raise TimeoutError() from None
                        continue
                    raise
                if not chunk:
                    raise OSError("Server unexpectedly closed connection")
                rbuf += chunk
        except BaseException:
            self._read_buffer = rbuf  # kept for the next read, as py-amqp does
            raise
        self._read_buffer = rbuf[n:]
        return rbuf[:n]


class BufferedTcpTransport(_Chunked, TCPTransport):  # type: ignore[misc]
    """py-amqp's TCP transport with chunked reads."""


class BufferedSslTransport(_Chunked, SSLTransport):  # type: ignore[misc]
    """py-amqp's TLS transport with chunked reads (``ssl.SSLSocket.read`` gives at most one
    TLS record, 16 KB, a call)."""

    _retry_errnos = (errno.ENOENT, errno.EAGAIN, errno.EINTR)


class _Connection(pyamqp.Connection):  # type: ignore[misc]
    def Transport(
        self,
        host: str,
        connect_timeout: float | None,
        ssl: Any = False,
        read_timeout: float | None = None,
        write_timeout: float | None = None,
        socket_settings: Any = None,
        **kwargs: Any,
    ) -> TCPTransport:
        cls = BufferedSslTransport if ssl else BufferedTcpTransport
        return cls(  # as amqp.transport.Transport builds its two
            host,
            connect_timeout=connect_timeout,
            ssl=ssl,
            read_timeout=read_timeout,
            write_timeout=write_timeout,
            socket_settings=socket_settings,
            **kwargs,
        )


class Transport(pyamqp.Transport):  # type: ignore[misc]
    """kombu's py-amqp transport, its connections reading in chunks."""

    Connection = _Connection
