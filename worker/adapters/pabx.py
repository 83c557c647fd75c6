"""The PABX client: ``POST {url}/requests/{channelID}/executa-desvio`` over kept-alive HTTP/1.1.

Only this module speaks HTTP to the PABX; its failures and non-200 answers are mapped here
to :mod:`worker.contract.errors`.

Why HTTP/1.1 by hand
    The worker sends one kind of request (a small ``POST`` with a JSON body) and needs one
    thing from the answer (its status), on up to ``CONCURRENCY`` threads at once. A request
    is written as one buffer and the answer read in chunks of 64 KiB, its head parsed just
    enough to find where it ends (``Content-Length``, ``chunked`` or the end of the
    connection). That costs about a quarter of the CPU per request that urllib3's pool
    costs (74 against 326 µs in one run of ``python -m bench.micro``), and CPU per command
    is what bounds a worker's throughput. h11, the sans-IO HTTP/1.1 library, spends about
    70 µs to frame such a request and parse its answer; the parser here about 3 µs. urllib3
    still builds the TLS contexts.

Time bound
    Socket timeouts bound each socket operation, not a request: a PABX trickling its answer
    a byte at a time would hold a request open forever. One request as a whole (connect,
    TLS handshake, send, the whole answer) is therefore bounded by
    ``connect_timeout_s + read_timeout_s``. Each :class:`HttpPabx` owns one watchdog thread,
    the *reaper*, with a heap of (deadline, watch): a request registers a watch (a heap push
    under a lock, no thread of its own), the socket carrying it attaches itself to that
    watch, and when the deadline passes while the request is still running the reaper shuts
    the socket down, so the blocked read fails at once. The socket is detached from its
    watch as soon as the answer is read, so a watch firing later leaves it alone; an answer
    read in full stands even if its watch fired just after, and a connection shut down then
    is closed instead of kept.

TLS
    An ``https://`` target is verified against the system CAs, or its ``ca_file``, host name
    included; ``cert_file``/``key_file`` are the client certificate for mutual TLS;
    ``verify = false`` turns verification off (warned once, at construction). Each target
    has its own SSL context, built once, and its own connections: two targets on one host
    never share one. Given ``targets``, the constructor builds every context up front and
    fails with a :class:`~worker.contract.errors.ConfigurationError` naming the target and
    the key of a file it cannot load; a target it was not given gets its context on its
    first request, and a file that cannot be loaded then fails that request
    (:class:`~worker.contract.errors.PabxTlsError`).

Classification
    *Refused* (:class:`~worker.contract.errors.PabxTlsError`, permanent): a TLS handshake that no
    retry can fix: our verification failed (unknown CA, wrong host name, expired), or the
    PABX sent a fatal alert about certificates (ours missing, unknown, expired …). An alert
    arriving after the request was written still means the PABX never read it: TLS 1.3
    lets a client write before the server has checked the client's certificate.
    *Not sent* (:class:`~worker.contract.errors.PabxUnreachable`): connection refused, DNS failure,
    connect timeout, any other failure before the first byte of the request was written (a
    TLS handshake cut short included), the time bound reached before that; and the answers
    429 and 503 (:class:`~worker.contract.errors.PabxUnavailable`).
    *Ambiguous* (:class:`~worker.contract.errors.PabxOutcomeUnknown`): once the request was written,
    a read timeout, a reset or close of the connection, an answer that is not HTTP or is
    cut short at the time bound (even if its status line had come); and the answers 500,
    502 and 504. Other non-200 answers are permanent
    (:func:`~worker.contract.errors.error_for_status`). Messages name the failure, never a
    secret.

Keep-alive
    A pooled connection the PABX has closed (or that holds bytes nobody asked for) is found
    by a zero-timeout poll when it is taken and replaced; besides, a connection idle for
    longer than ``idle_timeout_s`` (keep it below the PABX's keep-alive timeout) is closed
    and replaced instead of reused, so a request never meets a socket the PABX is closing.
    At most ``pool_size`` idle connections are kept per target; more are opened when more
    requests run at once, and closed when they come back to a full pool.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import json
import logging
import math
import re
import select
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from urllib3.util import parse_url
from urllib3.util.ssl_ import create_urllib3_context

from worker.contract.errors import (
    ConfigurationError,
    PabxError,
    PabxOutcomeUnknown,
    PabxPermanentError,
    PabxTlsError,
    PabxUnreachable,
    error_for_status,
)
from worker.contract.settings import PabxTarget
from worker.tracing import NO_TRACING, Tracing

__all__ = ["OPERATION", "HttpPabx"]

#: The vendor operation relayed today.
OPERATION = "executa-desvio"

#: How soon the reaper tries again to cut a request whose socket is not there yet.
_RETRY_CUT_S = 0.02
#: Bytes asked of the socket per read.
_CHUNK = 65536
#: Longest answer head (status line and headers) read.
_MAX_HEAD = 65536
#: Longest answer body read and thrown away; a longer one closes the connection instead.
_MAX_BODY = 1 << 20
#: Fatal alerts a TLS server sends when it will not take our certificate or settings.
_REFUSALS = frozenset(
    {
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",  # TLS 1.2: no client certificate, no shared cipher
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "TLSV1_ALERT_ACCESS_DENIED",
        "TLSV1_ALERT_INSUFFICIENT_SECURITY",
        "TLSV1_ALERT_PROTOCOL_VERSION",
        "TLSV1_ALERT_UNKNOWN_CA",
    }
)
#: OpenSSL's wrapping of a message: ``[SSL: REASON] message (_ssl.c:1006)``.
_SSL_NOISE = re.compile(r"^\[[A-Z0-9_: ]+\]\s*|\s*\(_ssl\.c:\d+\)$")

log = logging.getLogger("pabx_worker.pabx")


class _Watch:
    """One request's deadline and the socket carrying it; guarded by the reaper's lock."""

    __slots__ = ("active", "cut", "deadline", "fired", "lock", "sent", "sock")

    def __init__(self, deadline: float, lock: threading.Lock) -> None:
        self.deadline = deadline
        self.lock = lock
        self.sock: socket.socket | None = None
        #: False once the request is over: the reaper leaves it alone.
        self.active = True
        #: The deadline passed while the request was running.
        self.fired = False
        #: The first byte of the request was about to be written.
        self.sent = False
        #: The reaper shut the socket down before the answer was read in full.
        self.cut = False

    def attach(self, sock: socket.socket | None) -> None:
        with self.lock:
            self.sock = sock

    def start_sending(self) -> None:
        """Mark the request sent, unless its time bound has passed (then it never will be)."""
        with self.lock:
            if self.fired:
                raise _DeadlinePassed("time bound passed before the request was sent")
            self.sent = True


class _DeadlinePassed(ConnectionAbortedError):
    """Raised instead of writing a request whose time bound has already passed."""


class _BadAnswer(Exception):
    """The PABX's answer is not an HTTP/1.x answer this client can read."""


class _ConnectFailed(Exception):
    """Opening the connection failed (TCP or TLS): the request was not sent."""

    def __init__(self, cause: BaseException, *, timed_out: bool) -> None:
        super().__init__(cause)
        self.cause = cause
        self.timed_out = timed_out


#: One encoder for request bodies: ``json.dumps`` with options builds a new one each call.
_JSON = json.JSONEncoder(ensure_ascii=False)


def _open_socket(address: tuple[str, int], timeout_s: float) -> socket.socket:
    """A connected TCP socket, Nagle off."""
    sock = socket.create_connection(address, timeout=timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class _Conn:
    """One kept-alive connection: its socket and the bytes read but not yet used."""

    __slots__ = ("buf", "idle_since", "poller", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.idle_since = 0.0
        self.poller: select.poll | None = None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def dropped(self) -> bool:
        """Closed by the PABX, or holding bytes nobody asked for, while it was idle."""
        if self.buf or (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()):
            return True
        try:
            if self.poller is None:
                self.poller = select.poll()
                self.poller.register(self.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
            return bool(self.poller.poll(0))
        except (OSError, ValueError):
            return True

    def _fill(self) -> None:
        data = self.sock.recv(_CHUNK)
        if not data:
            raise ConnectionAbortedError("the PABX closed the connection")
        self.buf += data

    def read_answer(self) -> tuple[int, bool]:
        """Read one whole answer: its status, and whether the connection can carry another."""
        while True:
            status, keep, length, chunked = self._read_head()
            if not 100 <= status < 200:
                break
        if chunked:
            keep = self._skip_chunked() and keep
        elif length is not None:
            keep = self._skip(length) and keep
        elif status not in (204, 304):
            self._skip_to_eof()
            keep = False
        return status, keep and not self.buf

    def _read_head(self) -> tuple[int, bool, int | None, bool]:
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_HEAD:
                raise _BadAnswer(f"answer head longer than {_MAX_HEAD} bytes")
            self._fill()
        lines = bytes(buf[:end]).split(b"\r\n")
        del buf[: end + 4]
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise _BadAnswer("not an HTTP/1.x status line")
        keep = version == b"HTTP/1.1"
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise _BadAnswer("header line without a colon")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _BadAnswer("Content-Length is not a number") from None
                if length < 0:
                    raise _BadAnswer("Content-Length is negative")
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                token = value.strip().lower()
                keep = (keep and token != b"close") or token == b"keep-alive"
        return int(code), keep, length, chunked

    def _skip(self, length: int) -> bool:
        """Read ``length`` body bytes past; False (and nothing read) when too long to keep."""
        if length > _MAX_BODY:
            return False
        while len(self.buf) < length:
            self._fill()
        del self.buf[:length]
        return True

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > _MAX_HEAD:
                raise _BadAnswer("chunk line too long")
            self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    def _skip_chunked(self) -> bool:
        total = 0
        while True:
            try:
                size = int(self._line().partition(b";")[0], 16)
            except ValueError:
                raise _BadAnswer("chunk size is not a number") from None
            if size == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return True
            total += size
            if total > _MAX_BODY or not self._skip(size + 2):
                return False

    def _skip_to_eof(self) -> None:
        """Read a body that ends with the connection; the status is known already, so a TLS
        peer closing without ``close_notify``, or a reset, just ends it."""
        total = len(self.buf)
        self.buf.clear()
        while total <= _MAX_BODY:
            try:
                data = self.sock.recv(_CHUNK)
            except (ssl.SSLEOFError, ConnectionResetError):
                return
            if not data:
                return
            total += len(data)


class _Route:
    """How one target is reached: address, TLS context, path prefix and idle connections."""

    __slots__ = ("address", "host_header", "idle", "prefix", "server_hostname", "tls")

    def __init__(
        self, address: tuple[str, int], host_header: str, prefix: str, tls: ssl.SSLContext | None
    ) -> None:
        self.address = address
        self.host_header = host_header
        self.prefix = prefix
        self.tls = tls
        self.server_hostname = address[0]
        #: Idle connections, the most recently used last (deque ends are thread-safe).
        self.idle: deque[_Conn] = deque()

    def take(self, idle_timeout_s: float) -> _Conn | None:
        """The most recently used idle connection still fit to use, or None."""
        now = time.monotonic()
        while True:
            try:
                conn = self.idle.pop()
            except IndexError:
                return None
            if now - conn.idle_since <= idle_timeout_s and not conn.dropped():
                return conn
            conn.close()

    def give_back(self, conn: _Conn, keep_at_most: int) -> None:
        if len(self.idle) >= keep_at_most:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self.idle.append(conn)

    def clear(self) -> None:
        while True:
            try:
                self.idle.pop().close()
            except IndexError:
                return


def _route_key(target: PabxTarget) -> tuple[Any, ...]:
    return (
        target.name,
        target.url,
        target.ca_file,
        target.cert_file,
        target.key_file,
        target.verify,
    )


def _readable(name: str, key: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigurationError(
            f"pabx.{name}.{key}: cannot read {path}: {exc.strerror or exc}"
        ) from exc


def _load(what: str, load: Callable[[], None]) -> None:
    try:
        load()
    except (OSError, ValueError) as exc:  # ssl.SSLError: not PEM, key not matching
        raise ConfigurationError(f"{what}: {exc}") from exc


def _ssl_context(target: PabxTarget, name: str) -> ssl.SSLContext:
    """The target's client TLS context: its trust, its client certificate, verification."""
    if not target.verify:
        return _with_client_cert(create_urllib3_context(cert_reqs=ssl.CERT_NONE), target, name)
    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    context.check_hostname = True
    ca_file = target.ca_file
    if ca_file is None:
        context.load_default_certs()
    else:
        _load(
            f"pabx.{name}.ca_file: cannot load {ca_file}",
            lambda: context.load_verify_locations(cafile=ca_file),
        )
    return _with_client_cert(context, target, name)


def _with_client_cert(context: ssl.SSLContext, target: PabxTarget, name: str) -> ssl.SSLContext:
    cert_file, key_file = target.cert_file, target.key_file
    if cert_file is not None:
        _load(
            f"pabx.{name}.cert_file: cannot load {cert_file} with key_file {key_file}",
            lambda: context.load_cert_chain(cert_file, key_file),
        )
    return context


def _check_files(target: PabxTarget, name: str) -> None:
    """Every TLS file the target names can be read; a key needs its certificate."""
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(target, key)
        if path is not None:
            _readable(name, key, path)
    if target.key_file is not None and target.cert_file is None:
        raise ConfigurationError(f"pabx.{name}.key_file: needs cert_file, the certificate")


def _header_safe(value: str) -> bool:
    """Can go in an HTTP header as it is: printable ASCII, no line break."""
    return value.isascii() and value.isprintable()


def _make_route(target: PabxTarget, name: str) -> _Route:
    """How to reach ``target``; ConfigurationError naming a TLS file it cannot use."""
    _check_files(target, name)
    url = parse_url(target.url)
    scheme = url.scheme or "http"
    if url.host is None:
        raise ConfigurationError(f"pabx.{name}.url: no host in {target.url}")
    default_port = 443 if scheme == "https" else 80
    port = url.port or default_port
    host_header = url.host if port == default_port else f"{url.host}:{port}"
    tls = _ssl_context(target, name) if scheme == "https" else None
    address = (url.host.strip("[]"), port)
    return _Route(address, host_header, (url.path or "").rstrip("/"), tls)


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps (arguments, cause, context)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo.extend(arg for arg in current.args if isinstance(arg, BaseException))
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


def _tls_refusal(exc: BaseException) -> str | None:
    """Why the TLS handshake failed for good, or None if it did not, or might not."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return _SSL_NOISE.sub("", str(cause))
        if isinstance(cause, ssl.SSLError) and cause.reason in _REFUSALS:
            return f"refused by the PABX: {_SSL_NOISE.sub('', str(cause))}"
    return None


class _Reaper:
    """One watchdog thread: shuts the socket of a request past its deadline down."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._wake = threading.Condition(self.lock)
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        #: When the thread wakes next on its own: a later deadline needs no notify.
        self._wake_at = math.inf

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def watch(self, bound_s: float) -> _Watch:
        """Register a request that must be over within ``bound_s``; starts the thread lazily."""
        watch = _Watch(time.monotonic() + bound_s, self.lock)
        with self.lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pabx-reaper", daemon=True)
                self._thread.start()
            heapq.heappush(self._heap, (watch.deadline, next(self._seq), watch))
            if watch.deadline < self._wake_at:
                self._wake_at = watch.deadline
                self._wake.notify()
        return watch

    def release(self, watch: _Watch) -> bool:
        """The request is over: drop it, and the finished requests behind it, off the heap top.

        Deadlines are mostly in request order, so the heap stays about as long as the
        requests in flight and the thread sleeps until a deadline that may matter. Returns
        whether the reaper had cut the request's socket.
        """
        with self.lock:
            watch.active = False
            watch.sock = None
            heap = self._heap
            while heap and not heap[0][2].active:
                heapq.heappop(heap)
            return watch.cut

    def stop(self) -> None:
        """Stop and join the thread; the next :meth:`watch` starts another."""
        with self.lock:
            thread, self._thread = self._thread, None
            self._wake_at = math.inf
            self._wake.notify()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        me = threading.current_thread()
        with self.lock:
            while self._thread is me:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    _, _, watch = heapq.heappop(self._heap)
                    if watch.active and not self._cut(watch):
                        heapq.heappush(self._heap, (now + _RETRY_CUT_S, next(self._seq), watch))
                self._wake_at = self._heap[0][0] if self._heap else math.inf
                self._wake.wait(self._wake_at - now if self._heap else None)

    @staticmethod
    def _cut(watch: _Watch) -> bool:
        """Shut the request's socket down (lock held); False to try again shortly."""
        watch.fired = True
        sock = watch.sock
        if sock is None:
            return False  # connecting, or between connections
        try:
            # The plain socket's shutdown, also for an SSLSocket: the blocked read sees EOF.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            return False
        watch.cut = True
        return True


class HttpPabx:
    """A :class:`~worker.consume.pipeline.PabxClient` over HTTP/1.1: pooled, kept alive, bounded."""

    def __init__(
        self,
        *,
        pool_size: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        idle_timeout_s: float = 4.0,
        targets: Mapping[str, PabxTarget] | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        """``targets``: check and prepare each one's TLS now (ConfigurationError naming it);
        ``tracing``: a child span per request, its ``traceparent`` sent to the PABX."""
        self._tracing = tracing
        self._pool_size = pool_size
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._bound_s = connect_timeout_s + read_timeout_s
        self._too_long = f"PABX answer took longer than {self._bound_s:g} s"
        self._routes: dict[tuple[Any, ...], _Route] = {}
        self._routes_lock = threading.Lock()
        for name, target in (targets or {}).items():
            if not _header_safe(target.api_key.get_secret_value()):
                raise ConfigurationError(
                    f"pabx.{name}.api_key: an HTTP header carries printable ASCII only"
                )
            self._routes[_route_key(target)] = _make_route(target, name)
            if not target.verify:
                log.warning(
                    "TLS verification is off for PABX target %s: its certificate and host "
                    "name are not checked (verify = false)",
                    name,
                    extra={"target": name},
                )
        self._reaper = _Reaper()

    def redirect(self, target: PabxTarget, channel_id: int, body: Mapping[str, str]) -> int:
        with self._tracing.request_span(target.name) as (span, trace_headers):
            try:
                status = self._redirect(target, channel_id, body, trace_headers)
            except PabxError as exc:
                if span.recording:
                    span.set({"http.response.status_code": exc.status_code})
                    span.fail(exc.code.value)
                raise
            if span.recording:
                span.set({"http.response.status_code": status})
            return status

    def _redirect(
        self,
        target: PabxTarget,
        channel_id: int,
        body: Mapping[str, str],
        trace_headers: Mapping[str, str],
    ) -> int:
        route = self._route(target)
        request = self._request(target, route, channel_id, body, trace_headers)
        watch = self._reaper.watch(self._bound_s)
        conn: _Conn | None = None
        try:
            conn = route.take(self._idle_timeout_s) or self._connect(route, watch)
            watch.attach(conn.sock)
            watch.start_sending()
            conn.sock.sendall(request)
            status, keep = conn.read_answer()
        except _ConnectFailed as exc:
            raise self._not_sent(exc.cause, watch, timed_out=exc.timed_out) from exc.cause
        except (OSError, _BadAnswer) as exc:
            if conn is not None:
                conn.close()
            raise self._failure(exc, watch) from exc
        finally:
            cut = self._reaper.release(watch)
        # An answer read in full stands, even if its watch fired right after; the
        # connection, shut down then, is not kept.
        if keep and not cut:
            route.give_back(conn, self._pool_size)
        else:
            conn.close()
        if status != 200:
            raise error_for_status(status)
        return status

    @staticmethod
    def _request(
        target: PabxTarget,
        route: _Route,
        channel_id: int,
        body: Mapping[str, str],
        trace_headers: Mapping[str, str],
    ) -> bytes:
        """The request as it goes on the wire: head and body in one buffer (one write)."""
        key = target.api_key.get_secret_value()
        if not _header_safe(key):
            raise PabxPermanentError(
                f"PABX api_key of target {target.name} cannot be sent: "
                "an HTTP header carries printable ASCII only"
            )
        payload = _JSON.encode(body).encode()
        extra = "".join(
            f"{name}: {value}\r\n"
            for name, value in trace_headers.items()
            if _header_safe(name) and _header_safe(value)
        )
        head = (
            f"POST {route.prefix}/requests/{channel_id}/{OPERATION} HTTP/1.1\r\n"
            f"Host: {route.host_header}\r\n"
            f"x-api-key: {key}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n"
            f"{extra}\r\n"
        )
        return head.encode() + payload

    def _connect(self, route: _Route, watch: _Watch) -> _Conn:
        """A new connection to the route, TLS handshake done; _ConnectFailed if not."""
        try:
            sock = _open_socket(route.address, self._connect_timeout_s)
        except OSError as exc:
            raise _ConnectFailed(exc, timed_out=isinstance(exc, TimeoutError)) from exc
        try:
            if route.tls is not None:
                sock = route.tls.wrap_socket(
                    sock, server_hostname=route.server_hostname, do_handshake_on_connect=False
                )
                watch.attach(sock)
                sock.do_handshake()
            sock.settimeout(self._read_timeout_s)
        except (OSError, ValueError) as exc:
            with contextlib.suppress(OSError):
                sock.close()
            raise _ConnectFailed(exc, timed_out=False) from exc
        return _Conn(sock)

    def _route(self, target: PabxTarget) -> _Route:
        """The target's route, made (and its SSL context built) on first use."""
        key = _route_key(target)
        route = self._routes.get(key)
        if route is None:
            with self._routes_lock:
                route = self._routes.get(key)
                if route is None:
                    try:
                        route = _make_route(target, target.name)
                    except ConfigurationError as exc:  # not checked up front: no ``targets``
                        raise PabxTlsError(f"PABX TLS not set up: {exc}") from exc
                    self._routes[key] = route
        return route

    def _not_sent(self, cause: BaseException, watch: _Watch, *, timed_out: bool) -> PabxError:
        """The error of a request that never went out (connecting, or its time bound)."""
        if watch.fired:
            return PabxUnreachable(f"PABX not reached within {self._bound_s:g} s")
        refusal = _tls_refusal(cause)
        if refusal is not None:
            return PabxTlsError(f"PABX TLS handshake failed: {refusal}")
        name = type(cause).__name__
        if timed_out:
            return PabxUnreachable(f"PABX connect timed out: {name}")
        return PabxUnreachable(f"PABX unreachable: {name}")

    def _failure(self, exc: BaseException, watch: _Watch) -> PabxError:
        if not watch.sent:  # the time bound passed first
            return self._not_sent(exc, watch, timed_out=False)
        name = type(exc).__name__
        if watch.fired:
            return PabxOutcomeUnknown(self._too_long)
        refusal = _tls_refusal(exc)
        if refusal is not None:
            return PabxTlsError(f"PABX TLS handshake failed: {refusal}")
        if isinstance(exc, TimeoutError):
            return PabxOutcomeUnknown(f"PABX timed out after the request was sent: {name}")
        if isinstance(exc, _BadAnswer):
            return PabxOutcomeUnknown(f"PABX answer unreadable after the request was sent: {exc}")
        return PabxOutcomeUnknown(f"PABX connection lost after the request was sent: {name}")

    def close(self) -> None:
        """Close the idle connections and stop the reaper thread."""
        with self._routes_lock:
            for route in self._routes.values():
                route.clear()
        self._reaper.stop()
