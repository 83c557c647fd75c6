"""PABX simulator: a real HTTP server imitating the Dígitro CTI API (SPEC §6).

It serves the one operation the worker relays, "Redirecionar chamada em Fila DAC"::

    POST /requests/{channelID}/executa-desvio      header x-api-key, JSON body

and answers as the vendor page describes: ``200 {}`` ("command received"), ``400`` for an
invalid request, ``401`` without an API key, ``403`` with a wrong one.  Error answers carry
``{"error": "<message naming the field>"}``.

Processing order for ``executa-desvio``:

1. the request is recorded (``arrived`` is taken before the body is read, so tests can count
   every request, answered or not) and its body is read;
2. injected faults: sleep ``latency_ms`` (or, when ``latency_max_ms > latency_ms``, a uniform
   random time between the two); then if ``hang`` wait until the client disconnects or the
   server stops (never answered: recorded ``status`` stays ``null``); then if
   ``reset_after_read`` abort the connection without answering (TCP reset; ``status`` stays
   ``null``); then if ``fail_next > 0`` decrement it and answer ``fail_status``; then with
   probability ``error_rate`` answer ``fail_status``;
3. vendor rules, first failure wins: missing/empty ``x-api-key`` → 401; wrong key → 403;
   ``channelID`` not a decimal integer (ASCII digits only, at most 19 of them; ``0`` is
   accepted) → 400; body not UTF-8 JSON object → 400; unknown field → 400; missing required
   field (``DISPOSITIVO``, ``SENHA_DISPOSITIVO``, ``DISPOSITIVO_DESTINO``, ``ID_CHAMADA``,
   ``PRIORIDADE``, ``DADOS``) → 400; any value not a JSON string → 400 (the vendor documents
   every field as a string); empty ``DISPOSITIVO``/``SENHA_DISPOSITIVO``/
   ``DISPOSITIVO_DESTINO``/``ID_CHAMADA`` → 400 (``DADOS`` may be empty);
   ``PRIORIDADE`` not a digit string with value 0..19 → 400; ``DADOS`` over 100 characters
   → 400; ``FONTE_MUSICA`` (vendor: "Limite de 10 fontes") not a digit string with value
   1..10 → 400; ``TEMPO_FILA`` / ``TEMPO_POS_ATENDIMENTO`` not digit strings → 400;
4. otherwise ``200`` with body ``{}`` (``application/json``).  With ``trickle_ms > 0`` the
   headers go out at once (``Content-Length: trickle_bytes``) and the body, ``{}`` padded with
   trailing spaces to ``trickle_bytes`` bytes, follows one byte every ``trickle_ms``
   milliseconds; it stops early if the client goes away (or the server stops, which aborts
   the connection).  Error answers are never trickled.

Every record gets ``ended`` (epoch seconds) once its answer has been fully written, or the
connection was dropped or aborted, or a hang ended (client gone, server stopping); until then
``ended`` is ``null``.  ``arrived``/``ended`` let tests check that requests did not overlap
and how long each was open.

The request ``Content-Type`` is not checked (the vendor does not document a reaction to it).

Admin API (not part of the vendor API):

=========================  ===============================================================
``GET /_sim/requests``     ``{"requests": [{"channel_id", "headers", "traceparent", "body",
                           "status", "received_at", "arrived", "ended"}]}`` in arrival order;
                           ``channel_id`` is an int or the raw path segment, ``body`` the
                           parsed JSON or the raw text, headers as received (``x-api-key``
                           included, unredacted); ``received_at`` is an ISO-8601 UTC string,
                           ``arrived``/``ended`` epoch seconds (``time.time()``), ``ended``
                           ``null`` while the request is open; ``traceparent`` is the W3C
                           trace context header the worker sent (``null`` without one).
``DELETE /_sim/requests``  forget recorded requests (204).
``PUT /_sim/faults``       JSON ``{"latency_ms", "latency_max_ms", "fail_next",
                           "fail_status", "error_rate", "hang", "reset_after_read",
                           "trickle_ms", "trickle_bytes"}``; replaces *every* setting
                           (absent keys get their defaults: 0, 0, 0, 503, 0.0, false, false,
                           0, 32; so a ``--latency-ms`` start value is reset too).  Unknown
                           keys and bad values are rejected (400 naming the key).
``GET /_sim/faults``       current fault settings.
``GET /_sim/health``       ``200 {"status": "ok"}``.
=========================  ===============================================================

HTTPS
    With ``tls_cert`` and ``tls_key`` (``--tls-cert``/``--tls-key``: PEM files) the simulator
    serves HTTPS, admin API included, and its URL is ``https://HOST:PORT``.  With
    ``client_ca`` (``--client-ca``) too it demands a client certificate signed by that CA
    (mutual TLS): a client without one, or with another CA's, is refused in the handshake
    with the alert an OpenSSL server sends (``certificate required``, ``unknown ca``), not a
    bare close, and is never recorded.  Connections still open at shutdown are aborted.  A
    key without its certificate (or the reverse), a client CA without both, or a file that
    cannot be loaded is a ValueError naming the flag.

At most 100 000 requests are remembered (oldest dropped).  The server is asyncio-based,
aiohttp disables Nagle on every connection, and access logging is off, so the simulator is
not the bottleneck of the worker's benchmarks.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import collections
import contextlib
import hmac
import json
import math
import random
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from aiohttp import web

__all__ = [
    "MAX_RECORDED_REQUESTS",
    "Faults",
    "SimulatorThread",
    "create_app",
    "parse_faults",
    "run_simulator",
    "tls_context",
]

MAX_RECORDED_REQUESTS: Final = 100_000
SHUTDOWN_TIMEOUT_S: Final = 2.0
#: Hangs, trickles and latencies of at least _WATCHED_LATENCY_S look every _POLL_S for the
#: client going away, so a recorded ``ended`` is within that of the client giving up.
_POLL_S: Final = 0.01
_WATCHED_LATENCY_S: Final = 0.1

REQUIRED_FIELDS: Final = (
    "DISPOSITIVO",
    "SENHA_DISPOSITIVO",
    "DISPOSITIVO_DESTINO",
    "ID_CHAMADA",
    "PRIORIDADE",
    "DADOS",
)
OPTIONAL_FIELDS: Final = (
    "FONTE_MUSICA",
    "TEMPO_FILA",
    "DISPOSITIVO_DESTINO_APOS_FINALIZACAO_CHAMADA",
    "TEMPO_POS_ATENDIMENTO",
)
_KNOWN_FIELDS: Final = frozenset(REQUIRED_FIELDS + OPTIONAL_FIELDS)
_NON_EMPTY_FIELDS: Final = ("DISPOSITIVO", "SENHA_DISPOSITIVO", "DISPOSITIVO_DESTINO", "ID_CHAMADA")
DADOS_MAX_CHARS: Final = 100
PRIORIDADE_RANGE: Final = (0, 19)
FONTE_MUSICA_RANGE: Final = (1, 10)

_DIGITS: Final = re.compile(r"[0-9]+")
_CHANNEL_ID: Final = re.compile(r"[0-9]{1,19}")
_OK_BODY: Final = b"{}"
_PADDING: Final = b" "

Record = dict[str, Any]


class InvalidRequest(Exception):
    """A vendor rule failed: answer ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Faults:
    """Injected fault settings, applied before the vendor rules."""

    latency_ms: float = 0
    latency_max_ms: float = 0
    fail_next: int = 0
    fail_status: int = 503
    error_rate: float = 0.0
    hang: bool = False
    reset_after_read: bool = False
    trickle_ms: float = 0
    trickle_bytes: int = 32


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    return float(value)


def _integer(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer")
    return value


def _non_negative_number(name: str, value: object) -> None:
    if _number(name, value) < 0:
        raise ValueError(f"{name} must be >= 0")


def _non_negative_integer(name: str, value: object) -> None:
    if _integer(name, value) < 0:
        raise ValueError(f"{name} must be >= 0")


def _fail_status(name: str, value: object) -> None:
    if not 400 <= _integer(name, value) <= 599:
        raise ValueError(f"{name} must be in 400..599")


def _probability(name: str, value: object) -> None:
    if not 0 <= _number(name, value) <= 1:
        raise ValueError(f"{name} must be in 0..1")


def _boolean(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false")


def _body_size(name: str, value: object) -> None:
    if _integer(name, value) < len(_OK_BODY):
        raise ValueError(f"{name} must be >= {len(_OK_BODY)}")


_FAULT_CHECKS: Final[dict[str, Callable[[str, object], None]]] = {
    "latency_ms": _non_negative_number,
    "latency_max_ms": _non_negative_number,
    "fail_next": _non_negative_integer,
    "fail_status": _fail_status,
    "error_rate": _probability,
    "hang": _boolean,
    "reset_after_read": _boolean,
    "trickle_ms": _non_negative_number,
    "trickle_bytes": _body_size,
}


def _check_fault_value(name: str, value: object) -> None:
    """Raise ValueError if ``value`` is not acceptable for fault setting ``name``."""
    _FAULT_CHECKS[name](name, value)


def parse_faults(data: object) -> Faults:
    """Build :class:`Faults` from decoded JSON; absent keys take their defaults.

    Raises ValueError naming the offending key on unknown keys or bad values.
    """
    if not isinstance(data, dict):
        raise ValueError("faults must be a JSON object")
    known = {f.name for f in fields(Faults)}
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise ValueError(f"unknown fault setting(s): {', '.join(unknown)}")
    for name, value in data.items():
        _check_fault_value(name, value)
    return Faults(**data)


# --------------------------------------------------------------------------- state


class _State:
    """Mutable simulator state shared by the handlers of one app (one event loop)."""

    def __init__(self, api_key: str, latency_ms: float) -> None:
        self.api_key = api_key.encode()
        self.faults = Faults(latency_ms=latency_ms)
        self.requests: collections.deque[Record] = collections.deque(maxlen=MAX_RECORDED_REQUESTS)
        self.stopping: asyncio.Event | None = None  # created on startup, inside the loop


_STATE: Final = web.AppKey("pabx_simulator_state", _State)


def _iso_utc(epoch: float) -> str:
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# --------------------------------------------------------------------------- vendor rules


def _check_api_key(state: _State, headers: Any) -> None:
    key = headers.get("x-api-key")
    if not key:
        raise InvalidRequest(401, "missing x-api-key header")
    if not hmac.compare_digest(key.encode(), state.api_key):
        raise InvalidRequest(403, "invalid x-api-key")


def _check_channel(raw: str) -> None:
    if _CHANNEL_ID.fullmatch(raw) is None:
        raise InvalidRequest(400, f"channelID must be an integer, got {raw!r}")


class _Body:
    """A request body as received: the parsed JSON, or the raw text when it is not JSON."""

    __slots__ = ("is_json", "utf8", "value")

    def __init__(self, raw: bytes) -> None:
        try:
            text = raw.decode("utf-8")
            self.utf8 = True
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            self.utf8 = False
        try:
            self.value: object = json.loads(text)
            self.is_json = True
        except ValueError:
            self.value = text
            self.is_json = False


def _check_shape(body: _Body) -> dict[str, Any]:
    if not body.utf8:
        raise InvalidRequest(400, "body must be UTF-8 encoded JSON")
    if not body.is_json:
        raise InvalidRequest(400, "body is not valid JSON")
    fields_ = body.value
    if not isinstance(fields_, dict):
        raise InvalidRequest(400, "body must be a JSON object")
    unknown = sorted(k for k in fields_ if k not in _KNOWN_FIELDS)
    if unknown:
        raise InvalidRequest(400, f"unknown field(s): {', '.join(unknown)}")
    for name in REQUIRED_FIELDS:
        if name not in fields_:
            raise InvalidRequest(400, f"missing required field {name}")
    for name, value in fields_.items():
        if not isinstance(value, str):
            raise InvalidRequest(400, f"field {name} must be a JSON string")
    for name in _NON_EMPTY_FIELDS:
        if not fields_[name]:
            raise InvalidRequest(400, f"field {name} must not be empty")
    return fields_


def _check_digits(body: dict[str, Any], name: str, bounds: tuple[int, int] | None) -> None:
    value = body.get(name)
    if value is None:
        return
    if _DIGITS.fullmatch(value) is None:
        raise InvalidRequest(400, f"field {name} must be a digit string, got {value!r}")
    if bounds is not None and not bounds[0] <= int(value) <= bounds[1]:
        lo, hi = bounds
        raise InvalidRequest(400, f"field {name} must be in {lo}..{hi}, got {value!r}")


def _check_values(body: dict[str, Any]) -> None:
    _check_digits(body, "PRIORIDADE", PRIORIDADE_RANGE)
    if len(body["DADOS"]) > DADOS_MAX_CHARS:
        raise InvalidRequest(400, f"field DADOS must be at most {DADOS_MAX_CHARS} characters")
    _check_digits(body, "FONTE_MUSICA", FONTE_MUSICA_RANGE)
    _check_digits(body, "TEMPO_FILA", None)
    _check_digits(body, "TEMPO_POS_ATENDIMENTO", None)


def _check_vendor_rules(state: _State, request: web.Request, body: _Body) -> None:
    _check_api_key(state, request.headers)
    _check_channel(request.match_info["channelID"])
    _check_values(_check_shape(body))


# --------------------------------------------------------------------------- faults


def _latency_s(faults: Faults) -> float:
    """The delay before answering: ``latency_ms``, or uniform up to ``latency_max_ms``."""
    if faults.latency_max_ms > faults.latency_ms:
        return random.uniform(faults.latency_ms, faults.latency_max_ms) / 1000
    return faults.latency_ms / 1000


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _wait_connected(state: _State, request: web.Request, seconds: float) -> bool:
    """Wait ``seconds``; False as soon as the client goes away or the server shuts down."""
    stopping = state.stopping
    assert stopping is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not _client_gone(request) and not stopping.is_set():
        left = deadline - loop.time()
        if left <= 0:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), min(left, _POLL_S))
    return False


async def _hang(state: _State, request: web.Request) -> None:
    """Wait until the client goes away or the server shuts down."""
    await _wait_connected(state, request, math.inf)


def _abort(request: web.Request) -> None:
    """Close the connection at once, dropping any unsent data."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def _reset_connection(request: web.Request) -> None:
    """Abort the connection so that the client sees a TCP reset (RST), not an answer."""
    transport = request.transport
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # linger 0: close() sends RST, not FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    _abort(request)


def _trickle_byte(index: int) -> bytes:
    """Byte ``index`` of ``{}`` padded with trailing spaces."""
    return _OK_BODY[index : index + 1] if index < len(_OK_BODY) else _PADDING


async def _trickle(
    state: _State, request: web.Request, record: Record, faults: Faults
) -> web.StreamResponse:
    """Answer ``200``: headers at once, then the padded body one byte every ``trickle_ms``.

    Stops writing (and drops the connection) when the client goes away or the server stops.
    """
    response = web.StreamResponse(status=200)
    response.content_type = "application/json"
    response.content_length = faults.trickle_bytes
    try:
        writer = await response.prepare(request)
        assert writer is not None
        record["status"] = 200
        for index in range(faults.trickle_bytes):
            pause = faults.trickle_ms / 1000
            if not await _wait_connected(state, request, pause):
                _abort(request)  # the body cannot be completed
                break
            await response.write(_trickle_byte(index))
            await writer.drain()
    except ConnectionError:
        pass  # the client went away: stop writing
    return response


def _failure_status(faults: Faults) -> int | None:
    """``fail_next`` then ``error_rate``: the status to answer, or None to go on."""
    if faults.fail_next > 0:
        faults.fail_next -= 1
        return faults.fail_status
    if faults.error_rate > 0 and random.random() < faults.error_rate:
        return faults.fail_status
    return None


# --------------------------------------------------------------------------- handlers


def _new_record(request: web.Request) -> Record:
    arrived = time.time()
    raw_channel = request.match_info["channelID"]
    return {
        "channel_id": int(raw_channel) if _CHANNEL_ID.fullmatch(raw_channel) else raw_channel,
        "headers": dict(request.headers),
        "traceparent": request.headers.get("traceparent"),
        "body": None,
        "status": None,
        "received_at": _iso_utc(arrived),
        "arrived": arrived,
        "ended": None,
    }


async def _answer(state: _State, request: web.Request, record: Record) -> web.StreamResponse:
    """Read the body, apply the faults and the vendor rules; the response to send."""
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        record["status"] = 413
        return _error(413, "body too large")
    body = _Body(raw)
    record["body"] = body.value

    faults = state.faults
    delay = _latency_s(faults)
    if delay >= _WATCHED_LATENCY_S:
        # A client that gives up meanwhile ends the request now, so ``ended`` says when
        # the request stopped being in flight, not when the sleep would have ended.
        if not await _wait_connected(state, request, delay):
            return _error(503, "client went away")
        faults = state.faults  # may have been replaced meanwhile
    elif delay > 0:
        await asyncio.sleep(delay)
        faults = state.faults
    if faults.hang:
        await _hang(state, request)  # never answered: the recorded status stays None
        return _error(503, "simulator stopping")
    if faults.reset_after_read:
        _reset_connection(request)  # never answered: the recorded status stays None
        return _error(503, "connection reset")
    status = _failure_status(faults)
    if status is not None:
        record["status"] = status
        return _error(status, f"injected fault {status}")
    try:
        _check_vendor_rules(state, request, body)
    except InvalidRequest as exc:
        record["status"] = exc.status
        return _error(exc.status, exc.message)
    if faults.trickle_ms > 0:
        return await _trickle(state, request, record, faults)
    record["status"] = 200
    return web.Response(body=_OK_BODY, content_type="application/json")


async def _executa_desvio(request: web.Request) -> web.StreamResponse:
    state = request.app[_STATE]
    record = _new_record(request)
    state.requests.append(record)
    try:
        response = await _answer(state, request, record)
        with contextlib.suppress(ConnectionError):  # dropped or aborted: nothing to send
            await response.prepare(request)
            await response.write_eof()
        return response
    finally:
        record["ended"] = time.time()  # written, dropped, aborted, or cancelled on shutdown


async def _get_requests(request: web.Request) -> web.Response:
    return web.json_response({"requests": list(request.app[_STATE].requests)})


async def _delete_requests(request: web.Request) -> web.Response:
    request.app[_STATE].requests.clear()
    return web.Response(status=204)


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[_STATE].faults))


async def _put_faults(request: web.Request) -> web.Response:
    try:
        data = json.loads(await request.read())
    except ValueError:
        return _error(400, "faults must be a JSON object")
    try:
        faults = parse_faults(data)
    except ValueError as exc:
        return _error(400, str(exc))
    request.app[_STATE].faults = faults
    return web.json_response(asdict(faults))


async def _health(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _on_startup(app: web.Application) -> None:
    app[_STATE].stopping = asyncio.Event()


async def _on_shutdown(app: web.Application) -> None:
    stopping = app[_STATE].stopping
    if stopping is not None:
        stopping.set()  # release hanging handlers so shutdown is not blocked


def create_app(*, api_key: str, latency_ms: float = 0) -> web.Application:
    """Build the simulator application (vendor route plus the ``/_sim`` admin API)."""
    if not api_key:
        raise ValueError("api_key must not be empty")
    _check_fault_value("latency_ms", latency_ms)
    app = web.Application()
    app[_STATE] = _State(api_key, float(latency_ms))
    app.router.add_post("/requests/{channelID}/executa-desvio", _executa_desvio)
    app.router.add_get("/_sim/requests", _get_requests)
    app.router.add_delete("/_sim/requests", _delete_requests)
    app.router.add_get("/_sim/faults", _get_faults)
    app.router.add_put("/_sim/faults", _put_faults)
    app.router.add_get("/_sim/health", _health)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    return app


def _readable(flag: str, path: Path) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from exc


def tls_context(
    tls_cert: Path | None, tls_key: Path | None, client_ca: Path | None = None
) -> ssl.SSLContext | None:
    """The server's TLS context, or None to serve plain HTTP; ValueError naming a bad flag."""
    if tls_cert is None or tls_key is None:
        if tls_cert is not None:
            raise ValueError("--tls-cert needs --tls-key (the certificate's private key)")
        if tls_key is not None:
            raise ValueError("--tls-key needs --tls-cert (the certificate it belongs to)")
        if client_ca is not None:
            raise ValueError("--client-ca needs --tls-cert and --tls-key (mutual TLS is HTTPS)")
        return None
    _readable("--tls-cert", tls_cert)
    _readable("--tls-key", tls_key)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls_cert, tls_key)
    except ssl.SSLError as exc:  # not PEM, or the key does not match the certificate
        raise ValueError(f"--tls-cert/--tls-key: cannot load {tls_cert}: {exc}") from exc
    if client_ca is not None:
        _readable("--client-ca", client_ca)
        try:
            context.load_verify_locations(cafile=client_ca)
        except ssl.SSLError as exc:
            raise ValueError(f"--client-ca: cannot load {client_ca}: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _AlertingTls(asyncio.sslproto.SSLProtocol):
    """asyncio's server side of TLS, except that a failed handshake tells the client why.

    asyncio drops the fatal alert OpenSSL writes when a handshake fails (CPython gh-98078),
    so a client without the certificate we require would only see the connection closed.
    OpenSSL servers send it (``certificate required``, ``unknown ca``), and so do we.
    """

    def __init__(self, site: _TlsSite, server: web.Server, tls: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        super().__init__(loop, server(), tls, None, server_side=True)  # type: ignore[arg-type]
        self._site = site
        self._tcp: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._tcp = transport
        self._site.transports.add(transport)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._tcp is not None:
            self._site.transports.discard(self._tcp)
        super().connection_lost(exc)

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        flush = getattr(self, "_process_outgoing", None)  # asyncio's own, since 3.11
        if handshake_exc is not None and flush is not None:
            flush()  # the alert, before the transport is closed
        super()._on_handshake_complete(handshake_exc)


class _TlsSite(web.BaseSite):
    """An HTTPS site whose connections use :class:`_AlertingTls`."""

    __slots__ = ("_host", "_port", "transports")

    def __init__(self, runner: web.AppRunner, host: str, port: int, tls: ssl.SSLContext) -> None:
        super().__init__(runner, ssl_context=tls)
        self._host = host
        self._port = port
        #: Open TCP transports; the TLS goodbye of one still open at shutdown may never end.
        self.transports: set[asyncio.BaseTransport] = set()

    @property
    def name(self) -> str:
        return f"https://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server, tls = self._runner.server, self._ssl_context
        if server is None or tls is None:
            raise RuntimeError("the runner is not set up")
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _AlertingTls(self, server, tls), self._host, self._port, backlog=self._backlog
        )

    def abort_leftovers(self) -> None:
        """Abort connections still open after the runner's cleanup (mid TLS shutdown)."""
        for transport in list(self.transports):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        self.transports.clear()


async def _cleanup(runner: web.AppRunner) -> None:
    """Stop the runner, then drop the connections it left behind."""
    sites = list(runner.sites)
    await runner.cleanup()
    for site in sites:
        if isinstance(site, _TlsSite):
            site.abort_leftovers()
    await asyncio.sleep(0)  # let the aborts close their sockets


async def _start(
    app: web.Application, host: str, port: int, tls: ssl.SSLContext | None = None
) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    try:
        site: web.BaseSite = (
            web.TCPSite(runner, host, port) if tls is None else _TlsSite(runner, host, port, tls)
        )
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses[0]
    bound_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    scheme = "http" if tls is None else "https"
    return runner, f"{scheme}://{bound_host}:{bound[1]}"


async def _serve(app: web.Application, host: str, port: int, tls: ssl.SSLContext | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner, url = await _start(app, host, port, tls)
    print(f"pabx simulator listening on {url}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await _cleanup(runner)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def run_simulator(
    *,
    host: str,
    port: int,
    api_key: str,
    latency_ms: float = 0,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    client_ca: Path | None = None,
) -> None:
    """Serve the simulator until SIGINT/SIGTERM, then shut down cleanly.

    Prints one line ``pabx simulator listening on http(s)://HOST:PORT`` to stderr.  Raises
    ValueError for an empty key, bad latency or bad TLS files (see :func:`tls_context`),
    OSError if the address cannot be bound.
    """
    app = create_app(api_key=api_key, latency_ms=latency_ms)
    tls = tls_context(tls_cert, tls_key, client_ca)
    asyncio.run(_serve(app, host, port, tls))


class SimulatorThread:
    """The simulator in a background thread with its own event loop.

    ``with SimulatorThread(api_key="k") as sim: requests.get(sim.url + "/_sim/health")``.
    Binds ``host`` (default 127.0.0.1) on an ephemeral port unless ``port`` is given; serves
    HTTPS with ``tls_cert``/``tls_key``, mutual TLS with ``client_ca`` too.
    """

    def __init__(
        self,
        *,
        api_key: str,
        latency_ms: float = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        client_ca: Path | None = None,
    ) -> None:
        self._app = create_app(api_key=api_key, latency_ms=latency_ms)
        self._tls = tls_context(tls_cert, tls_key, client_ca)
        self._host = host
        self._port = port
        self._url: str | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:41234`` (only once started)."""
        if self._url is None:
            raise RuntimeError("simulator not started")
        return self._url

    def start(self) -> SimulatorThread:
        """Start serving; returns once the port is bound (raises if binding failed)."""
        if self._thread is not None:
            raise RuntimeError("simulator already started")
        self._thread = threading.Thread(target=self._run, name="pabx-simulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server and join the thread (idempotent)."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or not thread.is_alive():
            return
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("simulator thread did not stop in time")

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:
            if not self._ready.is_set():
                self._error = exc
        finally:
            self._ready.set()
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        runner, self._url = await _start(self._app, self._host, self._port, self._tls)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await _cleanup(runner)
