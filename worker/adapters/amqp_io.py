"""py-amqp's socket transport, reading the socket in chunks instead of field by field.

py-amqp reads a frame in three ``recv`` calls (its 7-byte header, the payload, the
frame-end octet), so a delivery (method, header and body frames) costs nine system calls
and nine hand-overs of the GIL to the worker's other threads, and a publisher confirm
three. :class:`BufferedTcpTransport` and :class:`BufferedSslTransport` ask ``recv`` for up
to :data:`CHUNK` bytes at a time and serve frames from what they got, so one call usually
brings several frames. What py-amqp does with the buffer is unchanged: a read cut short by
a timeout keeps its bytes for the next one. :class:`Transport` is the kombu transport that
opens connections with them (``Connection(url, transport=Transport)``).

Fewer system calls that give the GIL away on the connection thread besides:

- A read with a time limit (the consumer's ``drain_events(timeout=...)``) waits with
  ``poll`` on the socket, which stays as it is; py-amqp switches the socket to timeout mode
  and back around every such read, two ``ioctl`` calls a turn of the consumer's loop.
- The connection does not ask the broker for ``connection.blocked`` notices: nothing here
  acts on them, and with them on, py-amqp reads the socket (zero timeout) before every
  publish. A blocked connection still stops publishing, as TCP back-pressure.
"""

from __future__ import annotations

import contextlib
import errno
import select
from collections.abc import Iterator
from typing import Any, ClassVar

from amqp.connection import NEGOTIATE_CAPABILITIES
from amqp.transport import SSLTransport, TCPTransport
from kombu.transport import pyamqp

__all__ = ["CHUNK", "BufferedSslTransport", "BufferedTcpTransport", "Transport"]

#: Most bytes one ``recv`` asks for.
CHUNK = 65536
#: Reads with a time limit wait with ``poll`` (False: py-amqp's switching of the socket's
#: timeout around each of them).
POLL_WAITS = True


class _Chunked:
    """``_read`` of py-amqp's transports, asking ``recv`` for whole chunks."""

    _quick_recv: Any
    _read_buffer: bytes
    raise_on_initial_eintr: bool
    sock: Any
    #: errno values after which py-amqp's own ``_read`` tries again.
    _retry_errnos: tuple[int, ...] = (errno.EAGAIN, errno.EINTR)
    #: The time limit of the reads under way (:meth:`having_timeout`); None: no limit.
    _limit_s: float | None = None
    _poller: Any = None

    @contextlib.contextmanager
    def having_timeout(self, timeout: float | None) -> Iterator[Any]:
        """py-amqp's block of reads bounded by ``timeout``, each wait for the socket a poll."""
        if timeout is None or not POLL_WAITS:
            with super().having_timeout(timeout) as sock:  # type: ignore[misc]
                yield sock
            return
        previous, self._limit_s = self._limit_s, timeout
        try:
            yield self.sock
        finally:
            self._limit_s = previous

    def _wait_readable(self, limit_s: float) -> None:
        """Return once ``recv`` will not block; TimeoutError after ``limit_s``."""
        pending = getattr(self.sock, "pending", None)  # TLS: bytes already decrypted
        if pending is not None and pending():
            return
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
        if not self._poller.poll(limit_s * 1000):
            raise TimeoutError("timed out")  # what a socket in timeout mode raises

    def _read(self, n: int, initial: bool = False) -> bytes:
        """Exactly ``n`` bytes: from the buffer, then from the socket a chunk at a time."""
        rbuf = self._read_buffer
        if len(rbuf) >= n:  # the common case once a chunk came in: no system call
            self._read_buffer = rbuf[n:]
            return rbuf[:n]
        recv, limit_s = self._quick_recv, self._limit_s
        try:
            while len(rbuf) < n:
                try:
                    if limit_s is not None:
                        self._wait_readable(limit_s)
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
    #: No ``connection.blocked`` notices (see the module's docstring).
    negotiate_capabilities: ClassVar[dict[str, bool]] = {
        **NEGOTIATE_CAPABILITIES,
        "connection.blocked": False,
    }

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
