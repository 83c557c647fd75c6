"""Logging: one JSON object a line (or plain text), secrets redacted by field.

Secrets are kept out of log records where they are made (no call logs a key, a password or a
URL with its password). This module is the second line, and it never rewrites a substring of
an ordinary value, so a short secret (``k``, ``4567``) cannot maul ``cmd-45678`` or
``connected to the broker``. It masks:

- the value of every field named in :data:`SECRET_FIELDS` (an ``extra=`` key, a key of a
  dict logged as a field or an argument, at any depth);
- a field or ``%s`` argument whose whole value equals one of the ``secrets`` the process
  knows (a key or password logged by mistake under another name);
- in the message, the traceback, the stack and every other text field: the password of a URL
  (``scheme://user:***@host``), and the value after a secret field's name in
  ``"name": "value"``, ``'name': 'value'``, ``name=value`` and ``X-Api-Key: value`` forms.

A secret inside free text with none of those markers (``f"key was {key}"``) is not found: the
exceptions we raise never carry one.

Every line also carries the service and its version and, while tracing is on, the current
span's ids, named after OpenTelemetry's semantic conventions: ``service.name``,
``service.version`` (resource attributes) and ``trace_id``, ``span_id`` (trace context in
non-OTLP log formats), so a log line and its span join on the same keys.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from importlib import metadata
from typing import Any, TextIO

__all__ = [
    "MASK",
    "SECRET_FIELDS",
    "SERVICE",
    "ContextFilter",
    "JsonFormatter",
    "LineHandler",
    "RedactingFilter",
    "TextFormatter",
    "batched",
    "configure_logging",
    "is_secret_field",
    "package_version",
    "redact_message",
    "redact_text",
]

#: The ``service.name`` of logs and spans.
SERVICE = "pabx-worker"
#: Log fields naming the service (OpenTelemetry resource attributes).
SERVICE_NAME, SERVICE_VERSION = "service.name", "service.version"

#: What a redacted value becomes.
MASK = "***"

#: Field names whose values are credentials, compared lower-case with ``-`` read as ``_``.
SECRET_FIELDS = frozenset(
    {
        # the PABX key (the ``x-api-key`` header, per-target ``api_key``, PABX_API_KEY)
        "api_key",
        "apikey",
        "x_api_key",
        "pabx_api_key",
        # device and connection passwords
        "senha_dispositivo",
        "senha",
        "device_password",
        "device_passwords",
        "password",
        "passwd",
        # secret settings that are URLs: masked whole; log ``redact_url(...)`` under another name
        "amqp_url",
        "store_url",
        # generic credentials; a bare ``token`` is not one here (claim tokens are not secrets)
        "secret",
        "client_secret",
        "access_token",
        "auth_token",
        "bearer_token",
        "refresh_token",
        "authorization",
        "proxy_authorization",
        "cookie",
        "set_cookie",
    }
)
#: Name endings that make a field a credential too (``amqp_password``, ``target_api_key``).
_SECRET_SUFFIXES = ("_password", "_passwd", "_api_key", "_apikey", "_secret")

#: Attributes every LogRecord has; anything else came through ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}

_NAMES = "|".join(
    sorted((re.escape(n).replace("_", "[-_]") for n in SECRET_FIELDS), key=len, reverse=True)
)
_SUFFIXES = "|".join(re.escape(s).replace("_", "[-_]") for s in _SECRET_SUFFIXES)
_KEY = rf"(?:[A-Za-z0-9_-]*(?:{_SUFFIXES})|{_NAMES})"
#: ``scheme://user:password@`` (the password may hold an unescaped ``@``; the last one ends it).
_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)[^\s/?#]*(?=@)")
#: ``"name": "value"`` (JSON) and ``'name': 'value'`` (a Python repr).
_QUOTED_PAIR = re.compile(
    rf"""(?P<head>(?P<kq>["'])(?:{_KEY})(?P=kq)\s*:\s*)"""
    r"""(?:(?P<vq>["'])(?:\\.|(?!(?P=vq)).)*(?P=vq)|\{[^{}]*\}|\[[^\[\]]*\]|[^\s,}\]]+)""",
    re.IGNORECASE,
)
#: ``name=value`` (a libpq conninfo, a query string, a repr of keyword arguments).
_ASSIGNMENT = re.compile(
    rf"""(?P<head>(?<![\w-])(?:{_KEY})\s*=\s*)"""
    # pydantic's ``SecretStr('**********')`` masks itself: left alone.
    r"""(?!Secret(?:Str|Bytes)\()(?:'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"|[^\s&;,)'"]+)""",
    re.IGNORECASE,
)
#: ``X-Api-Key: value`` and other credential headers, as an HTTP dump shows them.
_HEADER = re.compile(
    r"(?P<head>(?<![\w'\"-])(?:x-api-key|authorization|proxy-authorization|cookie|set-cookie)"
    r"[ \t]*:[ \t]*)[^\r\n]+",
    re.IGNORECASE,
)


@functools.lru_cache(maxsize=1024)  # field names: a small set, asked about on every line
def is_secret_field(name: str) -> bool:
    """Whether a field of this name holds a credential (see :data:`SECRET_FIELDS`)."""
    key = name.lower().replace("-", "_")
    return key in SECRET_FIELDS or key.endswith(_SECRET_SUFFIXES)


#: A word every match of the patterns above contains (lowercased, ``-`` read as ``_``): text
#: with none of them is left alone without running the patterns.
_CLUES = ("://", "senha", "passw", "api_key", "apikey", "_url", "secret", "token", "auth", "cookie")
#: Any clue, found in one pass.
_ANY_CLUE = re.compile("|".join(re.escape(clue) for clue in _CLUES))


def redact_text(text: str) -> str:
    """``text`` with URL passwords and the values of secret fields masked; nothing else."""
    if _ANY_CLUE.search(text.lower().replace("-", "_")) is None:
        return text
    text = _URL_USERINFO.sub(rf"\1{MASK}", text)
    text = _QUOTED_PAIR.sub(lambda m: f"{m['head']}{m['vq'] or ''}{MASK}{m['vq'] or ''}", text)
    text = _ASSIGNMENT.sub(rf"\g<head>{MASK}", text)
    return _HEADER.sub(rf"\g<head>{MASK}", text)


def redact_message(text: str, secrets: Iterable[str]) -> str:
    """:func:`redact_text`, then whole words equal to a secret masked; never substrings."""
    known = set(secrets)
    return " ".join(MASK if word in known else word for word in redact_text(text).split(" "))


#: Field values logged as they are (checked by exact type before any isinstance).
_PLAIN = frozenset({bool, int, float})


class RedactingFilter(logging.Filter):
    """Masks secret fields, URL passwords and values equal to a known secret (never substrings)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = frozenset(s for s in secrets if s)

    def clean(self, value: Any) -> Any:
        """A copy of a field value fit for a log line."""
        if isinstance(value, str):
            return MASK if value in self._secrets else redact_text(value)
        if value is None or type(value) in _PLAIN:
            return value
        if isinstance(value, bytes | bytearray):
            return self.clean(bytes(value).decode("utf-8", errors="replace"))
        if isinstance(value, Mapping):
            return {
                k: MASK if isinstance(k, str) and is_secret_field(k) and v else self.clean(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple | set | frozenset):
            return [self.clean(v) for v in value]
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.clean(str(value))  # any other object logs as its str: clean that

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self._message(record), None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        for key, value in list(vars(record).items()):
            if key in _STANDARD:
                continue
            masked = is_secret_field(key) and value not in (None, "")
            setattr(record, key, MASK if masked else self.clean(value))
        return True

    def _arg(self, arg: Any) -> Any:
        """A ``%s`` argument: a known secret or a mapping is cleaned, anything else kept as is
        (numbers still format with ``%d``; the formatted message is redacted as a whole)."""
        if isinstance(arg, str):
            return MASK if arg in self._secrets else arg
        return self.clean(arg) if isinstance(arg, Mapping) else arg

    def _message(self, record: logging.LogRecord) -> str:
        args = record.args
        if isinstance(args, Mapping):
            record.args = self.clean(args)
        elif isinstance(args, tuple):
            record.args = tuple(self._arg(a) for a in args)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed call: keep it visible, without its args
            message = f"{record.msg} (log arguments did not match the format)"
        return redact_text(message)


def package_version() -> str:
    """The installed version of the package (``0+unknown`` when run from a bare tree)."""
    try:
        return metadata.version("pabx-worker")
    except metadata.PackageNotFoundError:
        return "0+unknown"


class ContextFilter(logging.Filter):
    """Adds ``service.name``, ``service.version`` and, from ``trace_ids``, ``trace_id`` and
    ``span_id`` of the current span to every record."""

    def __init__(
        self,
        *,
        service: str,
        version: str,
        trace_ids: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        super().__init__()
        self._fields = {SERVICE_NAME: service, SERVICE_VERSION: version}
        self._trace_ids = trace_ids

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self._fields.items():
            setattr(record, key, value)
        if self._trace_ids is not None:
            for key, value in self._trace_ids().items():
                setattr(record, key, value)
        return True


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


#: One encoder for every line: ``json.dumps`` with options builds a new one each call.
_JSON = json.JSONEncoder(default=str, ensure_ascii=False)


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", …extra, "traceback"}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_extra(record),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["traceback"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return _JSON.encode(entry)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger message key=value …``, then the traceback, if any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = " ".join(f"{k}={_text_value(v)}" for k, v in _extra(record).items())
        return f"{line} {fields}" if fields else line


def _text_value(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() or c in "\"'=" for c in value):
        return value
    return json.dumps(value, default=str, ensure_ascii=False)


class LineHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler whose lines a thread can gather and write at once (:func:`batched`).

    Outside a batch every line is written and flushed as it comes, as ``StreamHandler``
    does. Inside one, the thread's lines are kept in order and written together, in one
    ``write`` and one flush, when the batch ends (however it ends); other threads' lines
    are written as they come meanwhile.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._local = threading.local()

    def emit(self, record: logging.LogRecord) -> None:
        pending: list[str] | None = getattr(self._local, "pending", None)
        if pending is None:
            super().emit(record)
            return
        try:
            pending.append(self.format(record) + self.terminator)
            self._local.last = record
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    @contextmanager
    def batch(self) -> Iterator[None]:
        if getattr(self._local, "pending", None) is not None:
            yield  # already gathering: the outer batch writes
            return
        pending: list[str] = []
        self._local.pending = pending
        try:
            yield
        finally:
            self._local.pending = None
            if pending:
                with self.lock:  # type: ignore[union-attr]
                    try:
                        self.stream.write("".join(pending))
                        self.flush()
                    except RecursionError:
                        raise
                    except Exception:
                        self.handleError(self._local.last)  # as a failed emit reports it


@contextmanager
def batched() -> Iterator[None]:
    """Gather this thread's log lines and write them at once when the block ends.

    The worker's connection thread wraps each turn's finished commands in one: a line per
    command, one ``write`` per turn, and so one system call (and one hand-over of the GIL)
    per turn instead of per command. Without a :class:`LineHandler` on the root logger
    (logging set up some other way) it changes nothing.
    """
    handler = _line_handler()
    if handler is None:
        yield
        return
    with handler.batch():
        yield


def _line_handler() -> LineHandler | None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LineHandler):
            return handler
    return None


def configure_logging(
    *,
    fmt: str,
    level: str,
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    version: str | None = None,
    trace_ids: Callable[[], Mapping[str, str]] | None = None,
) -> None:
    """Send logs to ``stream`` (stderr) in the chosen format; ``secrets`` are masked as whole
    field values, never as substrings of other text. ``trace_ids`` (tracing on) gives the
    current span's ``trace_id``/``span_id``."""
    handler = LineHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(
        ContextFilter(service=SERVICE, version=version or package_version(), trace_ids=trace_ids)
    )
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # No line shows where a call was made, nor the thread or process: skip working those out
    # for every record (the "Optimization" table of the logging HOWTO).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    for noisy in ("amqp", "kombu", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
