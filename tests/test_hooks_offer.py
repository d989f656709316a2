"""A hook is offered only the events it has a method for (SPEC §2): events it would not
be called with never take room in its bounded backlog, so they cannot crowd out (or be
counted as dropping) the ones it wants. Real HookManager on a real event loop."""

from __future__ import annotations

from typing import Any

import pytest

from flowtrace import metrics
from flowtrace.events import BaseEvent, EventFields, PipelineErrorEvent, StepStartEvent
from flowtrace.hooks import HookManager
from tests.support.waiting import async_wait_until


class ErrorAlerts:
    """Only ``on_pipeline_error``, like the README's alerting hook."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def on_pipeline_error(self, event: PipelineErrorEvent) -> None:
        self.seen.append(event.pipeline_id)


def backlog_drops() -> float:
    value = metrics.PROCESS_REGISTRY.get_sample_value(
        "flowtrace_events_dropped_total", {"reason": metrics.DROP_HOOK_BACKLOG})
    return value or 0.0


def as_form(event: BaseEvent, form: str) -> BaseEvent | EventFields:
    """The event as a model (the gateway's form) or as its fields (the middleware's)."""
    return event if form == "model" else dict(event.__dict__)


@pytest.mark.parametrize("form", ["model", "fields"])
async def test_events_a_hook_has_no_method_for_do_not_fill_its_backlog(form: str) -> None:
    hooks = HookManager(backlog=5)
    alerts = ErrorAlerts()
    hooks.add_hook(alerts)
    drops_before = backlog_drops()
    failed = [f"run-{i}" for i in range(0, 100, 20)]  # as many as the backlog holds
    # All offered before the hook's worker runs: only what it was offered is queued.
    for i in range(100):
        hooks.emit_nowait(as_form(StepStartEvent(pipeline_id=f"run-{i}", step_name="s"), form))
        if f"run-{i}" in failed:
            hooks.emit_nowait(as_form(PipelineErrorEvent(pipeline_id=f"run-{i}", error="x"), form))

    await async_wait_until(lambda: len(alerts.seen) == len(failed), message="every alert")
    assert alerts.seen == failed
    assert hooks.dropped == 0
    assert backlog_drops() == drops_before
    await hooks.close()


async def test_drops_count_only_events_the_hook_would_have_received() -> None:
    hooks = HookManager(backlog=2)
    alerts = ErrorAlerts()
    hooks.add_hook(alerts)
    drops_before = backlog_drops()
    for i in range(5):
        hooks.emit_nowait(StepStartEvent(pipeline_id=f"run-{i}", step_name="s"))
        hooks.emit_nowait(PipelineErrorEvent(pipeline_id=f"run-{i}", error="x"))

    await async_wait_until(lambda: len(alerts.seen) == 2, message="the alerts that fit")
    assert alerts.seen == ["run-0", "run-1"]
    assert hooks.dropped == 3
    assert backlog_drops() == drops_before + 3
    await hooks.close()


class MyError(PipelineErrorEvent):
    """A user's own event class: its ``type`` (the base's) picks the hook method."""


async def test_a_subclassed_event_reaches_the_method_of_its_type() -> None:
    hooks = HookManager()
    alerts = ErrorAlerts()
    hooks.add_hook(alerts)
    await hooks.dispatch(MyError(pipeline_id="mine", error="x"))
    await async_wait_until(lambda: alerts.seen == ["mine"], message="the subclassed event")
    await hooks.close()


async def test_a_hook_with_on_event_still_gets_every_event() -> None:
    class Everything:
        def __init__(self) -> None:
            self.types: list[str] = []

        def on_event(self, event: Any) -> None:
            self.types.append(event.type)

    hooks = HookManager(backlog=3)
    everything = Everything()
    hooks.add_hook(everything)
    hooks.emit_nowait(StepStartEvent(pipeline_id="r", step_name="s"))
    hooks.emit_nowait(PipelineErrorEvent(pipeline_id="r", error="x"))
    await async_wait_until(lambda: len(everything.types) == 2, message="both events")
    assert everything.types == ["StepStartEvent", "PipelineErrorEvent"]
    await hooks.close()
