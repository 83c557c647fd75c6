"""Tracing (SPEC §8): OpenTelemetry when an ``OTEL_*`` variable is set, otherwise nothing.

:data:`NO_TRACING` is what every part gets by default: its spans are one shared null
context and nothing of OpenTelemetry is imported, so tracing off costs a method call.
:func:`tracing_from_env` returns an :class:`OtelTracing` (the ``otel`` extra) when the
environment asks for it; the OTLP/HTTP exporter reads the standard ``OTEL_EXPORTER_OTLP_*``
variables itself.

W3C trace context travels as ``traceparent``/``tracestate``: on a command in its AMQP
headers, or under the CloudEvents AMQP binding's names (``cloudEvents_traceparent``,
``cloudEvents:traceparent``); to the PABX as HTTP headers; on an outcome in its AMQP headers
and as the CloudEvents ``traceparent`` attribute.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "NO_TRACING",
    "TRACEPARENT",
    "TRACESTATE",
    "OtelTracing",
    "Span",
    "Tracing",
    "log_ids",
    "trace_carrier",
    "tracing_from_env",
    "wants_tracing",
]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
#: Prefixes of CloudEvents attributes in AMQP application properties (binding 1.0, and
#: the ``_`` form that the newer SDKs write).
_CLOUDEVENTS_PREFIXES = ("cloudEvents_", "cloudEvents:")
#: Instrumentation scope of the worker's spans.
SCOPE = "pabx_worker"


class Span:
    """A span as the pipeline sees it; the null one records nothing."""

    #: False for the null span: skip building attributes.
    recording = False

    def set(self, attributes: Mapping[str, Any]) -> None:
        """Set span attributes (``None`` values are left out)."""

    def fail(self, description: str) -> None:
        """Mark the span as an error."""


_NULL_SPAN = Span()
_NULL_CARRIER: Mapping[str, str] = {}


class Tracing:
    """No tracing: every span is the same null context; nothing is sent anywhere."""

    enabled = False
    _command = contextlib.nullcontext(_NULL_SPAN)
    _request = contextlib.nullcontext((_NULL_SPAN, _NULL_CARRIER))

    def command_span(self, headers: Mapping[str, Any]) -> contextlib.AbstractContextManager[Span]:
        """The span of one command, continuing the trace context in its AMQP headers."""
        return self._command

    def request_span(
        self, target: str
    ) -> contextlib.AbstractContextManager[tuple[Span, Mapping[str, str]]]:
        """A child span for one PABX request, and the HTTP headers that carry it."""
        return self._request

    def producer_span(
        self, command_id: str
    ) -> contextlib.AbstractContextManager[tuple[Span, Mapping[str, str]]]:
        """A new trace for a command a producer publishes, and the AMQP headers carrying it."""
        return self._request

    def current(self) -> Mapping[str, str]:
        """``traceparent`` (and ``tracestate``) of the current span; empty when none."""
        return _NULL_CARRIER

    def log_ids(self) -> dict[str, str]:
        """``trace_id``/``span_id`` of the current span, for a log line; empty when none."""
        return {}

    def shutdown(self) -> None:
        """Send what is buffered and stop the exporter."""


#: Tracing off.
NO_TRACING = Tracing()


def wants_tracing(environ: Mapping[str, str] | None = None) -> bool:
    """Whether an ``OTEL_*`` variable is set (and ``OTEL_SDK_DISABLED`` is not ``true``)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(name.startswith("OTEL_") for name in env)


def tracing_from_env(
    *, service: str, version: str, environ: Mapping[str, str] | None = None, force: bool = False
) -> Tracing:
    """OpenTelemetry with the OTLP/HTTP exporter when the environment asks for it (or
    ``force``), else :data:`NO_TRACING`. Raises ImportError without the ``otel`` extra."""
    if not (force or wants_tracing(environ)):
        return NO_TRACING
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    env = os.environ if environ is None else environ
    exporter = None if force and not wants_tracing(env) else OTLPSpanExporter()
    return OtelTracing.with_exporter(exporter, service=service, version=version)


def log_ids(carrier: Mapping[str, str]) -> dict[str, str]:
    """``trace_id``/``span_id`` of a ``traceparent`` in ``carrier``, for a log line made
    outside the span (the consumer's line about a finished command); empty without one."""
    parts = carrier.get(TRACEPARENT, "").split("-")
    if len(parts) != 4:
        return {}
    return {"trace_id": parts[1], "span_id": parts[2]}


def trace_carrier(headers: Mapping[str, Any]) -> dict[str, str]:
    """``traceparent``/``tracestate`` from AMQP headers, plain or CloudEvents-prefixed."""
    carrier: dict[str, str] = {}
    for name, value in headers.items():
        key = name
        for prefix in _CLOUDEVENTS_PREFIXES:
            if name.startswith(prefix):
                key = name[len(prefix) :]
        if key in (TRACEPARENT, TRACESTATE) and key not in carrier:
            if isinstance(value, bytes | bytearray):
                value = bytes(value).decode("ascii", errors="replace")
            if isinstance(value, str):
                carrier[key] = value
    return carrier


class OtelTracing(Tracing):
    """Spans through an OpenTelemetry SDK tracer provider of our own (not the global one)."""

    enabled = True

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = provider
        self._tracer = provider.get_tracer(SCOPE)
        self._trace = trace
        self._context = context
        self._propagator = TraceContextTextMapPropagator()

    @classmethod
    def with_exporter(
        cls, exporter: SpanExporter | None, *, service: str, version: str, batch: bool = True
    ) -> OtelTracing:
        """A provider naming the service, exporting through ``exporter`` (None: nowhere)."""
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        resource = Resource.create({"service.name": service, "service.version": version})
        provider = TracerProvider(resource=resource)
        if exporter is not None:
            processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
            provider.add_span_processor(processor)
        return cls(provider)

    @contextlib.contextmanager
    def command_span(self, headers: Mapping[str, Any]) -> Iterator[Span]:
        parent = self._propagator.extract(trace_carrier(headers))
        kind = self._trace.SpanKind.CONSUMER
        with self._tracer.start_as_current_span(
            "pabx.commands process", context=parent, kind=kind
        ) as span:
            yield _OtelSpan(span, self._trace)

    @contextlib.contextmanager
    def request_span(self, target: str) -> Iterator[tuple[Span, Mapping[str, str]]]:
        kind = self._trace.SpanKind.CLIENT
        with self._tracer.start_as_current_span(
            "POST executa-desvio", kind=kind, attributes={"pabx.target": target}
        ) as span:
            yield _OtelSpan(span, self._trace), self.current()

    @contextlib.contextmanager
    def producer_span(self, command_id: str) -> Iterator[tuple[Span, Mapping[str, str]]]:
        kind = self._trace.SpanKind.PRODUCER
        root = self._context.Context()  # a new trace, whatever is current
        with self._tracer.start_as_current_span(
            "pabx.commands publish",
            context=root,
            kind=kind,
            attributes={"messaging.message.id": command_id, "messaging.system": "rabbitmq"},
        ) as span:
            yield _OtelSpan(span, self._trace), self.current()

    def current(self) -> Mapping[str, str]:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return carrier

    def log_ids(self) -> dict[str, str]:
        found = self._trace.get_current_span().get_span_context()
        if not found.is_valid:
            return {}
        return {"trace_id": f"{found.trace_id:032x}", "span_id": f"{found.span_id:016x}"}

    def shutdown(self) -> None:
        self._provider.shutdown()


class _OtelSpan(Span):
    recording = True

    def __init__(self, span: Any, trace: Any) -> None:
        self._span = span
        self._status = trace.Status
        self._code = trace.StatusCode

    def set(self, attributes: Mapping[str, Any]) -> None:
        self._span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def fail(self, description: str) -> None:
        self._span.set_status(self._status(self._code.ERROR, description))
