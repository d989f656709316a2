"""Spans built from preallocated ids and handed to the SDK's processors when done.

A run's root span starts in the process that kicks it and ends in the process that
sees its end, and a map step's span is opened by the kicking process and closed by
the waiter's. The SDK cannot build a ``Span`` with given ids, but its processors
accept a finished ``ReadableSpan``: flowtrace keeps ids and timings in a small
:class:`SpanRecord`, makes a ``NonRecordingSpan`` with that context current so user
spans nest under it, and emits the ``ReadableSpan`` at the end. Nothing of the
SDK's span machinery runs on the task's path.
"""

from __future__ import annotations

import hashlib
import logging
import random
import traceback
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, StaticSampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from flowtrace import __version__
from flowtrace.events import BaseEvent

logger = logging.getLogger("flowtrace.tracing")

_SCOPE = InstrumentationScope("flowtrace", __version__)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
_random = random.Random()
_UNSET = Status(StatusCode.UNSET)


def new_trace_id() -> int:
    return _random.getrandbits(128) or 1


def new_span_id() -> int:
    return _random.getrandbits(64) or 1


def derived_trace_ids(pipeline_id: str) -> tuple[int, int]:
    """A run's trace id and root span id, derived from its pipeline id alone.

    For a run kicked by a process that does not trace (no ids in its labels): every
    process of the run that does trace derives the same ids, so the run is still one
    trace with one root, whichever worker runs which step. Samplers that decide by
    trace id (always on/off, ratio, parent based) decide alike in every process too.
    """
    digest = hashlib.sha256(f"flowtrace-run:{pipeline_id}".encode()).digest()
    return int.from_bytes(digest[:16], "big") or 1, int.from_bytes(digest[16:24], "big") or 1


def span_context(trace_id: int, span_id: int, sampled: bool) -> SpanContext:
    return SpanContext(trace_id, span_id, is_remote=True,
                       trace_flags=_SAMPLED if sampled else _UNSAMPLED)


def current_parent() -> SpanContext | None:
    """The span active in the caller (a FastAPI request, say), if any."""
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def exception_attributes(exc: BaseException) -> dict[str, Any]:
    """The standard ``exception`` span event's attributes."""
    return {
        "exception.type": type(exc).__qualname__,
        "exception.message": str(exc),
        "exception.stacktrace": "".join(
            traceback.format_exception(type(exc), exc, exc.__traceback__)
        ),
        "exception.escaped": False,
    }


_NOT_SPAN_ATTRIBUTES = frozenset({"type", "id", "timestamp", "trace_id", "span_id", "input",
                                  "result", "steps"})
_span_attribute_keys: dict[type[BaseEvent], tuple[tuple[str, str], ...]] = {}


def span_event_attributes(event: BaseEvent) -> dict[str, Any]:
    """A lifecycle event's scalar fields, prefixed ``flowtrace.`` (SPEC §4: its span event's
    attributes). Payload previews stay out of traces."""
    keys = _span_attribute_keys.get(type(event))
    if keys is None:
        keys = _span_attribute_keys[type(event)] = tuple(
            (name, f"flowtrace.{name}") for name in type(event).model_fields
            if name not in _NOT_SPAN_ATTRIBUTES
        )
    values = event.__dict__
    # What is left after _NOT_SPAN_ATTRIBUTES is scalar or None; None is left out.
    return {key: value for name, key in keys if (value := values[name]) is not None}


SpanEventSource = dict[str, Any] | BaseEvent
"""A span event's attributes, or the lifecycle event they are taken from when the span ends."""


@dataclass(slots=True)
class SpanRecord:
    """A span in progress: ids, times, attributes and events, nothing else."""

    name: str
    trace_id: int
    span_id: int
    parent_span_id: int
    start_ns: int
    sampled: bool
    kind: SpanKind = SpanKind.INTERNAL
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, SpanEventSource, int]] = field(default_factory=list)
    error: str | None = None
    _context: SpanContext | None = None

    @property
    def context(self) -> SpanContext:
        context = self._context
        if context is None:
            context = self._context = span_context(self.trace_id, self.span_id, self.sampled)
        return context

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    @property
    def span_id_hex(self) -> str:
        return f"{self.span_id:016x}"

    def as_current(self) -> NonRecordingSpan:
        """A span to make current so that user spans become children of this one."""
        return NonRecordingSpan(self.context)

    def add_event(self, name: str, attributes: SpanEventSource, time_ns: int) -> None:
        if self.sampled:
            self.events.append((name, attributes, time_ns))

    def record_exception(self, exc: BaseException, time_ns: int) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        self.add_event("exception", exception_attributes(exc), time_ns)


class _SpanEvent(SpanEvent):
    """The SDK's span event, built in one step (its ``__init__`` chain is the slow part)."""

    def __init__(self, name: str, attributes: dict[str, Any], timestamp: int) -> None:
        self._name = name
        self._attributes = attributes
        self._timestamp = timestamp


def _static_root_decision(sampler: object) -> bool | None:
    """The fixed decision for runs with no parent span (always on/off), else None.

    The SDK's default, ``ParentBased(ALWAYS_ON)``, needs no per-run sampler call.
    """
    root = getattr(sampler, "_root", None) if type(sampler) is ParentBased else sampler
    if type(root) is StaticSampler:
        return bool(root._decision.is_sampled())  # type: ignore[no-untyped-call]
    return None


class SpanSink:
    """Hands finished :class:`SpanRecord` s to a provider's span processors."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._processor = getattr(provider, "_active_span_processor", None)
        self._root_decision = _static_root_decision(provider.sampler)

    def sample(self, trace_id: int, name: str, parent: SpanContext | None) -> bool:
        """Whether a new run is recorded: the parent's decision, else the provider's sampler."""
        if parent is not None:
            return parent.trace_flags.sampled
        if self._root_decision is not None:
            return self._root_decision
        try:
            result = self.provider.sampler.should_sample(None, trace_id, name)
            return bool(result.decision.is_sampled())  # type: ignore[no-untyped-call]
        except Exception:
            logger.exception("flowtrace: sampler failed; recording the run")
            return True

    def emit(self, record: SpanRecord, end_ns: int) -> None:
        if not record.sampled or self._processor is None:
            return
        parent = (
            span_context(record.trace_id, record.parent_span_id, True)
            if record.parent_span_id else None
        )
        status = _UNSET if record.error is None else Status(StatusCode.ERROR, record.error)
        span = ReadableSpan(
            name=record.name,
            context=record.context,  # sampled: only sampled spans get here
            parent=parent,
            resource=self.provider.resource,
            attributes=record.attributes,
            events=[
                _SpanEvent(name, source if isinstance(source, dict)
                           else span_event_attributes(source), ts)
                for name, source, ts in record.events
            ],
            kind=record.kind,
            status=status,
            start_time=record.start_ns,
            end_time=max(end_ns, record.start_ns),
            instrumentation_scope=_SCOPE,
        )
        try:
            self._processor.on_end(span)
        except Exception:
            logger.exception("flowtrace: span processor failed")
