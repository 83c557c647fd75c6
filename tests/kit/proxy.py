"""A TCP proxy that can break: cuts connections, refuses or blackholes new ones."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

__all__ = ["TcpProxy"]


class _Link:
    """One relayed connection: the client's socket and ours to the target."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        self.dead = False

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]

    def cut(self) -> None:
        """Break both sides at once (reset, as a dropped network path looks to the peers)."""
        self.dead = True
        for sock in self.sockets():
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        for sock in self.sockets():
            with contextlib.suppress(OSError):
                sock.close()


def _reusable() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _listening(port: int) -> socket.socket:
    sock = _reusable()
    sock.bind(("127.0.0.1", port))
    sock.listen()
    sock.settimeout(0.1)
    return sock


class TcpProxy:
    """Relays 127.0.0.1:``port`` to ``target``; can cut every connection and refuse new ones.

    ``refuse()``: cut everything and stop listening, so new connections are refused (a
    stopped server: the client gets ECONNREFUSED and knows nothing was sent).
    ``blackhole()``: cut everything; new connections are accepted and never answered
    (an unreachable host whose connect attempts time out). ``restore()`` relays again.
    """

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self._listener = _listening(0)
        self.port: int = self._listener.getsockname()[1]
        #: While refusing: bound, not listening, so the port stays ours and SYNs get RST.
        self._placeholder: socket.socket | None = None
        self.mode = "open"
        self.accepted = 0
        self.refused = 0
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._accept_loop, name="chaos-proxy", daemon=True)
        self._thread.start()

    @classmethod
    def for_url(cls, url: str, default_port: int) -> TcpProxy:
        parts = urlsplit(url)
        return cls(parts.hostname or "127.0.0.1", parts.port or default_port)

    def url(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        parts = urlsplit(url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    @property
    def live(self) -> int:
        with self._lock:
            return sum(1 for link in self._links if not link.dead)

    def cut(self) -> int:
        """Break every open connection; returns how many."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.cut()
        return len(links)

    def refuse(self) -> int:
        self.mode = "refuse"
        with self._lock:
            if self._placeholder is None:
                self._placeholder = _reusable()
                self._placeholder.bind(("127.0.0.1", self.port))
                self._listener.close()
        return self.cut()

    def blackhole(self) -> int:
        self.mode = "blackhole"
        return self.cut()

    def restore(self) -> None:
        with self._lock:
            if self._placeholder is not None:  # listen again on the same port
                self._listener = _listening(self.port)
                self._placeholder.close()
                self._placeholder = None
        self.mode = "open"
        with self._lock:
            held = [link for link in self._links if link.upstream is None]
        for link in held:
            link.cut()

    @contextlib.contextmanager
    def outage(self, mode: str = "refuse") -> Iterator[None]:
        self.refuse() if mode == "refuse" else self.blackhole()
        try:
            yield
        finally:
            self.restore()

    def close(self) -> None:
        self._closing = True
        self.cut()
        self._thread.join(5)
        with self._lock:
            self._listener.close()
            if self._placeholder is not None:
                self._placeholder.close()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed: refusing, or closing
                time.sleep(0.02)
                continue
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.mode == "refuse":
            self.refused += 1
            _Link(client, None).cut()
            client.close()
            return
        upstream = None
        if self.mode == "open":
            try:
                upstream = socket.create_connection(self._target, timeout=5)
            except OSError:
                client.close()
                return
            upstream.settimeout(None)
            upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(client, upstream)
        with self._lock:
            self._links.add(link)
        self.accepted += 1
        threading.Thread(target=self._pump, args=(link,), daemon=True).start()

    def _pump(self, link: _Link) -> None:
        try:
            socks = link.sockets()
            while not link.dead and not self._closing:
                readable, _, _ = select.select(socks, [], [], 0.2)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if link.upstream is None:
                        continue  # blackholed: swallow everything
                    other = link.upstream if sock is link.client else link.client
                    other.sendall(data)
        except OSError:
            pass
        finally:
            if not link.dead:
                link.cut()
            link.close()
            with self._lock:
                self._links.discard(link)
