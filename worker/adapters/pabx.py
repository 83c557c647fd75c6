"""The PABX client: ``POST {url}/requests/{channelID}/executa-desvio`` over pooled keep-alive.

Only this module knows the HTTP library (urllib3: a fraction of the CPU per call that
``requests`` spends, which bounds a worker's throughput); its exceptions and non-200
answers are mapped here to :mod:`worker.contract.errors`.

Time bound
    urllib3's ``Timeout(connect, read)`` bounds each socket operation, not a request: a
    PABX trickling its answer a byte at a time would hold a request open forever. One
    request as a whole (connect, TLS handshake, send, status line, headers, body) is
    therefore bounded by ``connect_timeout_s + read_timeout_s``. Each :class:`HttpPabx` owns
    one watchdog thread, the *reaper*, with a heap of (deadline, watch): a request registers
    a watch (a heap push under a lock, no thread of its own), the connection carrying it
    attaches itself to that watch, and when the deadline passes while the request is still
    running the reaper shuts the connection's socket down, so the blocked read fails at
    once. The connection is detached from its watch as soon as the answer is read, so a
    watch firing later leaves it alone; one shut down just before (an answer complete at
    the very deadline) goes back to the pool, where urllib3 finds it dead and replaces it.

TLS
    An ``https://`` target is verified against the system CAs, or its ``ca_file``, host name
    included; ``cert_file``/``key_file`` are the client certificate for mutual TLS;
    ``verify = false`` turns verification off (warned once, at construction). Each target
    has its own SSL context, built once, and so its own pool: urllib3 keys pools by scheme,
    host, port *and* TLS settings, so two targets on one host never share a connection.
    Given ``targets``, the constructor builds every context up front and fails with a
    :class:`~worker.contract.errors.ConfigurationError` naming the target and the key of a file it
    cannot load; a target it was not given gets its context on its first request, and a
    file that cannot be loaded then fails that request
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
    a read timeout, a reset or close of the connection, an answer cut short at the time
    bound (even if its status line had come); and the answers 500, 502 and 504. Other
    non-200 answers are permanent (:func:`~worker.contract.errors.error_for_status`). Messages name
    the failure, never a secret.

Keep-alive
    urllib3 drops a pooled connection it finds closed by the PABX; besides, a connection
    idle for longer than ``idle_timeout_s`` (keep it below the PABX's keep-alive timeout) is
    closed and replaced instead of reused, so a request never meets a socket the PABX is
    closing.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import math
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError, ReadTimeoutError
from urllib3.util import parse_url
from urllib3.util.ssl_ import create_urllib3_context
from urllib3.util.ssl_match_hostname import CertificateError

from worker.contract.errors import (
    ConfigurationError,
    PabxError,
    PabxOutcomeUnknown,
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
#: Pools kept at least (one per https target, one per plain host); more when more targets.
_MIN_POOLS = 8
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
    """One request's deadline and the connection carrying it; guarded by the reaper's lock."""

    __slots__ = ("active", "conn", "cut", "deadline", "fired", "lock", "sent")

    def __init__(self, deadline: float, lock: threading.Lock) -> None:
        self.deadline = deadline
        self.lock = lock
        self.conn: HTTPConnection | None = None
        #: False once the request is over: the reaper leaves it alone.
        self.active = True
        #: The deadline passed while the request was running.
        self.fired = False
        #: The first byte of the request was about to be written.
        self.sent = False
        #: The reaper shut the socket down before the answer was read in full.
        self.cut = False


class _Current(threading.local):
    """The watch of the request this thread is making, set around the urllib3 call."""

    watch: _Watch | None = None


_current = _Current()


class _DeadlinePassed(ConnectionAbortedError):
    """Raised instead of writing a request whose time bound has already passed."""


def _attach(conn: HTTPConnection) -> _Watch | None:
    watch = _current.watch
    if watch is not None and watch.conn is not conn:
        with watch.lock:
            watch.conn = conn
    return watch


class _WatchedHTTPConnection(HTTPConnection):
    """Attaches itself to the current thread's watch when it connects or sends.

    The header block is held back and written with the body, in one write (one TLS
    record): the request goes out whole or not at all, and a PABX refusing our TLS
    certificate, which closes the connection as the request arrives, cannot fail the
    second of two writes before its alert can be read.
    """

    #: When the pool got the connection back; None while in use.
    idle_since: float | None = None
    #: Inside ``endheaders``: what ``send`` gets is the header block, to hold back.
    _holding = False
    #: The header block held back.
    _head: bytes | None = None

    def connect(self) -> None:
        _attach(self)
        super().connect()

    def endheaders(self, message_body: Any = None, *, encode_chunked: bool = False) -> None:
        self._head, self._holding = None, True
        try:
            super().endheaders(message_body, encode_chunked=encode_chunked)
        finally:
            self._holding = False

    def send(self, data: Any) -> None:
        if self._holding and isinstance(data, bytes):
            self._head = data if self._head is None else self._head + data
            return
        head, self._head = self._head, None
        if head is not None:
            if isinstance(data, bytes):
                data = head + data
            else:
                self._write(head)
        self._write(data)

    def _write(self, data: Any) -> None:
        watch = _attach(self)
        if watch is not None and not watch.sent:
            if self.sock is None:
                self.connect()  # what http.client would do: connect failures stay "not sent"
            with watch.lock:
                if watch.fired:
                    raise _DeadlinePassed("time bound passed before the request was sent")
                watch.sent = True
        super().send(data)

    def getresponse(self) -> Any:
        head, self._head = self._head, None
        if head is not None:  # a request without a body
            self._write(head)
        # The answer is read in full here (preload_content): detach at once, so a watch
        # firing from now on leaves the connection alone.
        response = super().getresponse()
        _detach(self)
        return response


class _WatchedHTTPSConnection(_WatchedHTTPConnection, HTTPSConnection):
    """The TLS flavour; the handshake runs in ``connect``, so it is watched too."""


def _take(conn: Any, idle_timeout_s: float) -> Any:
    """A connection leaving the pool: closed (to reconnect) if idle for too long."""
    if isinstance(conn, _WatchedHTTPConnection):
        since, conn.idle_since = conn.idle_since, None
        if since is not None and time.monotonic() - since > idle_timeout_s and not conn.is_closed:
            conn.close()
    return conn


def _detach(conn: HTTPConnection) -> None:
    watch = _current.watch
    if watch is not None and watch.conn is conn:
        with watch.lock:
            watch.conn = None


def _give_back(conn: Any) -> None:
    """A connection going back to the pool: detached from this thread's watch, timestamped."""
    if isinstance(conn, _WatchedHTTPConnection):
        _detach(conn)
        conn.idle_since = time.monotonic()


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection
    idle_timeout_s = 4.0

    def _get_conn(self, timeout: float | None = None) -> Any:
        return _take(super()._get_conn(timeout), self.idle_timeout_s)

    def _put_conn(self, conn: Any) -> None:
        _give_back(conn)
        super()._put_conn(conn)


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection
    idle_timeout_s = 4.0

    def _validate_conn(self, conn: Any) -> None:
        # urllib3's version warns on every unverified connection: ``verify = false`` is a
        # setting, warned about once when the client is made.
        if conn.is_closed:
            conn.connect()

    def _get_conn(self, timeout: float | None = None) -> Any:
        return _take(super()._get_conn(timeout), self.idle_timeout_s)

    def _put_conn(self, conn: Any) -> None:
        _give_back(conn)
        super()._put_conn(conn)


class _PoolManager(urllib3.PoolManager):
    """A PoolManager whose pools hand out watched connections and expire idle ones."""

    def __init__(self, *, idle_timeout_s: float, **connection_pool_kw: Any) -> None:
        super().__init__(**connection_pool_kw)
        self.idle_timeout_s = idle_timeout_s
        self.pool_classes_by_scheme = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}

    def _new_pool(
        self,
        scheme: str,
        host: str,
        port: int,
        request_context: dict[str, Any] | None = None,
    ) -> HTTPConnectionPool:
        pool = super()._new_pool(scheme, host, port, request_context)
        if isinstance(pool, _WatchedHTTPPool | _WatchedHTTPSPool):
            pool.idle_timeout_s = self.idle_timeout_s
        return pool


@dataclass(frozen=True, slots=True)
class _Route:
    """Where a target's requests go: its pool's key and its path prefix."""

    scheme: str
    host: str
    port: int | None
    prefix: str
    #: ``{"ssl_context": ...}`` for an https target (its own pool); None for plain HTTP.
    pool_kwargs: dict[str, Any] | None


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


def _make_route(target: PabxTarget, name: str) -> _Route:
    """How to reach ``target``; ConfigurationError naming a TLS file it cannot use."""
    _check_files(target, name)
    url = parse_url(target.url)
    scheme = url.scheme or "http"
    if url.host is None:
        raise ConfigurationError(f"pabx.{name}.url: no host in {target.url}")
    tls = {"ssl_context": _ssl_context(target, name)} if scheme == "https" else None
    return _Route(scheme, url.host, url.port, (url.path or "").rstrip("/"), tls)


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
        if isinstance(cause, ssl.SSLCertVerificationError | CertificateError):
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

    def release(self, watch: _Watch) -> None:
        """The request is over: drop it, and the finished requests behind it, off the heap top.

        Deadlines are mostly in request order, so the heap stays about as long as the
        requests in flight and the thread sleeps until a deadline that may matter.
        """
        with self.lock:
            watch.active = False
            watch.conn = None
            heap = self._heap
            while heap and not heap[0][2].active:
                heapq.heappop(heap)

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
        sock = None if watch.conn is None else watch.conn.sock
        if not isinstance(sock, socket.socket):
            return False  # connecting, or between connections
        try:
            # The plain socket's shutdown, also for an SSLSocket: the blocked read sees EOF.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            return False
        watch.cut = True
        return True


class HttpPabx:
    """A :class:`~worker.consume.pipeline.PabxClient` over urllib3: pooled, kept alive, bounded."""

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
        self._bound_s = connect_timeout_s + read_timeout_s
        self._too_long = f"PABX answer took longer than {self._bound_s:g} s"
        self._routes: dict[tuple[Any, ...], _Route] = {}
        self._routes_lock = threading.Lock()
        for name, target in (targets or {}).items():
            self._routes[_route_key(target)] = _make_route(target, name)
            if not target.verify:
                log.warning(
                    "TLS verification is off for PABX target %s: its certificate and host "
                    "name are not checked (verify = false)",
                    name,
                    extra={"target": name},
                )
        self._reaper = _Reaper()
        self._pool = _PoolManager(
            idle_timeout_s=idle_timeout_s,
            num_pools=max(_MIN_POOLS, len(targets or ())),
            maxsize=pool_size,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
        )

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
        pool = self._pool.connection_from_host(
            route.host, route.port, route.scheme, pool_kwargs=route.pool_kwargs
        )
        path = f"{route.prefix}/requests/{channel_id}/{OPERATION}"
        headers = {
            "x-api-key": target.api_key.get_secret_value(),
            "Content-Type": "application/json",
            **trace_headers,
        }
        payload = json.dumps(body, ensure_ascii=False).encode()
        watch = self._reaper.watch(self._bound_s)
        _current.watch = watch
        try:
            response = pool.urlopen(
                "POST", path, body=payload, headers=headers, retries=False, redirect=False
            )
        except HTTPError as exc:
            raise self._failure(exc, watch) from exc
        finally:
            _current.watch = None
            self._reaper.release(watch)
        if watch.cut:  # a status line came, but the rest of the answer was cut short
            raise PabxOutcomeUnknown(self._too_long)
        # An answer read in full stands, even if its watch fired right after.
        if response.status != 200:
            raise error_for_status(response.status)
        return int(response.status)

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

    def _failure(self, exc: HTTPError, watch: _Watch) -> PabxError:
        name = type(exc).__name__
        if watch.fired:
            if watch.sent:
                return PabxOutcomeUnknown(self._too_long)
            return PabxUnreachable(f"PABX not reached within {self._bound_s:g} s")
        refusal = _tls_refusal(exc)
        if refusal is not None:
            return PabxTlsError(f"PABX TLS handshake failed: {refusal}")
        if isinstance(exc, NewConnectionError):  # a ConnectTimeoutError subclass, oddly
            return PabxUnreachable(f"PABX unreachable: {name}")
        if isinstance(exc, ConnectTimeoutError):
            return PabxUnreachable(f"PABX connect timed out: {name}")
        if not watch.sent:  # TLS handshake failures (SSLError, reset, timeout) among others
            return PabxUnreachable(f"PABX unreachable: {name}")
        if isinstance(exc, ReadTimeoutError):
            return PabxOutcomeUnknown(f"PABX timed out after the request was sent: {name}")
        return PabxOutcomeUnknown(f"PABX connection lost after the request was sent: {name}")

    def close(self) -> None:
        """Close the pooled connections and stop the reaper thread."""
        self._pool.clear()
        self._reaper.stop()
