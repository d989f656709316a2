"""Find or build the SDK ``TracerProvider`` flowtrace exports through.

An application that installed its own SDK provider keeps it. Otherwise, when the
standard ``OTEL_*`` environment asks for OTLP (or the console), flowtrace builds a
provider with a batch processor and the gRPC or ``http/protobuf`` exporter, as the
environment says. With neither, tracing is off and events carry no trace ids.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)

logger = logging.getLogger("flowtrace.tracing")

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_owned_provider: TracerProvider | None = None


def _exporter_names() -> list[str]:
    """The exporters the ``OTEL_*`` environment asks for: ``otlp``, ``console``, or none.

    ``OTEL_TRACES_EXPORTER`` is a comma-separated list, as in the SDK's own setup. Left
    unset, an OTLP endpoint variable alone turns OTLP on; with neither, tracing is off.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    value = os.environ.get("OTEL_TRACES_EXPORTER", "").strip()
    if not value:
        return ["otlp"] if any(os.environ.get(name) for name in _ENDPOINT_VARS) else []
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    if "none" in names:
        return []
    for name in names:
        if name not in _EXPORTERS:
            logger.warning("flowtrace: OTEL_TRACES_EXPORTER names %r, which flowtrace does "
                           "not know (it knows %s): ignored", name, ", ".join(_EXPORTERS))
    return [name for name in dict.fromkeys(names) if name in _EXPORTERS]


def _otlp_exporter() -> SpanExporter:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).lower()
    if protocol.startswith("http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter()


_EXPORTERS: dict[str, Callable[[], SpanExporter]] = {
    "otlp": _otlp_exporter,
    "console": ConsoleSpanExporter,
}


def configure_tracing(service_name: str | None = None) -> TracerProvider | None:
    """The SDK provider to export through, building one from ``OTEL_*`` when needed."""
    global _owned_provider
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    if _owned_provider is not None:
        return _owned_provider
    names = _exporter_names()
    if not names:
        return None
    attributes = {}
    if service_name and not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service_name
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_EXPORTERS[name]()))
    trace.set_tracer_provider(provider)
    _owned_provider = provider
    logger.info("flowtrace: exporting traces (%s)", ", ".join(names))
    return provider


def flush_tracing(provider: TracerProvider | None, timeout_ms: int = 10_000) -> bool:
    """Export every finished span now (worker shutdown), waiting at most ``timeout_ms``.

    Blocking: call it off the event loop. The SDK's ``force_flush`` ignores its timeout
    (it exports in the calling thread for as long as the exporter keeps retrying, up to
    ``OTEL_EXPORTER_OTLP_TIMEOUT``), so it runs in a daemon thread that this call stops
    waiting for after ``timeout_ms``, and that an exiting process does not wait for:
    an unreachable collector cannot hold a worker's shutdown longer than that.
    True when everything was handed to the exporter in time.
    """
    if provider is None:
        return True
    done = threading.Event()

    def flush() -> None:
        try:
            provider.force_flush(timeout_ms)
        except Exception:
            logger.exception("flowtrace: flushing spans failed")
        finally:
            done.set()

    threading.Thread(target=flush, name="flowtrace-span-flush", daemon=True).start()
    if done.wait(timeout_ms / 1000):
        return True
    logger.warning("flowtrace: spans not exported within %d ms; giving up", timeout_ms)
    return False
