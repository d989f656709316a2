"""OpenTelemetry for flowtrace: provider setup and cheap, preallocated spans."""

from flowtrace.tracing.setup import configure_tracing, flush_tracing
from flowtrace.tracing.spans import SpanRecord, SpanSink

__all__ = ["SpanRecord", "SpanSink", "configure_tracing", "flush_tracing"]
