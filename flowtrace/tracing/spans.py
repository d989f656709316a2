"""Spans built from preallocated ids and handed to the SDK's processors when done.

A run's root span starts in the process that kicks it and ends in the process that
sees its end, and a map step's span is opened by the kicking process and closed by
the waiter's. The SDK cannot build a ``Span`` with given ids, but its processors
accept a finished ``ReadableSpan``: a :class:`SpanRecord` keeps ids, timings,
attributes and events, is made current as a ``NonRecordingSpan`` so that user spans
nest under it, and is itself the ``ReadableSpan`` emitted at the end. Nothing of the
SDK's span machinery runs on the task's path.
"""

from __future__ import annotations

import hashlib
import logging
import random
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, cast

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.sampling import ParentBased, StaticSampler
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
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


class _SpanEvent(SpanEvent):
    """The SDK's span event, built in one step (its ``__init__`` chain is the slow part)."""

    def __init__(self, name: str, attributes: dict[str, Any], timestamp: int) -> None:
        self._name = name
        self._attributes = attributes
        self._timestamp = timestamp


def _span_events(flat: Sequence[Any], span_attributes: Mapping[str, Any]) -> tuple[SpanEvent, ...]:
    """SDK span events from a :attr:`SpanRecord.event_data` list."""
    return tuple(
        _SpanEvent(flat[i], _attributes_of(flat[i + 1], span_attributes), flat[i + 2])
        for i in range(0, len(flat), 3)
    )


_EMPTY_RESOURCE = Resource.get_empty()


class SpanRecord(ReadableSpan, NonRecordingSpan):
    """One span, one object from start to end.

    While its step runs it is the current span: a ``NonRecordingSpan``, so user spans
    become its children and its own ``Span`` methods are no-ops, as on any span that is
    not recording. flowtrace fills in its attributes and events (``record_*``). When it
    ends it is the ``ReadableSpan`` handed to the span processors; the SDK objects that
    exporters read (contexts, span events) are built when they are read, in the span
    processor's thread.

    What every span shares is a class attribute: building one sets nine attributes.
    """

    _end_time: int | None = None
    _status = _UNSET
    _resource = _EMPTY_RESOURCE
    _links = ()
    _instrumentation_info = None
    _instrumentation_scope = _SCOPE
    _built_events: tuple[SpanEvent, ...] | None = None
    error: str | None = None

    def __init__(self, name: str, trace_id: int, span_id: int, parent_span_id: int,
                 start_ns: int, sampled: bool, kind: SpanKind = SpanKind.INTERNAL,
                 attributes: dict[str, Any] | None = None,
                 event_data: list[Any] | None = None) -> None:
        self._name = name
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_span_id = parent_span_id
        self._start_time = start_ns
        self.sampled = sampled
        self._kind = kind
        self._attributes = attributes if attributes is not None else {}
        self.event_data: list[Any] = event_data if event_data is not None else []
        """Flat: ``name, source, time_ns`` per span event (one list, no tuple per event)."""

    @property
    def _context(self) -> SpanContext:
        """Built when read, not kept: a span waiting in the processor's queue (or kept by an
        in-memory exporter) holds one object the garbage collector tracks, not two."""
        return span_context(self.trace_id, self.span_id, self.sampled)

    # The setters keep ``ReadableSpan``'s attributes writable, as the SDK declares them;
    # flowtrace itself never assigns them.
    @_context.setter
    def _context(self, context: SpanContext) -> None:
        self.trace_id, self.span_id = context.trace_id, context.span_id
        self.sampled = context.trace_flags.sampled

    def get_span_context(self) -> SpanContext:
        return self._context

    @property
    def _parent(self) -> SpanContext | None:
        parent_id = self.parent_span_id
        return span_context(self.trace_id, parent_id, True) if parent_id else None

    @_parent.setter
    def _parent(self, parent: SpanContext | None) -> None:
        self.parent_span_id = parent.span_id if parent is not None else 0

    @property
    def _events(self) -> Sequence[SpanEvent]:
        built = self._built_events
        if built is None:
            built = self._built_events = _span_events(self.event_data, self._attributes or {})
        return built

    @_events.setter
    def _events(self, events: Sequence[SpanEvent]) -> None:
        self._built_events = tuple(events)

    @property
    def span_id_hex(self) -> str:
        return "%016x" % self.span_id  # noqa: UP031 - no bound __format__ per call

    def record_attributes(self, attributes: Mapping[str, Any]) -> None:
        cast(dict[str, Any], self._attributes).update(attributes)  # a dict: see __init__

    def record_event(self, name: str, attributes: SpanEventSource, time_ns: int) -> None:
        if self.sampled:
            self.event_data += (name, attributes, time_ns)

    def record_error(self, exc: BaseException, time_ns: int) -> None:
        """Status ERROR and the standard ``exception`` span event."""
        self.error = f"{type(exc).__name__}: {exc}"
        self.record_event("exception", exception_attributes(exc), time_ns)

    def finish(self, resource: Resource, end_ns: int) -> None:
        self._resource = resource
        self._end_time = max(end_ns, self._start_time)  # type: ignore[type-var]
        if self.error is not None:
            self._status = Status(StatusCode.ERROR, self.error)

    def as_sdk_span(self) -> ReadableSpan:
        """The same span as the SDK builds it (when :data:`_LAZY` is off)."""
        return ReadableSpan(
            name=self._name, context=self._context, parent=self._parent,
            resource=self._resource, attributes=self._attributes, events=self._events,
            kind=self._kind, status=self._status, start_time=self._start_time,
            end_time=self._end_time, instrumentation_scope=_SCOPE,
        )


def _record_fits() -> bool:
    """Whether a finished :class:`SpanRecord` has what this SDK's ``ReadableSpan`` has."""
    try:
        reference = ReadableSpan("x", resource=Resource.get_empty())
        ours = SpanRecord("x", 1, 2, 3, 1, True, event_data=["e", {}, 1])
        ours.finish(_EMPTY_RESOURCE, 2)
        return (all(hasattr(ours, name) for name in vars(reference))
                and len(ours.events) == 1 and (parent := ours.parent) is not None
                and parent.span_id == 3 and ours.get_span_context().span_id == 2
                and ours.context.trace_flags.sampled and not ours.is_recording()
                and ours.end_time == 2 and ours.status.status_code is StatusCode.UNSET)
    except Exception:  # noqa: BLE001 - any surprise: hand the SDK its own ReadableSpan
        return False


_LAZY = _record_fits()


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
        record.finish(self.provider.resource, end_ns)
        try:
            self._processor.on_end(record if _LAZY else record.as_sdk_span())
        except Exception:
            logger.exception("flowtrace: span processor failed")
