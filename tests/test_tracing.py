"""Tracing (SPEC §8): the trace context from producer to worker to PABX to outcome event."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.integration.conftest import BACKENDS, url_for
from tests.kit.events import AnyPeer, open_peer
from tests.kit.processes import RunningWorker, sim_requests
from tests.kit.samples import API_KEY, command
from tests.kit.topology import private_settings
from worker.logs import configure_logging
from worker.tools.simulator import SimulatorThread
from worker.tracing import (
    NO_TRACING,
    OtelTracing,
    Tracing,
    trace_carrier,
    tracing_from_env,
    wants_tracing,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def traced() -> tuple[OtelTracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing = OtelTracing.with_exporter(exporter, service="pabx-worker", version="t", batch=False)
    return tracing, exporter


def run_one(
    backend: str, request: pytest.FixtureRequest, tracing: Tracing, headers: dict[str, str]
) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """One command through a worker: (its PABX request record, outcome properties, event)."""
    with SimulatorThread(api_key=API_KEY) as sim:
        settings = private_settings(url_for(backend, request), sim.url)
        with open_peer(settings) as peer:
            running = RunningWorker(settings, peer.connect, tracing=tracing)
            try:
                props, event = publish_and_wait(peer, headers)
            finally:
                running.stop()
            assert running.error is None
        (record,) = sim_requests(sim)
    return record, props, event


def publish_and_wait(peer: AnyPeer, headers: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    peer.publish(command(), headers=headers)
    ((props, event),) = peer.events(1)
    assert event["data"]["status"] == "accepted"
    return props, event


def ids(traceparent: str) -> tuple[str, str]:
    """(trace id, span id) of a W3C traceparent."""
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


def span_named(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    (found,) = (s for s in spans if s.name == name)
    return found


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_trace_runs_from_producer_through_worker_and_pabx_to_the_outcome(
    backend: str, request: pytest.FixtureRequest
) -> None:
    tracing, exporter = traced()
    with tracing.producer_span("cmd") as (_, carrier):
        sent = dict(carrier)
    record, props, event = run_one(backend, request, tracing, sent)
    tracing.shutdown()

    spans = exporter.get_finished_spans()
    producer = span_named(spans, "pabx.commands publish")
    worker = span_named(spans, "pabx.commands process")
    pabx = span_named(spans, "POST executa-desvio")
    trace_id = producer.context.trace_id
    assert worker.context.trace_id == pabx.context.trace_id == trace_id
    assert worker.parent is not None and worker.parent.span_id == producer.context.span_id
    assert pabx.parent is not None and pabx.parent.span_id == worker.context.span_id
    attributes = dict(worker.attributes or {})
    assert attributes["pabx.status"] == "accepted"
    assert attributes["pabx.command_id"] == event["data"]["command_id"]
    assert attributes["pabx.attempts"] == 1 and attributes["pabx.duplicate"] is False

    # The PABX saw the request span; the outcome carries the command's span.
    assert ids(record["traceparent"]) == (f"{trace_id:032x}", f"{pabx.context.span_id:016x}")
    command_span = (f"{trace_id:032x}", f"{worker.context.span_id:016x}")
    assert ids(event["traceparent"]) == command_span
    assert ids(props.headers["traceparent"]) == command_span


@pytest.mark.parametrize("prefix", ["cloudEvents_", "cloudEvents:"])
def test_a_cloudevents_traceparent_attribute_is_continued(
    prefix: str, request: pytest.FixtureRequest
) -> None:
    tracing, exporter = traced()
    record, _, event = run_one("memory", request, tracing, {f"{prefix}traceparent": PARENT})
    tracing.shutdown()
    worker = span_named(exporter.get_finished_spans(), "pabx.commands process")
    assert worker.parent is not None and f"{worker.parent.span_id:016x}" == ids(PARENT)[1]
    assert ids(record["traceparent"])[0] == ids(event["traceparent"])[0] == TRACE_ID


def test_without_a_traceparent_the_trace_starts_at_the_worker(
    request: pytest.FixtureRequest,
) -> None:
    tracing, exporter = traced()
    record, _, event = run_one("memory", request, tracing, {})
    tracing.shutdown()
    worker = span_named(exporter.get_finished_spans(), "pabx.commands process")
    assert worker.parent is None
    assert ids(record["traceparent"])[0] == ids(event["traceparent"])[0]


def test_tracing_off_sends_no_trace_context(request: pytest.FixtureRequest) -> None:
    record, props, event = run_one("memory", request, NO_TRACING, {"traceparent": PARENT})
    assert record["traceparent"] is None
    assert "traceparent" not in event  # an absent extension attribute, not null
    assert "traceparent" not in (props.headers or {})


def test_tracing_is_off_unless_an_otel_variable_is_set() -> None:
    assert not wants_tracing({"PATH": "/bin"})
    assert wants_tracing({"OTEL_SERVICE_NAME": "x"})
    assert not wants_tracing({"OTEL_SERVICE_NAME": "x", "OTEL_SDK_DISABLED": "true"})
    assert tracing_from_env(service="s", version="v", environ={}) is NO_TRACING


def test_tracing_off_imports_no_opentelemetry() -> None:
    code = (
        "import sys, worker.runtime, worker.cli, worker.produce.producer\n"
        "from worker.tracing import tracing_from_env\n"
        "tracing_from_env(service='s', version='v', environ={})\n"
        "print([m for m in sys.modules if m.startswith('opentelemetry')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_trace_carrier_reads_plain_and_cloudevents_headers() -> None:
    assert trace_carrier({"traceparent": PARENT.encode(), "tracestate": "a=1"}) == {
        "traceparent": PARENT,
        "tracestate": "a=1",
    }
    assert trace_carrier({"cloudEvents_traceparent": PARENT, "x": 1}) == {"traceparent": PARENT}


def test_log_lines_carry_service_version_and_the_span_ids() -> None:
    tracing, _ = traced()
    stream = io.StringIO()
    configure_logging(
        fmt="json", level="INFO", stream=stream, version="1.2.3", trace_ids=tracing.log_ids
    )
    log = logging.getLogger("pabx_worker.test")
    log.info("outside")
    with tracing.command_span({"traceparent": PARENT}):
        log.info("inside")
    tracing.shutdown()
    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert outside["service.name"] == inside["service.name"] == "pabx-worker"
    assert outside["service.version"] == "1.2.3"
    assert "trace_id" not in outside
    assert inside["trace_id"] == TRACE_ID and len(inside["span_id"]) == 16


# -- OTLP/HTTP, as the worker configures it from OTEL_* variables -----------------------


class _Receiver(BaseHTTPRequestHandler):
    received: list[ExportTraceServiceRequest]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        self.received.append(message)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    received: list[ExportTraceServiceRequest] = []
    handler = type("Handler", (_Receiver,), {"received": received})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/v1/traces", received
    server.shutdown()
    thread.join()
    server.server_close()


def test_spans_are_exported_over_otlp_http(
    otlp_receiver: tuple[str, list[ExportTraceServiceRequest]],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, received = otlp_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", endpoint)
    tracing = tracing_from_env(service="pabx-worker", version="9.9")
    assert isinstance(tracing, OtelTracing)
    record, _, _ = run_one("memory", request, tracing, {"traceparent": PARENT})
    tracing.shutdown()  # flushes the batch

    spans = [
        (resource.resource, span)
        for message in received
        for resource in message.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    by_name = {span.name: (res, span) for res, span in spans}
    assert {"pabx.commands process", "POST executa-desvio"} <= by_name.keys()
    resource, worker = by_name["pabx.commands process"]
    _, pabx = by_name["POST executa-desvio"]
    assert worker.trace_id.hex() == pabx.trace_id.hex() == TRACE_ID
    assert worker.parent_span_id.hex() == ids(PARENT)[1]
    assert pabx.parent_span_id == worker.span_id
    assert ids(record["traceparent"])[1] == pabx.span_id.hex()
    attributes = {a.key: a.value.string_value for a in resource.attributes}
    assert attributes["service.name"] == "pabx-worker"
    assert attributes["service.version"] == "9.9"


def test_the_command_log_line_carries_its_span_ids(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    tracing, exporter = traced()
    with caplog.at_level(logging.INFO, logger="pabx_worker.consumer"):
        run_one("memory", request, tracing, {"traceparent": PARENT})
    tracing.shutdown()
    worker = span_named(exporter.get_finished_spans(), "pabx.commands process")
    (line,) = (r for r in caplog.records if r.getMessage() == "command accepted")
    assert vars(line)["trace_id"] == TRACE_ID
    assert vars(line)["span_id"] == f"{worker.context.span_id:016x}"
