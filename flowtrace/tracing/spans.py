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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, StaticSampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import INVALID_SPAN, NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from flowtrace import __version__
from flowtrace.events import EVENT_CLASSES

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


def _checked_span_context(trace_id: int, span_id: int, sampled: bool) -> SpanContext:
    return SpanContext(trace_id, span_id, is_remote=True,
                       trace_flags=_SAMPLED if sampled else _UNSAMPLED)


_new_tuple = tuple.__new__
_DEFAULT_STATE = _checked_span_context(1, 1, True).trace_state
_MAX_TRACE_ID = 2**128 - 1
_MAX_SPAN_ID = 2**64 - 1


def _direct_span_context(trace_id: int, span_id: int, sampled: bool) -> SpanContext:
    """What ``SpanContext(...)`` builds, without its Python ``__new__`` (ids flowtrace made)."""
    return _new_tuple(SpanContext, (
        trace_id, span_id, True, _SAMPLED if sampled else _UNSAMPLED, _DEFAULT_STATE,
        0 < trace_id <= _MAX_TRACE_ID and 0 < span_id <= _MAX_SPAN_ID,
    ))


def _direct_construction_fits() -> bool:
    """Whether this SDK's SpanContext is still the 6-tuple :func:`_direct_span_context` builds."""
    try:
        return all(
            _direct_span_context(*ids) == _checked_span_context(*ids)
            and _direct_span_context(*ids).is_valid == _checked_span_context(*ids).is_valid
            for ids in ((5, 7, True), (5, 7, False), (0, 7, True), (2**127, 2**63, True))
        )
    except Exception:  # noqa: BLE001 - any surprise: use the SDK's constructor
        return False


span_context = _direct_span_context if _direct_construction_fits() else _checked_span_context
"""A remote, valid SpanContext for ids flowtrace allocated (``sampled`` sets its flags)."""


def current_parent() -> SpanContext | None:
    """The span active in the caller (a FastAPI request, say), if any."""
    span = trace.get_current_span()
    if span is INVALID_SPAN:  # nothing is current: the usual case, answered at once
        return None
    context = span.get_span_context()
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
_span_attribute_keys: dict[str, tuple[tuple[str, str], ...]] = {}


def span_event_attributes(fields: dict[str, Any]) -> dict[str, Any]:
    """A lifecycle event's scalar fields (its ``__dict__``), prefixed ``flowtrace.``: SPEC §4's
    attributes of its span event. Payload previews stay out of traces."""
    event_type = fields["type"]
    keys = _span_attribute_keys.get(event_type)
    if keys is None:
        keys = _span_attribute_keys[event_type] = tuple(
            (name, f"flowtrace.{name}") for name in EVENT_CLASSES[event_type].model_fields
            if name not in _NOT_SPAN_ATTRIBUTES
        )
    # What is left after _NOT_SPAN_ATTRIBUTES is scalar or None; None is left out.
    return {key: value for name, key in keys if (value := fields[name]) is not None}


def run_start_attributes(span_attributes: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
    """The PipelineStartEvent span event's attributes, from its (root) span's attributes.

    The process that ends a run's root span never saw the PipelineStartEvent (the kicker
    emitted it): the run's identity is on the span, the step count is all it adds.
    """
    return {
        "flowtrace.pipeline_id": span_attributes.get("flowtrace.pipeline.id"),
        "flowtrace.pipeline_name": span_attributes.get("flowtrace.pipeline.name"),
        "flowtrace.pipeline_type": span_attributes.get("flowtrace.pipeline.type"),
        "flowtrace.total_steps": total_steps,
    }


SpanEventSource = dict[str, Any] | int
"""What a span event's attributes are made of when an exporter reads them: ready attributes
(no ``type`` key), a lifecycle event's fields (its ``__dict__``: :func:`span_event_attributes`)
or, for the PipelineStartEvent, the run's step count (:func:`run_start_attributes`)."""


def _attributes_of(source: SpanEventSource, span_attributes: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, int):
        return run_start_attributes(span_attributes, source)
    return span_event_attributes(source) if "type" in source else source


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
    events: list[Any] = field(default_factory=list)
    """Flat: ``name, source, time_ns`` per span event (one list, no tuple per event)."""
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
        return "%032x" % self.trace_id  # noqa: UP031 - no bound __format__ per call

    @property
    def span_id_hex(self) -> str:
        return "%016x" % self.span_id  # noqa: UP031

    def as_current(self) -> NonRecordingSpan:
        """A span to make current so that user spans become children of this one."""
        return NonRecordingSpan(self.context)

    def add_event(self, name: str, attributes: SpanEventSource, time_ns: int) -> None:
        if self.sampled:
            self.events += (name, attributes, time_ns)

    def record_exception(self, exc: BaseException, time_ns: int) -> None:
        self.error = f"{type(exc).__name__}: {exc}"
        self.add_event("exception", exception_attributes(exc), time_ns)


class _SpanEvent(SpanEvent):
    """The SDK's span event, built in one step (its ``__init__`` chain is the slow part)."""

    def __init__(self, name: str, attributes: dict[str, Any], timestamp: int) -> None:
        self._name = name
        self._attributes = attributes
        self._timestamp = timestamp


def _span_events(flat: list[Any], span_attributes: Mapping[str, Any]) -> tuple[SpanEvent, ...]:
    """SDK span events from a :attr:`SpanRecord.events` list."""
    return tuple(
        _SpanEvent(flat[i], _attributes_of(flat[i + 1], span_attributes), flat[i + 2])
        for i in range(0, len(flat), 3)
    )


class _FinishedSpan(ReadableSpan):
    """A finished span that builds its SDK objects (contexts, span events) when they are read.

    Exporters read them in the span processor's thread: the task pays for none of them,
    and a span waiting in the processor's queue holds only what this object holds.
    """

    def __init__(self, record: SpanRecord, resource: Resource, status: Status,
                 end_time: int) -> None:
        # ReadableSpan.__init__'s assignments, but for the three that are properties here.
        self._name = record.name
        self._kind = record.kind
        self._instrumentation_info = None
        self._instrumentation_scope = _SCOPE
        self._start_time = record.start_ns
        self._end_time = end_time
        self._attributes = record.attributes
        self._links = ()
        self._resource = resource
        self._status = status
        self._context = record.context  # made when the span was made current
        self._trace_id = record.trace_id
        self._parent_id = record.parent_span_id  # its context is built only if read
        self._event_data: list[Any] | Sequence[SpanEvent] = record.events

    @property
    def _parent(self) -> SpanContext | None:
        parent_id = self._parent_id
        return span_context(self._trace_id, parent_id, True) if parent_id else None

    @_parent.setter
    def _parent(self, parent: SpanContext | None) -> None:
        self._parent_id = parent.span_id if parent is not None else 0

    @property
    def _events(self) -> Sequence[SpanEvent]:
        data = self._event_data
        if isinstance(data, list):
            data = self._event_data = _span_events(data, self._attributes or {})
        return data

    @_events.setter
    def _events(self, events: Sequence[SpanEvent]) -> None:
        self._event_data = tuple(events)


def _finished_span_fits() -> bool:
    """Whether :class:`_FinishedSpan` sets what this SDK's ``ReadableSpan.__init__`` sets."""
    try:
        reference = ReadableSpan("x", resource=Resource.get_empty())
        record = SpanRecord("x", 1, 2, 3, 1, True, events=["e", {}, 1])
        ours = _FinishedSpan(record, Resource.get_empty(), _UNSET, 2)
        expected = set(vars(reference)) - {"_events", "_parent"}
        ours_only = {"_trace_id", "_parent_id", "_event_data"}
        return (set(vars(ours)) - ours_only == expected
                and len(ours.events) == 1 and ours.parent is not None
                and ours.context.span_id == 2 and ours.context.trace_flags.sampled)
    except Exception:  # noqa: BLE001 - any surprise: build spans the SDK's way
        return False


_LAZY = _finished_span_fits()


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

    def sample(self, trace_id: int, run_name: str, parent: SpanContext | None) -> bool:
        """Whether a new run is recorded: the parent's decision, else the provider's sampler
        (asked about the root span, ``pipeline {run_name}``)."""
        if parent is not None:
            return parent.trace_flags.sampled
        if self._root_decision is not None:
            return self._root_decision
        try:
            result = self.provider.sampler.should_sample(None, trace_id, f"pipeline {run_name}")
            return bool(result.decision.is_sampled())  # type: ignore[no-untyped-call]
        except Exception:
            logger.exception("flowtrace: sampler failed; recording the run")
            return True

    def emit(self, record: SpanRecord, end_ns: int) -> None:
        if not record.sampled or self._processor is None:
            return
        status = _UNSET if record.error is None else Status(StatusCode.ERROR, record.error)
        end_ns = max(end_ns, record.start_ns)
        span: ReadableSpan
        if _LAZY:
            span = _FinishedSpan(record, self.provider.resource, status, end_ns)
        else:
            parent = (
                span_context(record.trace_id, record.parent_span_id, True)
                if record.parent_span_id else None
            )
            span = ReadableSpan(
                name=record.name, context=record.context, parent=parent,
                resource=self.provider.resource, attributes=record.attributes,
                events=_span_events(record.events, record.attributes), kind=record.kind,
                status=status,
                start_time=record.start_ns, end_time=end_ns, instrumentation_scope=_SCOPE,
            )
        try:
            self._processor.on_end(span)
        except Exception:
            logger.exception("flowtrace: span processor failed")
