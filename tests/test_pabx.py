"""HttpPabx over real HTTP: answers and failures mapped to our error tree.

Answers come from the simulator; misbehaving PABXes (trickling, resetting, silent, not
speaking TLS, closing idle connections) are small raw-socket servers on 127.0.0.1 that
stop by themselves.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

import worker.adapters.pabx
from tests.kit.samples import VENDOR_REQUIRED
from worker.adapters.pabx import HttpPabx
from worker.contract.errors import (
    ConfigurationError,
    PabxBadRequest,
    PabxError,
    PabxForbidden,
    PabxOutcomeUnknown,
    PabxPermanentError,
    PabxRejected,
    PabxUnauthorized,
    PabxUnavailable,
    PabxUnreachable,
)
from worker.contract.settings import PabxTarget
from worker.tools.simulator import SimulatorThread

KEY = "unit-key"
BODY = VENDOR_REQUIRED


@pytest.fixture(scope="module")
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(api_key=KEY) as simulator:
        yield simulator


@pytest.fixture
def client(sim: SimulatorThread) -> Iterator[HttpPabx]:
    requests.put(f"{sim.url}/_sim/faults", json={}, timeout=5)
    requests.delete(f"{sim.url}/_sim/requests", timeout=5)
    pabx = HttpPabx(pool_size=4, connect_timeout_s=1, read_timeout_s=0.5)
    yield pabx
    pabx.close()


def target(url: str, key: str = KEY) -> PabxTarget:
    return PabxTarget(url=url, api_key=key, channel_id=17)


def test_accepted_request_carries_key_channel_and_body(
    client: HttpPabx, sim: SimulatorThread
) -> None:
    assert client.redirect(target(sim.url), 23, BODY) == 200
    [seen] = requests.get(f"{sim.url}/_sim/requests", timeout=5).json()["requests"]
    assert seen["channel_id"] == 23 and seen["body"] == BODY
    assert {k.lower(): v for k, v in seen["headers"].items()}["x-api-key"] == KEY


def test_wrong_key_is_forbidden(client: HttpPabx, sim: SimulatorThread) -> None:
    with pytest.raises(PabxForbidden) as info:
        client.redirect(target(sim.url, "other"), 17, BODY)
    assert info.value.status_code == 403 and "other" not in str(info.value)


def test_invalid_body_is_a_bad_request(client: HttpPabx, sim: SimulatorThread) -> None:
    with pytest.raises(PabxBadRequest):
        client.redirect(target(sim.url), 17, {**BODY, "PRIORIDADE": "20"})


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, PabxBadRequest),
        (401, PabxUnauthorized),
        (403, PabxForbidden),
        (429, PabxUnavailable),
        (503, PabxUnavailable),
        (500, PabxOutcomeUnknown),
        (502, PabxOutcomeUnknown),
        (504, PabxOutcomeUnknown),
        (404, PabxRejected),
    ],
)
def test_statuses_map_to_errors(
    client: HttpPabx, sim: SimulatorThread, status: int, error: type[PabxError]
) -> None:
    requests.put(f"{sim.url}/_sim/faults", json={"fail_next": 1, "fail_status": status}, timeout=5)
    with pytest.raises(error) as info:
        client.redirect(target(sim.url), 17, BODY)
    assert info.value.status_code == status


def test_hang_is_ambiguous(client: HttpPabx, sim: SimulatorThread) -> None:
    requests.put(f"{sim.url}/_sim/faults", json={"hang": True}, timeout=5)
    with pytest.raises(PabxOutcomeUnknown, match="timed out after the request was sent"):
        client.redirect(target(sim.url), 17, BODY)


def test_closed_port_is_unreachable(client: HttpPabx) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(PabxUnreachable, match="unreachable"):
        client.redirect(target(f"http://127.0.0.1:{port}"), 17, BODY)


def test_url_prefix_is_kept(client: HttpPabx, sim: SimulatorThread) -> None:
    with pytest.raises(PabxRejected) as info:
        client.redirect(target(f"{sim.url}/cti"), 17, BODY)
    assert info.value.status_code == 404


# --- misbehaving PABXes: raw sockets on 127.0.0.1 -------------------------------------

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class RawServer:
    """A TCP server on 127.0.0.1 running ``handle(conn, server)`` in a thread per connection.

    Handlers end by themselves (bounded waits); leaving the block stops accepting and
    joins every thread.
    """

    def __init__(self, handle: Callable[[socket.socket, RawServer], None]) -> None:
        self._handle = handle
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.stopping = threading.Event()
        self.connections = 0
        self.requests = 0
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> RawServer:
        self._start(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(5)
        self._listener.close()

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            self.connections += 1
            self._start(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # OSError: the client went away
            self._handle(conn, self)

    def recv(self, conn: socket.socket, limit_s: float) -> bytes:
        """Bytes from the client; b"" on EOF, after ``limit_s`` or once the server stops."""
        conn.settimeout(0.05)
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and not self.stopping.is_set():
            try:
                return conn.recv(4096)
            except TimeoutError:
                continue
        return b""

    def read_request(self, conn: socket.socket, idle_s: float = 5.0) -> bytes | None:
        """Read one request (headers and Content-Length body): its head, or None on EOF or
        idle timeout."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.recv(conn, idle_s)
            if not chunk:
                return None
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = self.recv(conn, 5.0)
            if not chunk:
                return None
            rest += chunk
        self.requests += 1
        return head

    def wait_gone(self, conn: socket.socket, limit_s: float = 5.0) -> None:
        """Say nothing until the client closes, the server stops or ``limit_s`` passes."""
        deadline = time.monotonic() + limit_s
        while self.recv(conn, deadline - time.monotonic()):
            pass


def keep_alive(idle_close_s: float = 5.0) -> Callable[[socket.socket, RawServer], None]:
    """Answer 200 to every request; close a connection idle for ``idle_close_s``."""

    def handle(conn: socket.socket, server: RawServer) -> None:
        while not server.stopping.is_set() and server.read_request(conn, idle_close_s):
            conn.sendall(OK)

    return handle


def trickle_body(conn: socket.socket, server: RawServer) -> None:
    if server.read_request(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n")
        for _ in range(30):
            time.sleep(0.1)
            conn.sendall(b"x")


def trickle_headers(conn: socket.socket, server: RawServer) -> None:
    if server.read_request(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(30):
            time.sleep(0.1)
            conn.sendall(b"x")
        conn.sendall(b"\r\nContent-Length: 0\r\n\r\n")


def reset_after_read(conn: socket.socket, server: RawServer) -> None:
    if server.read_request(conn):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def silent(conn: socket.socket, server: RawServer) -> None:
    if server.read_request(conn):
        server.wait_gone(conn)


def plain_text_to_tls(conn: socket.socket, server: RawServer) -> None:
    conn.settimeout(5)
    conn.recv(4096)  # the ClientHello
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")


@pytest.fixture
def quick() -> Iterator[HttpPabx]:
    pabx = HttpPabx(pool_size=4, connect_timeout_s=0.3, read_timeout_s=0.5)
    yield pabx
    pabx.close()


@pytest.mark.parametrize("handle", [trickle_body, trickle_headers])
def test_trickled_answer_is_cut_at_the_time_bound(
    quick: HttpPabx, handle: Callable[[socket.socket, RawServer], None]
) -> None:
    with RawServer(handle) as server:
        started = time.monotonic()
        with pytest.raises(PabxOutcomeUnknown, match=r"longer than 0\.8 s"):
            quick.redirect(target(server.url), 17, BODY)
        elapsed = time.monotonic() - started
        assert server.requests == 1
    assert 0.75 <= elapsed < 2.5


def test_client_works_on_after_a_cut(quick: HttpPabx) -> None:
    with RawServer(trickle_body) as slow, RawServer(keep_alive()) as fine:
        with pytest.raises(PabxOutcomeUnknown):
            quick.redirect(target(slow.url), 17, BODY)
        assert quick.redirect(target(fine.url), 17, BODY) == 200
        assert quick.redirect(target(fine.url), 17, BODY) == 200
    assert fine.connections == 1


def test_reset_after_the_request_is_ambiguous(quick: HttpPabx) -> None:
    with (
        RawServer(reset_after_read) as server,
        pytest.raises(PabxOutcomeUnknown, match="connection lost after the request was sent"),
    ):
        quick.redirect(target(server.url), 17, BODY)
    assert server.requests == 1


def test_no_answer_is_ambiguous(quick: HttpPabx) -> None:
    with (
        RawServer(silent) as server,
        pytest.raises(PabxOutcomeUnknown, match="timed out after the request was sent"),
    ):
        quick.redirect(target(server.url), 17, BODY)
    assert server.requests == 1


def test_failed_tls_handshake_is_unreachable(quick: HttpPabx) -> None:
    with RawServer(plain_text_to_tls) as server:
        url = server.url.replace("http://", "https://")
        with pytest.raises(PabxUnreachable, match="unreachable: SSLError") as info:
            quick.redirect(target(url), 17, BODY)
    assert server.requests == 0
    assert KEY not in str(info.value)


def test_connect_timeout_is_unreachable(quick: HttpPabx) -> None:
    # A listener whose accept queue is full drops further SYNs: the connect times out.
    with socket.create_server(("127.0.0.1", 0), backlog=0) as listener:
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        time.sleep(0.1)
        try:
            started = time.monotonic()
            with pytest.raises(PabxUnreachable, match="connect timed out"):
                quick.redirect(target(f"http://127.0.0.1:{listener.getsockname()[1]}"), 17, BODY)
            assert time.monotonic() - started < 2.5
        finally:
            for filler in fillers:
                filler.close()


def test_time_bound_passed_before_sending_is_not_sent(
    quick: HttpPabx, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A slow name lookup (not bounded by the connect timeout) eats the whole time bound.
    real = worker.adapters.pabx._open_socket

    def slow_lookup(*args: Any, **kwargs: Any) -> socket.socket:
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(worker.adapters.pabx, "_open_socket", slow_lookup)
    with RawServer(keep_alive()) as server:
        with pytest.raises(PabxUnreachable, match=r"not reached within 0\.8 s"):
            quick.redirect(target(server.url), 17, BODY)
        monkeypatch.undo()
        assert quick.redirect(target(server.url), 17, BODY) == 200
    assert server.requests == 1


def test_connection_closed_by_the_pabx_while_idle_is_replaced() -> None:
    pabx = HttpPabx(pool_size=4, connect_timeout_s=1, read_timeout_s=1, idle_timeout_s=0.5)
    try:
        with RawServer(keep_alive(idle_close_s=1.0)) as server:
            assert pabx.redirect(target(server.url), 17, BODY) == 200
            time.sleep(1.5)
            assert pabx.redirect(target(server.url), 17, BODY) == 200
        assert (server.connections, server.requests) == (2, 2)
    finally:
        pabx.close()


def test_idle_connection_is_not_reused_past_idle_timeout() -> None:
    pabx = HttpPabx(pool_size=4, connect_timeout_s=1, read_timeout_s=1, idle_timeout_s=0.3)
    try:
        with RawServer(keep_alive()) as server:
            for _ in range(3):
                assert pabx.redirect(target(server.url), 17, BODY) == 200
            assert server.connections == 1  # kept alive while busy
            time.sleep(0.5)
            assert pabx.redirect(target(server.url), 17, BODY) == 200
            assert server.connections == 2  # the PABX never closed it: we did
    finally:
        pabx.close()


def test_pooled_connection_shut_down_after_its_answer_is_harmless(quick: HttpPabx) -> None:
    # What a watch firing just after the answer was read does: the next request reconnects.
    with RawServer(keep_alive()) as server:
        assert quick.redirect(target(server.url), 17, BODY) == 200
        (route,) = quick._routes.values()
        assert len(route.idle) == 1
        route.idle[0].sock.shutdown(socket.SHUT_RDWR)
        assert quick.redirect(target(server.url), 17, BODY) == 200
    assert server.connections == 2


def test_many_concurrent_requests_within_the_bound(sim: SimulatorThread) -> None:
    requests.put(f"{sim.url}/_sim/faults", json={}, timeout=5)
    pabx = HttpPabx(pool_size=8, connect_timeout_s=1, read_timeout_s=2)
    statuses: list[int] = []

    def work() -> None:
        for _ in range(25):
            statuses.append(pabx.redirect(target(sim.url), 17, BODY))

    try:
        threads = [threading.Thread(target=work) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        pabx.close()
    assert statuses == [200] * 200


def test_reaper_thread_is_gone_after_close() -> None:
    before = set(threading.enumerate())
    pabx = HttpPabx(pool_size=2, connect_timeout_s=0.3, read_timeout_s=0.5)
    with RawServer(keep_alive()) as server:
        assert pabx.redirect(target(server.url), 17, BODY) == 200
    reapers = [t for t in set(threading.enumerate()) - before if t.name == "pabx-reaper"]
    assert len(reapers) == 1 and reapers[0].is_alive()
    pabx.close()
    assert not reapers[0].is_alive()


# --- the wire: what goes out, and answers of every shape --------------------------------


def answering(*answers: bytes, seen: list[bytes] | None = None) -> Callable[..., None]:
    """Answer the requests of one connection with ``answers`` in turn, then close it.

    ``seen`` collects each request's head as it arrived.
    """

    def handle(conn: socket.socket, server: RawServer) -> None:
        for answer in answers:
            head = server.read_request(conn)
            if head is None:
                return
            if seen is not None:
                seen.append(head)
            conn.sendall(answer)

    return handle


def test_request_head_is_one_post_with_host_length_and_key(quick: HttpPabx) -> None:
    seen: list[bytes] = []
    with RawServer(answering(OK, seen=seen)) as server:
        assert quick.redirect(target(f"{server.url}/cti/"), 23, BODY) == 200
    lines = seen[0].decode().split("\r\n")
    assert lines[0] == "POST /cti/requests/23/executa-desvio HTTP/1.1"
    headers = dict(line.split(": ", 1) for line in lines[1:])
    assert headers["Host"] == server.url.removeprefix("http://")
    assert headers["x-api-key"] == KEY
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(json.dumps(BODY, ensure_ascii=False).encode())


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;x=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        b'HTTP/1.1 200 OK\r\ncontent-length: 4\r\nX-Other:spaced\r\n\r\n{"a"',
    ],
    ids=["chunked", "interim-100", "lower-case-length"],
)
def test_answers_read_in_full_keep_the_connection(quick: HttpPabx, answer: bytes) -> None:
    with RawServer(answering(answer, answer)) as server:
        assert quick.redirect(target(server.url), 17, BODY) == 200
        assert quick.redirect(target(server.url), 17, BODY) == 200
    assert (server.connections, server.requests) == (1, 2)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nbody until the connection ends",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n",  # more than asked
    ],
    ids=["connection-close", "http-1.0", "until-eof", "trailing-bytes"],
)
def test_answers_that_end_the_connection_are_not_reused(quick: HttpPabx, answer: bytes) -> None:
    def once(conn: socket.socket, server: RawServer) -> None:
        answering(answer)(conn, server)
        if b"Content-Length" not in answer:
            conn.shutdown(socket.SHUT_WR)  # an answer read until EOF ends here
        server.wait_gone(conn)  # a request sent on this connection again goes unanswered

    with RawServer(once) as server:
        assert quick.redirect(target(server.url), 17, BODY) == 200
        assert quick.redirect(target(server.url), 17, BODY) == 200
    assert (server.connections, server.requests) == (2, 2)


def test_keep_alive_1_0_answer_keeps_the_connection(quick: HttpPabx) -> None:
    answer = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    with RawServer(answering(answer, answer)) as server:
        assert quick.redirect(target(server.url), 17, BODY) == 200
        assert quick.redirect(target(server.url), 17, BODY) == 200
    assert server.connections == 1


def test_status_of_a_chunked_error_answer_is_mapped(quick: HttpPabx) -> None:
    answer = b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nno\r\n0\r\n\r\n"
    with RawServer(answering(answer)) as server, pytest.raises(PabxForbidden):
        quick.redirect(target(server.url), 17, BODY)


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 2OO OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line without a colon"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "Content-Length is not a number"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "Content-Length is negative"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            "chunk size is not a number",
        ),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000, "answer head longer than"),
    ],
    ids=["not-http", "bad-status", "no-colon", "bad-length", "negative", "bad-chunk", "huge"],
)
def test_unreadable_answer_after_sending_is_ambiguous(
    quick: HttpPabx, answer: bytes, why: str
) -> None:
    with (
        RawServer(answering(answer)) as server,
        pytest.raises(PabxOutcomeUnknown, match=f"unreadable after the request was sent: {why}"),
    ):
        quick.redirect(target(server.url), 17, BODY)
    assert server.requests == 1


def test_answer_cut_short_by_the_pabx_is_ambiguous(quick: HttpPabx) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}"
    with (
        RawServer(answering(answer)) as server,
        pytest.raises(PabxOutcomeUnknown, match="connection lost after the request was sent"),
    ):
        quick.redirect(target(server.url), 17, BODY)


def test_long_answer_body_is_not_read_and_its_connection_not_kept(quick: HttpPabx) -> None:
    big = 2 << 20  # past what the client reads and throws away
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big
    with RawServer(answering(answer, answer)) as server:
        assert quick.redirect(target(server.url), 17, BODY) == 200
        assert quick.redirect(target(server.url), 17, BODY) == 200
    assert server.connections == 2


def test_idle_connections_kept_at_most_pool_size(sim: SimulatorThread) -> None:
    requests.put(f"{sim.url}/_sim/faults", json={"latency_ms": 100}, timeout=5)
    pabx = HttpPabx(pool_size=2, connect_timeout_s=1, read_timeout_s=2)
    try:
        threads = [
            threading.Thread(target=pabx.redirect, args=(target(sim.url), 17, BODY))
            for _ in range(5)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        (route,) = pabx._routes.values()
        assert len(route.idle) == 2
    finally:
        requests.put(f"{sim.url}/_sim/faults", json={}, timeout=5)
        pabx.close()
    assert len(route.idle) == 0


def test_key_a_header_cannot_carry_is_refused_before_sending(quick: HttpPabx) -> None:
    with RawServer(answering(OK)) as server:
        with pytest.raises(PabxPermanentError, match="printable ASCII") as info:
            quick.redirect(target(server.url, key="k\r\nX-Injected: 1"), 17, BODY)
        assert "Injected" not in str(info.value)
    assert server.requests == 0


def test_key_a_header_cannot_carry_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"pabx\.main\.api_key: .*printable ASCII"):
        HttpPabx(
            pool_size=1,
            connect_timeout_s=1,
            read_timeout_s=1,
            targets={"main": target("http://127.0.0.1:9", key="clé")},
        )


def test_trace_headers_a_header_cannot_carry_are_dropped(quick: HttpPabx) -> None:
    seen: list[bytes] = []
    trace = {"traceparent": "00-ab-cd-01", "tracestate": "a=1\r\nX-Injected: 1"}
    with RawServer(answering(OK, seen=seen)) as server:
        assert quick._redirect(target(server.url), 17, BODY, trace) == 200
    lines = seen[0].split(b"\r\n")
    assert b"traceparent: 00-ab-cd-01" in lines and b"Injected" not in seen[0]


def test_body_read_to_the_end_of_a_reset_connection_keeps_its_status(quick: HttpPabx) -> None:
    def answer_then_reset(conn: socket.socket, server: RawServer) -> None:
        if server.read_request(conn):
            conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nthe body runs until")
            time.sleep(0.1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    with RawServer(answer_then_reset) as server:
        assert quick.redirect(target(server.url), 17, BODY) == 200
