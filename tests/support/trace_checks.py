"""Checks shared by the tests that read spans from the OTLP receiver."""

from __future__ import annotations

from typing import Any

from flowtrace.events import StepCompleteEvent, StepErrorEvent, StepProgressEvent, StepStartEvent
from tests.support.otlp_receiver import ReceivedSpan


def event_names(span: ReceivedSpan) -> list[str]:
    return [e.name for e in span.events]


#: Event fields that are not span event attributes (SPEC §4: the *scalar* fields; ids and
#: time are the span's and the span event's own; payload previews stay out of traces).
NOT_SCALAR = {"type", "id", "timestamp", "trace_id", "span_id", "input", "result", "steps"}


def assert_span_event(event: Any, span: ReceivedSpan) -> None:
    """SPEC §4: the span event named after ``event`` carries its scalar fields, prefixed."""
    expected = {f"flowtrace.{name}": value
                for name, value in event.model_dump(mode="json").items()
                if name not in NOT_SCALAR and value is not None}
    recorded = [e.attributes for e in span.events if e.name == event.type]
    assert expected in recorded, f"{event.type} on {span.name}: {recorded} != {expected}"


def assert_events_match_spans(events: list[Any], spans: list[ReceivedSpan],
                              root: ReceivedSpan) -> None:
    """SPEC §3: each event's ``trace_id``/``span_id`` are those of the span it belongs to."""
    by_id = {s.span_id: s for s in spans if s.trace_id == root.trace_id}
    for event in events:
        assert event.trace_id == root.trace_id, event
        span = by_id.get(event.span_id or "")
        assert span is not None, f"{event!r}: no span {event.span_id} in the trace"
        if event.type.startswith("Pipeline"):
            assert span is root, event
            continue
        assert isinstance(event, (StepStartEvent, StepProgressEvent, StepCompleteEvent,
                                  StepErrorEvent))
        assert span.parent_span_id == root.span_id, event
        assert span.attributes["flowtrace.step.index"] == event.step_index, event
        assert span.attributes["flowtrace.step.name"] == event.step_name, event
        if not isinstance(event, StepProgressEvent):
            assert span.attributes["flowtrace.step.attempt"] == event.attempt, event
            assert_span_event(event, span)
