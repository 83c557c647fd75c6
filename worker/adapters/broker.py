"""Broker connections: TLS, failover across several URLs, and the mapping of broker errors.

:func:`connect` is the boundary where kombu, py-amqp and ``ssl`` errors met while opening a
connection become ours (SPEC §1: a refused user or vhost and a malformed URL are configuration
errors; exit 2, a message naming the setting, never a traceback or the password)::

    what happened while connecting                          raised               worker run
    refused, reset, timeout, DNS, node or vhost going down  BrokerError          reconnects
    NOT_ALLOWED (530): a connection limit is reached        BrokerError          reconnects
    ACCESS_REFUSED (403): user name or password             ConfigurationError   exits 2
    NOT_ALLOWED (530): vhost missing or not permitted       ConfigurationError   exits 2
    malformed URL, scheme, port, query arguments            ConfigurationError   exits 2
    unreadable or invalid CA, certificate or key file       ConfigurationError   exits 2
    TLS certificate verify failed (unknown CA, host name)   ConfigurationError   exits 2
    TLS refused by the broker (client certificate missing
    or not trusted), amqps:// to a plain AMQP port          ConfigurationError   exits 2
    TLS handshake cut short (EOF, reset)                    BrokerError          reconnects

The worker's reconnect loop stops on a ConfigurationError too: waiting cannot fix a refused
password or a certificate that does not verify, and a supervisor restarting the process (with
its exit code 2 in the logs) is easier to notice than a worker that retries quietly forever.

``amqps://`` always verifies the broker's certificate *and its host name* (the host written in
the URL, also for ``localhost``) against ``AMQP_CA_FILE``, else the system CAs;
``AMQP_CERT_FILE``/``AMQP_KEY_FILE`` add a client certificate. There is no switch to turn
verification off. TLS options in the URL's query (``?ssl_ca_certs=…``) are refused: they
would bypass these rules, so the files come from the settings only.

Several ``;``-separated URLs are a failover list: each is tried once, in turn, and the first
that connects wins. A permanent failure is raised only when none connected, so one node with a
bad certificate does not stop a worker the others can serve.

On an open connection, broker operations run inside :func:`broker_errors`, which maps what
py-amqp, kombu and the socket layer raise by the table :data:`BROKER_ERROR_MAP`::

    with broker_errors():
        channel = connection.channel()
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import SplitResult, unquote, urlsplit

from amqp.exceptions import (
    AccessRefused,
    NotAllowed,
    NotFound,
    RecoverableChannelError,
    RecoverableConnectionError,
)
from amqp.exceptions import ConnectionError as AmqpConnectionError
from kombu import Connection

from worker.adapters.amqp_io import Transport
from worker.adapters.channel import AmqpConnection
from worker.contract.errors import BrokerError, ConfigurationError, PabxWorkerError
from worker.contract.settings import ENV_PREFIX

__all__ = [
    "BROKER_ERROR_MAP",
    "ErrorMapping",
    "Target",
    "TlsFiles",
    "broker_errors",
    "connect",
    "home_node_down",
    "parse_urls",
    "where",
]

log = logging.getLogger("pabx_worker.broker")

URL_VARIABLE = f"{ENV_PREFIX}AMQP_URL"
CA_VARIABLE = f"{ENV_PREFIX}AMQP_CA_FILE"
CERT_VARIABLE = f"{ENV_PREFIX}AMQP_CERT_FILE"
KEY_VARIABLE = f"{ENV_PREFIX}AMQP_KEY_FILE"
#: URL schemes we speak; ``amqps`` is AMQP over TLS.
SCHEMES = frozenset({"amqp", "amqps"})
#: Default ports when the URL names none (kombu's defaults too).
DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
#: Seconds to wait for TCP connect, and then for the TLS handshake.
CONNECT_TIMEOUT_S = 5
#: Seconds a broker that dropped us is given to explain with a TLS alert (see _broker_alert).
ALERT_WAIT_S = 1.0


#: What RabbitMQ's reply text says of a classic queue whose cluster node is down, as in
#: ``NOT_FOUND - home node 'rabbit@n2' of durable queue 'q' in vhost '/' is down or inaccessible``.
HOME_NODE_TEXT = "home node"


def home_node_down(exc: BaseException) -> bool:
    """A 404 NOT_FOUND for a classic queue whose cluster node is down, not a missing queue.

    RabbitMQ answers a declare of, or a get from, such a queue with reply code 404 and a text
    naming its "home node" (HOME_NODE_TEXT). The queue comes back with its node, so this is
    an outage of the broker to back off from (BrokerError), unlike a queue that does not
    exist. py-amqp raises every 404 as NotFound, with ``reply_code`` 404.
    """
    return (
        isinstance(exc, NotFound)
        and exc.reply_code == NotFound.code
        and HOME_NODE_TEXT in str(exc.reply_text or "")
    )


class ErrorMapping(NamedTuple):
    """One row of BROKER_ERROR_MAP: ``raised`` (when ``when`` holds of it) becomes ``to``."""

    raised: type[Exception]
    to: type[PabxWorkerError]
    when: Callable[[Exception], bool] | None = None


#: How :func:`broker_errors` maps what py-amqp, kombu and the socket layer raise: the first
#: row that matches wins, so the most specific come first. Whatever no row matches is raised
#: unchanged: the other channel errors (AccessRefused, NotFound, PreconditionFailed ...),
#: which callers such as :class:`worker.contract.topology.Topology` turn into ConfigurationError or
#: which mean a bug, kombu's own errors, and py-amqp's MessageNacked.
BROKER_ERROR_MAP: tuple[ErrorMapping, ...] = (
    # 404 for a classic queue whose node is down: it comes back with the node.
    ErrorMapping(NotFound, BrokerError, when=home_node_down),
    # 311 ContentTooLarge, 313 NoConsumers, 405 ResourceLocked: the channel closed.
    ErrorMapping(RecoverableChannelError, BrokerError),
    # 320 ConnectionForced, 506 ResourceError, Blocked, ConsumerCancelled.
    ErrorMapping(RecoverableConnectionError, BrokerError),
    # Every other connection-level error (402, 501-505, 530, 540, 541; kombu's
    # InconsistencyError): the broker closed the connection.
    ErrorMapping(AmqpConnectionError, BrokerError),
    # Refused, reset, timed out, DNS, TLS (ssl.SSLError is an OSError): the line is gone.
    ErrorMapping(OSError, BrokerError),
)


@contextlib.contextmanager
def broker_errors() -> Iterator[None]:
    """Map the broker errors the block raises to ours, by BROKER_ERROR_MAP::

        with broker_errors():
            channel = connection.channel()

    The new error's message is the original's class name and text, and the original is its
    ``__cause__``. An error no row maps is raised unchanged.
    """
    try:
        yield
    except Exception as exc:
        mapped = _broker_error(exc)
        if mapped is None:
            raise
        raise mapped from exc


def _broker_error(exc: Exception) -> PabxWorkerError | None:
    """Our error for ``exc`` by the first row of BROKER_ERROR_MAP it matches; None if none."""
    for row in BROKER_ERROR_MAP:
        if isinstance(exc, row.raised) and (row.when is None or row.when(exc)):
            return row.to(f"{type(exc).__name__}: {exc}")
    return None


@dataclass(frozen=True)
class TlsFiles:
    """What verifies the broker (``ca_file``, else the system CAs) and who we are to it."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def context(self) -> ssl.SSLContext:
        """The context these files make, host names checked; a bad file names its variable."""
        if self.key_file is not None and self.cert_file is None:
            raise ConfigurationError(f"{KEY_VARIABLE} is set but {CERT_VARIABLE} is not")
        _readable(CA_VARIABLE, self.ca_file)
        _readable(CERT_VARIABLE, self.cert_file)
        _readable(KEY_VARIABLE, self.key_file)
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            raise ConfigurationError(
                f"{CA_VARIABLE}: cannot load CA certificates from {self.ca_file}: "
                f"{_ssl_reason(exc)}"
            ) from exc
        context.check_hostname = True
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is None:
            return context
        try:
            context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ValueError) as exc:
            raise ConfigurationError(
                f"{CERT_VARIABLE}/{KEY_VARIABLE}: cannot load the client certificate "
                f"{self.cert_file} with key {self.key_file or '(in the same file)'}: "
                f"{_ssl_reason(exc)}"
            ) from exc
        return context

    def options(self, host: str) -> dict[str, Any]:
        """py-amqp's ``ssl`` dict: verification and host-name checking on, for ``host``.

        py-amqp builds an ``SSLContext(PROTOCOL_TLS_CLIENT)`` from it (certificate required;
        host name checked because ``server_hostname`` is given) and loads the system CAs when
        there is no ``ca_certs``. kombu would otherwise put 127.0.0.1 for ``localhost``.
        """
        return {
            "server_hostname": host,
            "cert_reqs": ssl.CERT_REQUIRED,
            "ca_certs": _str(self.ca_file),
            "certfile": _str(self.cert_file),
            "keyfile": _str(self.key_file),
            "tls_minimum_version": ssl.TLSVersion.TLSv1_2,
        }


@dataclass(frozen=True)
class Target:
    """One URL of the failover list, checked; ``text`` keeps the credentials for kombu only."""

    text: str
    scheme: str
    host: str
    port: int
    vhost: str

    @property
    def tls(self) -> bool:
        return self.scheme == "amqps"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def connect(
    url: str,
    *,
    start: int = 0,
    heartbeat: int = 0,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
) -> Connection:
    """Connect to the first broker that answers of ``url`` (``;``-separated), from ``start``.

    Each reconnection starts one further along the list, so a worker whose node went away
    moves to the next one instead of waiting for it. Raises BrokerError when no broker
    answered, ConfigurationError when one refused us for good (see the module docstring).
    """
    targets = parse_urls(url)
    tls = TlsFiles(ca_file, cert_file, key_file)
    if any(t.tls for t in targets):
        tls.context()  # every file readable and valid, before any connection is tried
    elif ca_file or cert_file:
        log.warning("%s is not amqps://: the AMQP TLS files are not used", URL_VARIABLE)
    first = start % len(targets)
    failures: list[PabxWorkerError] = []
    for target in targets[first:] + targets[:first]:
        try:
            return _open(target, tls, heartbeat)
        except (BrokerError, ConfigurationError) as exc:
            if len(failures) < len(targets) - 1:
                log.warning("trying the next broker URL", extra={"error": str(exc)})
            failures.append(exc)
    permanent = [f for f in failures if isinstance(f, ConfigurationError)]
    raise (permanent or failures)[0]


def parse_urls(url: str) -> list[Target]:
    """The checked URLs of ``url`` (``;``-separated); errors never show the password."""
    texts = [u.strip() for u in url.split(";") if u.strip()]
    if not texts:
        raise ConfigurationError(f"{URL_VARIABLE} is empty")
    return [_parse(text, _which(i, len(texts))) for i, text in enumerate(texts)]


def where(connection: AmqpConnection) -> str:
    """host:port of a connection, never its credentials."""
    info = connection.info()
    return f"{info.get('hostname')}:{info.get('port')}"


# -- one URL ---------------------------------------------------------------------------------


def _which(index: int, count: int) -> str:
    return URL_VARIABLE if count == 1 else f"{URL_VARIABLE} (URL {index + 1} of {count})"


def _parse(text: str, name: str) -> Target:
    if "://" not in text:
        raise ConfigurationError(
            f"{name}: not a URL; expected amqp://user:password@host:port/vhost"
        )
    try:
        parts = urlsplit(text)
    except ValueError:  # bad [IPv6] brackets
        raise ConfigurationError(f"{name}: malformed URL (unbalanced [ ])") from None
    if "@" in parts.path + parts.query + parts.fragment:
        # Nothing of it is shown: what follows the host may be the rest of a password.
        raise ConfigurationError(
            f"{name}: malformed URL ('@' after the host): percent-encode '/', '?' and '#'"
            " in the user name and password"
        )
    try:
        port = parts.port
    except ValueError:  # its text is not shown either
        raise ConfigurationError(
            f"{name}: malformed URL: the port is not a number in 1-65535"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"{name}: unsupported scheme {parts.scheme!r}; use amqp:// or amqps:// (TLS)"
        )
    _refuse_query(parts, name)
    if port == 0:
        raise ConfigurationError(f"{name}: malformed URL: the port is not a number in 1-65535")
    return Target(
        text=text,
        scheme=scheme,
        host=parts.hostname or "localhost",
        port=port or DEFAULT_PORTS[scheme],
        vhost=unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
    )


def _refuse_query(parts: SplitResult, name: str) -> None:
    if not parts.query and not parts.fragment:
        return
    items = (item.split("=", 1)[0] for item in parts.query.split("&"))
    keys = sorted({key for key in items if key.isidentifier()})
    hint = ""
    if any(k.startswith("ssl") or k in ("cafile", "certfile", "keyfile") for k in keys):
        hint = f"; give TLS files with {CA_VARIABLE}, {CERT_VARIABLE} and {KEY_VARIABLE}"
    shown = ", ".join(keys) if keys else "#fragment"
    raise ConfigurationError(f"{name}: query arguments are not supported ({shown}){hint}")


def _open(target: Target, tls: TlsFiles, heartbeat: int) -> Connection:
    try:
        connection = Connection(
            target.text,
            transport=Transport,  # py-amqp reading the socket in chunks
            ssl=tls.options(target.host) if target.tls else False,
            heartbeat=heartbeat,
            connect_timeout=CONNECT_TIMEOUT_S,
            transport_options={"confirm_publish": False},
        )
    except (KeyError, ValueError) as exc:  # what kombu's own parsing refuses
        raise ConfigurationError(f"{URL_VARIABLE}: kombu cannot use {target}: {exc}") from None
    try:
        connection.ensure_connection(max_retries=0, reraise_as_library_errors=False)
    except Exception as exc:
        with contextlib.suppress(Exception):  # a half-open socket
            connection.release()
        alert = _broker_alert(target, tls) if target.tls and _dropped(exc) else None
        if alert is not None:
            raise _tls_error(alert, target, tls) from alert
        mapped = _mapped(exc, target, tls)
        if mapped is None:
            raise
        raise mapped from exc
    return connection


def _dropped(exc: BaseException) -> bool:
    """The broker hung up on us (EOF, reset), which it does after a TLS alert too."""
    return isinstance(
        exc,
        (
            ssl.SSLEOFError,
            ssl.SSLZeroReturnError,
            ConnectionResetError,
            BrokenPipeError,
            RecoverableConnectionError,
        ),
    )


def _broker_alert(target: Target, tls: TlsFiles) -> ssl.SSLError | None:
    """The TLS alert the broker sends a fresh handshake of ours, if any.

    With TLS 1.3 the broker judges our client certificate after our side of the handshake
    is done; py-amqp then writes the AMQP header into a closed socket and sees EOF, the
    alert (``CERTIFICATE_REQUIRED``, ``UNKNOWN_CA``) unread. Only after such a drop, a
    handshake of our own sends nothing and reads: an alert comes at once, while a broker
    that accepted us waits for the header (ALERT_WAIT_S), which is no alert.
    """
    try:
        with (
            socket.create_connection((target.host, target.port), CONNECT_TIMEOUT_S) as raw,
            tls.context().wrap_socket(raw, server_hostname=target.host) as sock,
        ):
            sock.settimeout(ALERT_WAIT_S)
            sock.recv(1)
    except ssl.SSLError as exc:
        return None if _dropped(exc) else exc
    except (OSError, ConfigurationError):
        return None
    return None


def _mapped(exc: Exception, target: Target, tls: TlsFiles) -> PabxWorkerError | None:
    """Our error for a failure to open ``target``; None for one we do not know."""
    if isinstance(exc, AccessRefused):
        return ConfigurationError(
            f"{URL_VARIABLE}: the broker refused the user name or password (ACCESS_REFUSED)"
        )
    if isinstance(exc, NotAllowed) and "limit" in str(exc.reply_text):
        return BrokerError(f"{target}: {exc.reply_text}")  # connection limit: wait for room
    if isinstance(exc, NotAllowed):
        return ConfigurationError(
            f"{URL_VARIABLE}: the broker refused virtual host {target.vhost!r}: {exc.reply_text}"
        )
    if isinstance(exc, ssl.SSLError):
        return _tls_error(exc, target, tls)
    if isinstance(exc, (OSError, AmqpConnectionError, RecoverableConnectionError)):
        return BrokerError(f"{target}: {type(exc).__name__}: {exc}")
    return None


def _tls_error(exc: ssl.SSLError, target: Target, tls: TlsFiles) -> PabxWorkerError:
    """Certificate and handshake refusals are permanent; an EOF or reset mid-handshake is not."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        against = (
            f"{CA_VARIABLE}={tls.ca_file}"
            if tls.ca_file
            else f"the system CAs; set {CA_VARIABLE} for a private CA"
        )
        why = getattr(exc, "verify_message", None) or exc
        return ConfigurationError(
            f"{URL_VARIABLE}: TLS to {target.host}:{target.port}: certificate verify failed: "
            f"{why} (host name {target.host!r}, checked against {against})"
        )
    reason = _ssl_reason(exc)
    if type(exc) is not ssl.SSLError:  # SSLEOFError, SSLSyscallError ...: the line dropped
        return BrokerError(f"{target}: TLS handshake interrupted: {reason}")
    return ConfigurationError(
        f"{URL_VARIABLE}: TLS to {target.host}:{target.port} failed: {reason}"
        f"{_tls_hint(reason, tls)}"
    )


def _tls_hint(reason: str, tls: TlsFiles) -> str:
    """What an OpenSSL reason usually means here; the broker's alerts say why it hung up."""
    client_cert = f"{CERT_VARIABLE}, {KEY_VARIABLE}"
    if "CERTIFICATE_REQUIRED" in reason or (
        "HANDSHAKE_FAILURE" in reason and tls.cert_file is None
    ):
        return f": the broker requires a client certificate ({client_cert})"
    if "ALERT" in reason and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason):
        return f": the broker refused our client certificate ({client_cert})"
    if "WRONG_VERSION_NUMBER" in reason:
        return ": is that port a TLS listener (amqps://, usually 5671)?"
    return ""


def _ssl_reason(exc: BaseException) -> str:
    """``CERTIFICATE_REQUIRED``-style reason of an ssl error, else its text."""
    reason = getattr(exc, "reason", None)  # set by the ssl module, absent on some errors
    return str(reason) if reason else str(exc)


def _readable(variable: str, path: Path | None) -> None:
    if path is None:
        return
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        raise ConfigurationError(f"{variable}: cannot read {path}: {exc.strerror or exc}") from None


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)
