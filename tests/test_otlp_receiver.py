"""The OTLP receiver fixture, proven against the real SDK exporters in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from tests.support import otlp_fixture, processes
from tests.support.otlp_receiver import OtlpReceiver, Protocol, ReceivedSpan, by_name

# Until tests/conftest.py imports it for every module.
otlp_receiver = otlp_fixture.otlp_receiver

# Builds the SDK purely from OTEL_* env, exports a SERVER parent and a CONSUMER child
# (attributes, an event, a recorded exception, status ERROR) and reports ids and timings.
EXPORT_SCRIPT = r"""
import json, os, sys, time
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

if os.environ["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc":
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
else:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

provider = TracerProvider()
provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
tracer = provider.get_tracer("flowtrace.receiver-test")
with tracer.start_as_current_span("parent", kind=SpanKind.SERVER) as parent:
    with tracer.start_as_current_span(
        "child", kind=SpanKind.CONSUMER, record_exception=False, set_status_on_exception=False
    ) as child:
        child.set_attributes({"task.name": "demo", "retries": 3, "ratio": 0.5,
                              "ok": True, "tags": ["a", "b"]})
        child.add_event("step", {"n": 1})
        try:
            raise ValueError("boom")
        except ValueError as exc:
            child.record_exception(exc)
            child.set_status(Status(StatusCode.ERROR, "task failed"))
started = time.monotonic()
flushed = provider.force_flush(30_000)
flush_s = time.monotonic() - started
provider.shutdown()
print(json.dumps({
    "trace_id": format(parent.get_span_context().trace_id, "032x"),
    "parent_id": format(parent.get_span_context().span_id, "016x"),
    "child_id": format(child.get_span_context().span_id, "016x"),
    "flushed": flushed,
    "flush_s": flush_s,
}))
"""


def run_export(env: dict[str, str]) -> dict[str, Any]:
    """Run :data:`EXPORT_SCRIPT` with ``env`` on top of the test environment."""
    proc = subprocess.run([sys.executable, "-c", EXPORT_SCRIPT], env=processes.test_env(**env),
                          cwd=processes.REPO_ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, f"exporter script failed:\n{proc.stdout}\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["flushed"], f"force_flush failed:\n{proc.stderr}"
    return result


def both_named(spans: list[ReceivedSpan]) -> bool:
    names = {span.name for span in spans}
    return {"parent", "child"} <= names


PROTOCOL_CASES = [
    pytest.param("grpc", {}, id="grpc"),
    pytest.param("grpc", {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, id="grpc-gzip"),
    pytest.param("http/protobuf", {}, id="http"),
    pytest.param("http/protobuf", {"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, id="http-gzip"),
    pytest.param("http/protobuf", {"OTEL_EXPORTER_OTLP_COMPRESSION": "deflate"},
                 id="http-deflate"),
]


@pytest.mark.parametrize(("protocol", "extra"), PROTOCOL_CASES)
def test_real_sdk_export_is_decoded(otlp_receiver: OtlpReceiver, protocol: Protocol,
                                    extra: dict[str, str]) -> None:
    ids = run_export(otlp_receiver.env(protocol, service_name="receiver-test", **extra))
    spans = otlp_receiver.wait_for_spans(both_named, timeout=30)

    assert len(spans) == 2, otlp_receiver.dump()
    assert otlp_receiver.errors == []
    spans_by_name = by_name(spans)
    parent, child = spans_by_name["parent"], spans_by_name["child"]
    wire = "grpc" if protocol == "grpc" else "http"

    assert parent.trace_id == child.trace_id == ids["trace_id"]
    assert len(parent.trace_id) == 32 and len(parent.span_id) == 16
    assert parent.span_id == ids["parent_id"] and child.span_id == ids["child_id"]
    assert parent.parent_span_id is None
    assert child.parent_span_id == parent.span_id
    assert otlp_receiver.traces() == {ids["trace_id"]: spans}

    assert (parent.kind, child.kind) == ("SERVER", "CONSUMER")
    assert parent.start_ns <= child.start_ns <= child.end_ns <= parent.end_ns
    assert child.attributes == {"task.name": "demo", "retries": 3, "ratio": 0.5, "ok": True,
                                "tags": ["a", "b"]}
    assert [event.name for event in child.events] == ["step", "exception"]
    step, exception = child.events
    assert step.attributes == {"n": 1}
    assert child.start_ns <= step.time_ns <= exception.time_ns <= child.end_ns
    assert exception.attributes["exception.type"] == "ValueError"
    assert exception.attributes["exception.message"] == "boom"
    assert "Traceback" in exception.attributes["exception.stacktrace"]
    assert (child.status_code, child.status_message) == ("ERROR", "task failed")
    assert (parent.status_code, parent.status_message) == ("UNSET", "")

    for span in spans:
        assert span.service_name == "receiver-test"
        assert span.protocol == wire
        assert span.scope_name == "flowtrace.receiver-test"
    assert otlp_receiver.request_counts[wire] >= 1


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_delay_slows_answers_but_spans_still_arrive(otlp_receiver: OtlpReceiver,
                                                    protocol: Protocol) -> None:
    delay = 1.0
    otlp_receiver.set_delay(delay)
    result = run_export(otlp_receiver.env(protocol))

    assert result["flush_s"] >= delay * 0.9, result
    spans = otlp_receiver.wait_for_spans(both_named, timeout=30)
    assert {span.service_name for span in spans} == {"test"}

    otlp_receiver.set_delay(0)
    otlp_receiver.clear()
    assert otlp_receiver.spans == [] and otlp_receiver.traces() == {}
    result = run_export(otlp_receiver.env(protocol))
    assert result["flush_s"] < delay, result
    otlp_receiver.wait_for_spans(both_named, timeout=30)


def test_stop_takes_endpoints_down_and_start_brings_them_back(
        otlp_receiver: OtlpReceiver) -> None:
    grpc_endpoint, http_endpoint = otlp_receiver.grpc_endpoint, otlp_receiver.http_endpoint
    ports = [int(endpoint.rsplit(":", 1)[1]) for endpoint in (grpc_endpoint, http_endpoint)]
    assert all(processes.port_open(port) for port in ports)

    otlp_receiver.stop()
    assert not otlp_receiver.running
    assert not any(processes.port_open(port) for port in ports)

    otlp_receiver.start()
    assert (otlp_receiver.grpc_endpoint, otlp_receiver.http_endpoint) == (grpc_endpoint,
                                                                           http_endpoint)
    for protocol in ("grpc", "http/protobuf"):
        otlp_receiver.clear()
        run_export(otlp_receiver.env(protocol))
        otlp_receiver.wait_for_spans(both_named, timeout=30)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_stop_drops_a_delayed_request_without_hanging(
        otlp_receiver: OtlpReceiver, protocol: Protocol, monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in otlp_receiver.env(protocol, OTEL_EXPORTER_OTLP_TIMEOUT="3").items():
        monkeypatch.setenv(key, value)
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

    exporter: SpanExporter
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        exporter = OTLPSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpSpanExporter,
        )
        exporter = HttpSpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    otlp_receiver.set_delay(60)

    worker = threading.Thread(target=lambda: provider.get_tracer("t").start_span("held").end(),
                              daemon=True)
    worker.start()
    try:
        otlp_receiver.wait_for(lambda: otlp_receiver.in_flight >= 1, timeout=20,
                               message="the export to be held by set_delay")
        started = time.monotonic()
        otlp_receiver.stop()
        assert time.monotonic() - started < 10
        worker.join(timeout=30)
        assert not worker.is_alive(), "exporter still blocked after receiver stop"
        assert otlp_receiver.in_flight == 0
        assert otlp_receiver.spans == []
    finally:
        provider.shutdown()


def test_wait_for_spans_times_out_with_a_readable_dump(otlp_receiver: OtlpReceiver) -> None:
    run_export(otlp_receiver.env("grpc", service_name="dumped"))
    otlp_receiver.wait_for_spans(both_named)
    with pytest.raises(AssertionError) as raised:
        otlp_receiver.wait_for_spans(lambda spans: len(spans) > 2, timeout=0.2,
                                     message="a third span")
    text = str(raised.value)
    assert "a third span" in text and "received 2 span(s)" in text
    assert "'parent'" in text and "'child'" in text and "dumped" in text
