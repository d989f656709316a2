"""A real OTLP trace receiver (gRPC + HTTP/protobuf) that tests use instead of Jaeger.

Code under test exports through the real OTLP exporters, configured only by the
``OTEL_*`` variables from :meth:`OtlpReceiver.env`; the receiver decodes what arrives
on the wire into :class:`ReceivedSpan` values that tests can wait on and assert about.
"""

from __future__ import annotations

import gzip
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

Protocol = Literal["grpc", "http/protobuf"]
AttributeValue = Any  # str | int | float | bool | bytes | list[...] | dict[str, ...] | None

TRACES_PATH = "/v1/traces"
_DUMP_LIMIT = 200


@dataclass(frozen=True)
class ReceivedSpanEvent:
    """One span event as decoded from the wire."""

    name: str
    time_ns: int
    attributes: dict[str, AttributeValue] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ReceivedSpanLink:
    """One span link as decoded from the wire."""

    trace_id: str
    span_id: str
    attributes: dict[str, AttributeValue] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as decoded from an ``ExportTraceServiceRequest``."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, AttributeValue] = field(hash=False)
    events: list[ReceivedSpanEvent] = field(hash=False)
    status_code: str
    status_message: str
    service_name: str | None
    protocol: Literal["grpc", "http"]
    links: list[ReceivedSpanLink] = field(default_factory=list, hash=False)
    scope_name: str = ""
    resource_attributes: dict[str, AttributeValue] = field(default_factory=dict, hash=False)

    @property
    def duration_ns(self) -> int:
        """``end_ns - start_ns``."""
        return self.end_ns - self.start_ns

    def describe(self) -> str:
        """A one-line human readable summary, used in timeout dumps."""
        parent = self.parent_span_id or "-" * 16
        return (f"[{self.protocol}] {self.service_name} {self.span_id} <- {parent} "
                f"{self.kind:<8} {self.status_code:<5} {self.name!r} attrs={self.attributes}"
                + (f" events={[e.name for e in self.events]}" if self.events else "")
                + (f" status_message={self.status_message!r}" if self.status_message else ""))


def _any_value(value: common_pb2.AnyValue) -> AttributeValue:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


def _attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, AttributeValue]:
    return {pair.key: _any_value(pair.value) for pair in pairs}


def _enum_suffix(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix)


def decode_request(request: trace_service_pb2.ExportTraceServiceRequest,
                   protocol: Literal["grpc", "http"]) -> list[ReceivedSpan]:
    """Flatten an ``ExportTraceServiceRequest`` into :class:`ReceivedSpan` values."""
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = resource.get("service.name")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex() or None,
                    name=span.name,
                    kind=_enum_suffix(trace_pb2.Span.SpanKind.Name(span.kind), "SPAN_KIND_"),
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    attributes=_attributes(span.attributes),
                    events=[ReceivedSpanEvent(event.name, event.time_unix_nano,
                                              _attributes(event.attributes))
                            for event in span.events],
                    status_code=_enum_suffix(trace_pb2.Status.StatusCode.Name(span.status.code),
                                             "STATUS_CODE_"),
                    status_message=span.status.message,
                    service_name=None if service is None else str(service),
                    protocol=protocol,
                    links=[ReceivedSpanLink(link.trace_id.hex(), link.span_id.hex(),
                                            _attributes(link.attributes))
                           for link in span.links],
                    scope_name=scope_spans.scope.name,
                    resource_attributes=resource,
                ))
    return spans


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    """gRPC ``TraceService.Export`` that hands requests to the receiver."""

    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest,
               context: grpc.ServicerContext) -> trace_service_pb2.ExportTraceServiceResponse:
        """Record the request's spans after any injected delay."""
        if not self._receiver._accept(request, "grpc"):
            context.abort(grpc.StatusCode.UNAVAILABLE, "receiver stopped")
        return trace_service_pb2.ExportTraceServiceResponse()


class _HttpHandler(BaseHTTPRequestHandler):
    """``POST /v1/traces`` with protobuf bodies; one request per connection."""

    server: _HttpServer

    def do_POST(self) -> None:
        """Decode an ``ExportTraceServiceRequest`` and answer with an empty response."""
        receiver = self.server.receiver
        if self.path.split("?", 1)[0] != TRACES_PATH:
            self._reply(HTTPStatus.NOT_FOUND, b"not found", "text/plain")
            return
        content_type = self.headers.get("Content-Type", "").split(";", 1)[0].strip()
        if content_type != "application/x-protobuf":
            self._reply(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, b"protobuf only", "text/plain")
            return
        try:
            body = self._decompress(self._read_body())
            request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        except Exception as exc:
            receiver._record_error(f"http: undecodable body: {exc!r}")
            self._reply(HTTPStatus.BAD_REQUEST, str(exc).encode(), "text/plain")
            return
        if not receiver._accept(request, "http"):
            self.close_connection = True
            return  # taken down mid-request: drop the connection without answering
        self._reply(HTTPStatus.OK,
                    trace_service_pb2.ExportTraceServiceResponse().SerializeToString(),
                    "application/x-protobuf")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", "0")))

    def _decompress(self, body: bytes) -> bytes:
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)
        if encoding in ("", "identity"):
            return body
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], receiver: OtlpReceiver) -> None:
        self.receiver = receiver
        super().__init__(address, _HttpHandler)


class OtlpReceiver:
    """OTLP trace receiver on 127.0.0.1: gRPC and HTTP/protobuf, decoded spans in memory.

    ``stop()`` takes both endpoints down; a later ``start()`` brings them back on the
    same ports, so exporters configured from :meth:`env` reconnect.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self._cond = threading.Condition()
        self._spans: list[ReceivedSpan] = []
        self._errors: list[str] = []
        self._requests = {"grpc": 0, "http": 0}
        self._in_flight = 0
        self._delay = 0.0
        self._stopping = threading.Event()
        self._grpc_server: grpc.Server | None = None
        self._http_server: _HttpServer | None = None
        self._http_thread: threading.Thread | None = None
        self._grpc_port = 0
        self._http_port = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> OtlpReceiver:
        """Start both servers (on free ports, or on the previous ports after ``stop()``)."""
        if self.running:
            return self
        self._stopping.clear()
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8,
                                                        thread_name_prefix="otlp-grpc"),
                             options=[("grpc.so_reuseport", 0)])
        add_servicer: Callable[[_TraceService, grpc.Server], None] = (
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server)  # generated, untyped
        add_servicer(_TraceService(self), server)
        port = server.add_insecure_port(f"{self.host}:{self._grpc_port}")
        if port == 0:
            raise RuntimeError(f"cannot bind gRPC OTLP receiver on {self.host}:{self._grpc_port}")
        server.start()
        self._grpc_server, self._grpc_port = server, port
        try:
            http_server = _HttpServer((self.host, self._http_port), self)
        except OSError:
            self._stop_grpc()
            raise
        self._http_server, self._http_port = http_server, http_server.server_address[1]
        self._http_thread = threading.Thread(target=http_server.serve_forever,
                                             kwargs={"poll_interval": 0.05},
                                             name="otlp-http", daemon=True)
        self._http_thread.start()
        return self

    def stop(self) -> None:
        """Take both endpoints down; in-flight delayed requests are dropped unanswered."""
        self._stopping.set()
        self._stop_grpc()
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_server = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=10)
            self._http_thread = None
        with self._cond:
            self._cond.notify_all()

    def _stop_grpc(self) -> None:
        if self._grpc_server is not None:
            self._grpc_server.stop(grace=None).wait(timeout=10)
            self._grpc_server = None

    @property
    def running(self) -> bool:
        """Whether the servers are up."""
        return self._grpc_server is not None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------- configuration
    @property
    def grpc_endpoint(self) -> str:
        """``http://127.0.0.1:PORT`` of the gRPC endpoint."""
        self._require_started()
        return f"http://{self.host}:{self._grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """Base URL of the HTTP endpoint; exporters append ``/v1/traces``."""
        self._require_started()
        return f"http://{self.host}:{self._http_port}"

    def _require_started(self) -> None:
        if not self._grpc_port or not self._http_port:
            raise RuntimeError("OtlpReceiver.start() has not been called")

    def env(self, protocol: Protocol = "grpc", service_name: str = "test",
            **overrides: str) -> dict[str, str]:
        """``OTEL_*`` variables that point the SDK's OTLP trace exporter at this receiver.

        Generic and trace-specific variables are both set so that values inherited from
        the developer's shell (e.g. a Jaeger endpoint) cannot win; ``overrides`` are
        applied last (e.g. ``OTEL_EXPORTER_OTLP_COMPRESSION="gzip"``).
        """
        if protocol == "grpc":
            endpoint = traces_endpoint = self.grpc_endpoint
        elif protocol == "http/protobuf":
            endpoint = self.http_endpoint
            traces_endpoint = endpoint + TRACES_PATH
        else:
            raise ValueError(f"unsupported OTLP protocol {protocol!r}")
        no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY") or os.environ.get(
            "no_proxy"), self.host, "localhost"]))
        env = {
            "OTEL_SDK_DISABLED": "false",
            "OTEL_SERVICE_NAME": service_name,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": traces_endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": protocol,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
        }
        env.update(overrides)
        return env

    def set_delay(self, seconds: float) -> None:
        """Make both endpoints wait ``seconds`` before recording and answering (0 = off)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        with self._cond:
            self._delay = seconds

    # ------------------------------------------------------------------- storage
    def _accept(self, request: trace_service_pb2.ExportTraceServiceRequest,
                protocol: Literal["grpc", "http"]) -> bool:
        """Delay, then store decoded spans; False if the receiver was stopped meanwhile."""
        with self._cond:
            delay = self._delay
            self._in_flight += 1
            self._cond.notify_all()
        try:
            if (delay and self._stopping.wait(delay)) or self._stopping.is_set():
                return False
            spans = decode_request(request, protocol)
            with self._cond:
                self._requests[protocol] += 1
                self._spans.extend(spans)
            return True
        finally:
            with self._cond:
                self._in_flight -= 1
                self._cond.notify_all()

    def _record_error(self, message: str) -> None:
        with self._cond:
            self._errors.append(message)
            self._cond.notify_all()

    @property
    def spans(self) -> list[ReceivedSpan]:
        """A copy of every span received so far, in arrival order."""
        with self._cond:
            return list(self._spans)

    @property
    def errors(self) -> list[str]:
        """Requests that could not be decoded."""
        with self._cond:
            return list(self._errors)

    @property
    def request_counts(self) -> dict[str, int]:
        """Accepted export requests per transport (``grpc``/``http``)."""
        with self._cond:
            return dict(self._requests)

    @property
    def in_flight(self) -> int:
        """Export requests received but not yet answered (e.g. held by ``set_delay``)."""
        with self._cond:
            return self._in_flight

    def wait_for(self, condition: Callable[[], bool], timeout: float = 30,
                 message: str = "condition") -> None:
        """Block until ``condition()`` (re-checked on every receiver change) holds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {message}\n{self.dump()}")
                self._cond.wait(remaining)

    def clear(self) -> None:
        """Forget received spans, errors and request counts."""
        with self._cond:
            self._spans.clear()
            self._errors.clear()
            self._requests = dict.fromkeys(self._requests, 0)

    def traces(self) -> dict[str, list[ReceivedSpan]]:
        """Received spans grouped by trace id, each list in arrival order."""
        grouped: dict[str, list[ReceivedSpan]] = {}
        for span in self.spans:
            grouped.setdefault(span.trace_id, []).append(span)
        return grouped

    def wait_for_spans(self, predicate: Callable[[list[ReceivedSpan]], bool],
                       timeout: float = 30, message: str = "") -> list[ReceivedSpan]:
        """Block until ``predicate(spans)`` holds and return that snapshot.

        Raises AssertionError with a dump of everything received on timeout.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                snapshot = list(self._spans)
                if predicate(snapshot):
                    return snapshot
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        what = message or getattr(predicate, "__name__", "predicate")
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.dump()}")

    def wait_for_span_count(self, count: int, timeout: float = 30) -> list[ReceivedSpan]:
        """Block until at least ``count`` spans were received."""
        return self.wait_for_spans(lambda spans: len(spans) >= count, timeout,
                                   message=f">= {count} spans")

    def dump(self, spans: Iterable[ReceivedSpan] | None = None) -> str:
        """Readable multi-line summary of received spans, grouped by trace."""
        received = list(self.spans if spans is None else spans)
        lines = [f"received {len(received)} span(s); requests={self.request_counts}"
                 f"; running={self.running}; delay={self._delay}s"]
        grouped: dict[str, list[ReceivedSpan]] = {}
        for span in received[:_DUMP_LIMIT]:
            grouped.setdefault(span.trace_id, []).append(span)
        for trace_id, trace_spans in grouped.items():
            lines.append(f"  trace {trace_id}:")
            lines.extend(f"    {span.describe()}" for span in trace_spans)
        if len(received) > _DUMP_LIMIT:
            lines.append(f"  ... {len(received) - _DUMP_LIMIT} more")
        lines.extend(f"  error: {error}" for error in self.errors)
        return "\n".join(lines)


def span_names(spans: Iterable[ReceivedSpan]) -> list[str]:
    """Names of ``spans`` in order; handy in predicates and assertions."""
    return [span.name for span in spans]


def by_name(spans: Iterable[ReceivedSpan]) -> Mapping[str, ReceivedSpan]:
    """Map span name to span (the last one wins for duplicate names)."""
    return {span.name: span for span in spans}
