"""Collect events the way a user's hook would, and check their shape."""

from __future__ import annotations

from collections.abc import Iterable

from flowtrace.events import TERMINAL_TYPES, BaseEvent, parse_event
from tests.support.waiting import async_wait_until


class Collector:
    """A hook that keeps every event it sees."""

    def __init__(self) -> None:
        self.events: list[BaseEvent] = []

    def on_event(self, event: BaseEvent) -> None:
        self.events.append(event)

    def of(self, pipeline_id: str) -> list[BaseEvent]:
        return [e for e in self.events if e.pipeline_id == pipeline_id]

    def finished(self, pipeline_id: str) -> bool:
        return any(e.type in TERMINAL_TYPES for e in self.of(pipeline_id))  # type: ignore[attr-defined]

    async def wait_terminal(self, pipeline_id: str, timeout: float = 20) -> list[BaseEvent]:
        await async_wait_until(
            lambda: any(e.type in TERMINAL_TYPES for e in self.of(pipeline_id)),  # type: ignore[attr-defined]
            timeout=timeout, message=f"terminal event of {pipeline_id}",
        )
        return self.of(pipeline_id)


def shape(events: Iterable[BaseEvent]) -> list[tuple[str, int | None]]:
    """(type, step_index) of each event, the sequence tests compare exactly."""
    return [(e.type, getattr(e, "step_index", None)) for e in events]  # type: ignore[attr-defined]


def check_common(events: list[BaseEvent], pipeline_id: str, name: str, kind: str) -> None:
    """Fields every event of a run shares, causal order, one terminal, JSON round trip."""
    assert events, "no events"
    assert events[0].type == "PipelineStartEvent"  # type: ignore[attr-defined]
    terminals = [e for e in events if e.type in TERMINAL_TYPES]  # type: ignore[attr-defined]
    assert len(terminals) == 1 and events[-1] is terminals[0]
    timestamps = [e.timestamp for e in events]
    assert timestamps == sorted(timestamps)
    for event in events:
        assert event.pipeline_id == pipeline_id
        assert event.pipeline_name == name
        assert event.pipeline_type == kind
        assert event.timestamp.tzinfo is not None
        assert parse_event(event.model_dump(mode="json")).model_dump() == event.model_dump()
        # Built without validation on the hot path: every field, in declared order.
        assert list(event.__dict__) == list(type(event).model_fields), type(event).__name__
    started: set[int] = set()
    finished: set[int] = set()
    for event in events:
        index = getattr(event, "step_index", None)
        if event.type == "StepStartEvent":  # type: ignore[attr-defined]
            assert index is not None and all(i < index for i in finished | started - {index})
            assert all(i in finished for i in range(index)), f"step {index} started early"
            started.add(index)
        elif index is not None:
            assert index in started, f"{event.type} of step {index} before its start"  # type: ignore[attr-defined]
            if event.type == "StepCompleteEvent" or (  # type: ignore[attr-defined]
                event.type == "StepErrorEvent" and not event.will_retry  # type: ignore[attr-defined]
            ):
                finished.add(index)
