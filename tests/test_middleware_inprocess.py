"""The event spine on taskiq's InMemoryBroker: every run kind, every field."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from taskiq import InMemoryBroker, TaskiqMiddleware
from taskiq.exceptions import NoResultError
from taskiq.middlewares import SimpleRetryMiddleware, SmartRetryMiddleware
from taskiq_pipelines import Pipeline as PlainPipeline
from taskiq_pipelines import PipelineMiddleware

import flowtrace
from flowtrace import events as events_module
from flowtrace.hooks import EventFilter, HookManager
from flowtrace.middleware import FlowtraceMiddleware
from flowtrace.transport.base import FROM_BEGINNING
from tests.support.collect import Collector, check_common, shape
from tests.support.waiting import async_wait_until

WORKER_PREFIX = f"{socket.gethostname()}:"


def build(order: str = "pipelines-first", retry: TaskiqMiddleware | None = None,
          hooks_extra: object = None,
          **options: Any) -> tuple[InMemoryBroker, Collector, FlowtraceMiddleware]:
    broker = InMemoryBroker(max_stored_results=100_000)
    collector = Collector()
    hooks = HookManager()
    hooks.add_hook(collector)
    if hooks_extra is not None:
        hooks.add_hook(hooks_extra)
    retry = retry or SimpleRetryMiddleware(default_retry_count=3)
    if order == "pipelines-first":
        broker.add_middlewares(PipelineMiddleware(), retry)
        middleware = flowtrace.instrument(broker, hooks=hooks, **options)
    else:
        middleware = FlowtraceMiddleware(hooks=hooks, **options)
        broker.add_middlewares(middleware)
        broker.add_middlewares(retry, PipelineMiddleware())
    attempts: dict[str, int] = {}

    @broker.task(task_name="extract")
    async def extract(n: int) -> list[int]:
        await asyncio.sleep(0.001)
        return list(range(n))

    @broker.task(task_name="double")
    async def double(x: int) -> int:
        await asyncio.sleep(0.001)
        return x * 2

    @broker.task(task_name="is_big")
    async def is_big(x: int) -> bool:
        return x >= 4

    @broker.task(task_name="total")
    async def total(xs: list[int]) -> int:
        await asyncio.sleep(0.001)
        return sum(xs)

    @broker.task(task_name="explode")
    async def explode(_: Any) -> int:
        raise ValueError("invalid input")

    @broker.task(task_name="flaky", retry_on_error=True, max_retries=3)
    async def flaky(x: Any) -> str:
        key = repr(x)
        attempts[key] = attempts.get(key, 0) + 1
        if attempts[key] < 2:
            raise ConnectionError("first attempt fails")
        return "ok"

    @broker.task(task_name="always_fails", retry_on_error=True, max_retries=2)
    async def always_fails(_: Any) -> str:
        raise RuntimeError("still broken")

    @broker.task(task_name="opaque")
    async def opaque(_: Any) -> Any:
        return object()

    @broker.task(task_name="huge")
    async def huge(_: Any) -> str:
        return "x" * 10_000_000

    return broker, collector, middleware


@pytest.fixture(params=["pipelines-first", "flowtrace-first"])
async def env(request: pytest.FixtureRequest) -> AsyncIterator[tuple[InMemoryBroker, Collector]]:
    broker, collector, _ = build(request.param)
    await broker.startup()
    yield broker, collector
    await broker.shutdown()


def task(broker: InMemoryBroker, name: str) -> Any:
    return broker.find_task(name)


async def run_alone(broker: InMemoryBroker, collector: Collector,
                    kickable: Any) -> tuple[str, list[Any]]:
    """Start ``broker``, kick ``kickable`` (a task), wait for its run's last event, stop."""
    await broker.startup()
    try:
        kicked = await kickable.kiq()
        return kicked.task_id, await collector.wait_terminal(kicked.task_id)
    finally:
        await broker.shutdown()


async def test_plain_task_is_a_one_step_run(env: tuple[InMemoryBroker, Collector]) -> None:
    broker, collector = env
    kicked = await task(broker, "double").kiq(21)
    events = await collector.wait_terminal(kicked.task_id)
    assert shape(events) == [("PipelineStartEvent", None), ("StepStartEvent", 0),
                             ("StepCompleteEvent", 0), ("PipelineCompleteEvent", None)]
    check_common(events, kicked.task_id, "double", "task")
    start, step_start, step_done, done = events
    assert start.input == 21 and start.total_steps == 1 and start.steps == ["double"]
    assert step_start.task_id == kicked.task_id and step_start.attempt == 1
    assert step_start.worker.startswith(WORKER_PREFIX)
    assert step_start.queue_wait_ms is not None and step_start.queue_wait_ms >= 0
    assert step_done.result == 42 and step_done.duration_ms > 0
    assert done.result == 42 and done.duration_ms >= step_done.duration_ms


async def test_sequential_pipeline(env: tuple[InMemoryBroker, Collector]) -> None:
    broker, collector = env
    pipeline = flowtrace.Pipeline(broker, task(broker, "extract"), name="etl").call_next(
        task(broker, "total")).call_after(task(broker, "double"), x=6)
    kicked = await pipeline.kiq(4)
    assert (await kicked.wait_result(timeout=10)).return_value == 12
    events = await collector.wait_terminal(kicked.task_id)
    assert shape(events) == [
        ("PipelineStartEvent", None),
        ("StepStartEvent", 0), ("StepCompleteEvent", 0),
        ("StepStartEvent", 1), ("StepCompleteEvent", 1),
        ("StepStartEvent", 2), ("StepCompleteEvent", 2),
        ("PipelineCompleteEvent", None),
    ]
    check_common(events, kicked.task_id, "etl", "sequential")
    assert events[0].steps == ["extract", "total", "double"] and events[0].total_steps == 3
    names = [e.step_name for e in events if e.type == "StepStartEvent"]
    assert names == ["extract", "total", "double"]
    assert events[2].result == [0, 1, 2, 3] and events[-1].result == 12
    step_task_ids = [e.task_id for e in events if e.type == "StepStartEvent"]
    assert len(set(step_task_ids)) == 3 and step_task_ids[-1] == kicked.task_id


async def test_unnamed_pipeline_is_named_after_its_first_step(
        env: tuple[InMemoryBroker, Collector]) -> None:
    broker, collector = env
    kicked = await PlainPipeline(broker, task(broker, "extract")).call_next(
        task(broker, "total")).kiq(3)
    events = await collector.wait_terminal(kicked.task_id)
    check_common(events, kicked.task_id, "extract", "sequential")


async def test_map_and_filter_report_progress_to_the_total(
        env: tuple[InMemoryBroker, Collector]) -> None:
    broker, collector = env
    pipeline = flowtrace.Pipeline(broker, task(broker, "extract"), name="fan").map(
        task(broker, "double")).filter(task(broker, "is_big")).call_next(task(broker, "total"))
    kicked = await pipeline.kiq(5)
    assert (await kicked.wait_result(timeout=10)).return_value == 4 + 6 + 8
    events = await collector.wait_terminal(kicked.task_id)
    check_common(events, kicked.task_id, "fan", "sequential")
    without_progress = [s for s in shape(events) if s[0] != "StepProgressEvent"]
    assert without_progress == [
        ("PipelineStartEvent", None),
        ("StepStartEvent", 0), ("StepCompleteEvent", 0),
        ("StepStartEvent", 1), ("StepCompleteEvent", 1),
        ("StepStartEvent", 2), ("StepCompleteEvent", 2),
        ("StepStartEvent", 3), ("StepCompleteEvent", 3),
        ("PipelineCompleteEvent", None),
    ]
    for index, name in ((1, "double"), (2, "is_big")):
        start = next(e for e in events if e.type == "StepStartEvent" and e.step_index == index)
        assert start.step_name == name and start.queue_wait_ms is None
        progress = [e for e in events if e.type == "StepProgressEvent" and e.step_index == index]
        assert progress, f"no progress for step {index}"
        assert (progress[-1].done, progress[-1].failed, progress[-1].total) == (5, 0, 5)
        complete_at = events.index(next(
            e for e in events if e.type == "StepCompleteEvent" and e.step_index == index))
        assert all(events.index(p) < complete_at for p in progress)
        assert all(a.done <= b.done for a, b in itertools.pairwise(progress))
        assert all((a.done, a.failed) != (b.done, b.failed)  # coalesced: no repeats
                   for a, b in itertools.pairwise(progress)), progress
    kept = next(e for e in events if e.type == "StepCompleteEvent" and e.step_index == 2)
    assert kept.result == [4, 6, 8]


async def test_progress_is_coalesced_for_thousands_of_items() -> None:
    broker, collector, _ = build()
    await broker.startup()
    try:
        pipeline = flowtrace.Pipeline(broker, task(broker, "extract"), name="big").map(
            task(broker, "double"), check_interval=0.05)
        kicked = await pipeline.kiq(3000)
        result = await kicked.wait_result(timeout=60)
        assert len(result.return_value) == 3000
        events = await collector.wait_terminal(kicked.task_id, timeout=60)
        progress = [e for e in events if e.type == "StepProgressEvent"]
        assert 1 <= len(progress) < 100
        assert (progress[-1].done, progress[-1].total) == (3000, 3000)
    finally:
        await broker.shutdown()


async def test_failing_step_fails_the_pipeline(env: tuple[InMemoryBroker, Collector]) -> None:
    broker, collector = env
    pipeline = flowtrace.Pipeline(broker, task(broker, "extract"), name="bad").call_next(
        task(broker, "explode")).call_next(task(broker, "total"))
    kicked = await pipeline.kiq(2)
    events = await collector.wait_terminal(kicked.task_id)
    assert shape(events) == [
        ("PipelineStartEvent", None), ("StepStartEvent", 0), ("StepCompleteEvent", 0),
        ("StepStartEvent", 1), ("StepErrorEvent", 1), ("PipelineErrorEvent", None),
    ]
    check_common(events, kicked.task_id, "bad", "sequential")
    error, failed = events[-2], events[-1]
    assert error.error == "ValueError: invalid input" and error.error_type == "ValueError"
    assert error.will_retry is False and error.duration_ms > 0 and error.attempt == 1
    assert failed.status == "FAILED" and failed.error == "ValueError: invalid input"
    assert failed.failed_step == "explode" and failed.failed_step_index == 1


@contextlib.contextmanager
def logger_level(name: str, level: int) -> Iterator[None]:
    """``name``'s level set as an app's logging config may set it, then restored."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@pytest.mark.parametrize("pipelines_log", ["default", "quiet"])
async def test_map_over_a_non_iterable_aborts(env: tuple[InMemoryBroker, Collector],
                                              pipelines_log: str) -> None:
    """The run fails as aborted, even when the app silenced taskiq-pipelines' logger."""
    broker, collector = env
    pipeline = flowtrace.Pipeline(broker, task(broker, "double"), name="abort").map(
        task(broker, "double"))
    quiet = pipelines_log == "quiet"
    with logger_level("taskiq_pipelines", logging.ERROR) if quiet else contextlib.nullcontext():
        kicked = await pipeline.kiq(3)
        events = await collector.wait_terminal(kicked.task_id)
    assert shape(events) == [("PipelineStartEvent", None), ("StepStartEvent", 0),
                             ("StepCompleteEvent", 0), ("PipelineErrorEvent", None)]
    check_common(events, kicked.task_id, "abort", "sequential")
    assert events[-1].error_type == "AbortPipeline"
    if not quiet:  # the reason is only in taskiq-pipelines' log record
        assert "not iterable" in events[-1].error
    assert events[-1].failed_step_index == 1


@pytest.mark.parametrize("retry", ["simple", "smart"])
async def test_retried_step_reports_each_attempt_and_one_outcome(retry: str) -> None:
    middleware = (SimpleRetryMiddleware(default_retry_count=3) if retry == "simple"
                  else SmartRetryMiddleware(default_retry_count=3, default_delay=0.01))
    broker, collector, _ = build(retry=middleware)
    await broker.startup()
    try:
        pipeline = flowtrace.Pipeline(broker, task(broker, "extract"), name="retry").call_next(
            task(broker, "flaky")).call_next(task(broker, "double"))
        kicked = await pipeline.kiq(2)
        events = await collector.wait_terminal(kicked.task_id)
        assert shape(events) == [
            ("PipelineStartEvent", None), ("StepStartEvent", 0), ("StepCompleteEvent", 0),
            ("StepStartEvent", 1), ("StepErrorEvent", 1),
            ("StepStartEvent", 1), ("StepCompleteEvent", 1),
            ("StepStartEvent", 2), ("StepCompleteEvent", 2),
            ("PipelineCompleteEvent", None),
        ]
        check_common(events, kicked.task_id, "retry", "sequential")
        error = events[4]
        assert error.will_retry is True and error.attempt == 1
        assert error.error == "ConnectionError: first attempt fails"
        assert events[5].attempt == 2 and events[6].attempt == 2
        assert events[5].task_id == events[3].task_id
        assert events[-1].result == "okok"
    finally:
        await broker.shutdown()


async def test_retried_map_items_are_neither_step_retries_nor_counted_twice() -> None:
    """An item's failed attempt that a retry middleware runs again: its own span (ERROR,
    ``will_retry``, one ``exception`` event), no StepErrorEvent for the step, and the
    item counted once, by the attempt that settles it."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    broker, collector, _ = build("flowtrace-first", tracer_provider=provider)
    await broker.startup()
    try:
        pipeline = flowtrace.Pipeline(broker, task(broker, "extract"), name="items").map(
            task(broker, "flaky"))
        kicked = await pipeline.kiq(3)
        assert (await kicked.wait_result(timeout=10)).return_value == ["ok"] * 3
        events = await collector.wait_terminal(kicked.task_id)
    finally:
        await broker.shutdown()
    check_common(events, kicked.task_id, "items", "sequential")
    assert [s for s in shape(events) if s[0] != "StepProgressEvent"] == [
        ("PipelineStartEvent", None), ("StepStartEvent", 0), ("StepCompleteEvent", 0),
        ("StepStartEvent", 1), ("StepCompleteEvent", 1), ("PipelineCompleteEvent", None),
    ]
    progress = [e for e in events if e.type == "StepProgressEvent"]
    assert all(p.done + p.failed <= p.total for p in progress), progress
    assert (progress[-1].done, progress[-1].failed, progress[-1].total) == (3, 0, 3)

    provider.force_flush()
    items = [s for s in exporter.get_finished_spans()
             if "flowtrace.item.index" in (s.attributes or {})]
    assert len({s.context.span_id for s in items}) == len(items) == 6, items
    by_status: dict[StatusCode, list[ReadableSpan]] = {}
    for span in items:
        by_status.setdefault(span.status.status_code, []).append(span)
    failed, succeeded = by_status[StatusCode.ERROR], by_status[StatusCode.UNSET]
    for group, attempt in ((failed, 1), (succeeded, 2)):
        assert sorted((s.attributes or {})["flowtrace.item.index"] for s in group) == [0, 1, 2]
        assert {(s.attributes or {})["flowtrace.step.attempt"] for s in group} == {attempt}
    for span in failed:
        assert [e.name for e in span.events] == ["exception"], span.events
        assert (span.attributes or {})["flowtrace.step.will_retry"] is True


async def test_a_retried_map_waiter_is_a_new_attempt_with_its_own_span() -> None:
    """taskiq-pipelines' waiter raises MappingError when an item failed; a retry middleware
    that retries every task retries the waiter: each attempt of the step starts (a
    StepStartEvent with its attempt number) before it errs, and is a span of its own."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    retry = SimpleRetryMiddleware(default_retry_count=3, default_retry_label=True)
    broker, collector, _ = build("flowtrace-first", retry=retry, tracer_provider=provider)
    await broker.startup()
    try:
        pipeline = flowtrace.Pipeline(broker, task(broker, "extract"), name="waiter").map(
            task(broker, "explode"), check_interval=0.01)
        kicked = await pipeline.kiq(2)
        events = await collector.wait_terminal(kicked.task_id)
    finally:
        await broker.shutdown()
    check_common(events, kicked.task_id, "waiter", "sequential")
    step = [e for e in events if getattr(e, "step_index", None) == 1
            and e.type != "StepProgressEvent"]
    assert [(e.type, e.attempt) for e in step] == [
        ("StepStartEvent", 1), ("StepErrorEvent", 1), ("StepStartEvent", 2),
        ("StepErrorEvent", 2), ("StepStartEvent", 3), ("StepErrorEvent", 3)]
    assert [e.will_retry for e in step if e.type == "StepErrorEvent"] == [True, True, False]
    assert events[-1].type == "PipelineErrorEvent" and events[-1].error_type == "MappingError"

    provider.force_flush()
    attempts = [s for s in exporter.get_finished_spans()
                if (s.attributes or {}).get("flowtrace.step.index") == 1
                and "flowtrace.item.index" not in (s.attributes or {})]
    assert sorted((s.attributes or {})["flowtrace.step.attempt"] for s in attempts) == [1, 2, 3]
    assert len({s.context.span_id for s in attempts}) == 3
    for span in attempts:
        assert next(e.name for e in span.events) == "StepStartEvent", span.events
        assert [e.attributes["flowtrace.attempt"] for e in span.events  # type: ignore[index]
                if e.name == "StepStartEvent"] == [span.attributes["flowtrace.step.attempt"]]  # type: ignore[index]


class _RaisingPostSave(TaskiqMiddleware):
    """A user's middleware whose post_save raises for one task: taskiq skips the later
    post_saves (flowtrace's runs last; PipelineMiddleware's kicks the next hop)."""

    def post_save(self, message: Any, result: Any) -> None:
        if message.task_name == "extract":
            raise RuntimeError("audit log is down")


async def test_a_run_ends_even_when_another_middlewares_post_save_raises() -> None:
    broker, collector, _ = build()
    broker.add_middlewares(_RaisingPostSave())
    await broker.startup()
    try:
        plain = await task(broker, "extract").kiq(3)
        assert (await plain.wait_result(timeout=10)).return_value == [0, 1, 2]
        plain_events = await collector.wait_terminal(plain.task_id)
        pipeline = await flowtrace.Pipeline(broker, task(broker, "extract"), name="hop").call_next(
            task(broker, "total")).kiq(3)
        events = await collector.wait_terminal(pipeline.task_id)
    finally:
        await broker.shutdown()
    check_common(plain_events, plain.task_id, "extract", "task")
    assert plain_events[-1].type == "PipelineCompleteEvent"
    assert plain_events[-1].result == [0, 1, 2]
    check_common(events, pipeline.task_id, "hop", "sequential")
    assert shape(events) == [("PipelineStartEvent", None), ("StepStartEvent", 0),
                             ("StepCompleteEvent", 0), ("PipelineErrorEvent", None)]
    assert events[-1].error == "RuntimeError: audit log is down"
    assert (events[-1].failed_step, events[-1].failed_step_index) == ("total", 1)


async def test_keyword_input_reads_as_args_and_kwargs(
        env: tuple[InMemoryBroker, Collector]) -> None:
    broker, collector = env
    kicked = await task(broker, "double").kiq(x=4)
    events = await collector.wait_terminal(kicked.task_id)
    assert events[0].input == {"args": [], "kwargs": {"x": 4}}
    assert events[-1].result == 8


async def test_huge_error_messages_are_bounded(env: tuple[InMemoryBroker, Collector]) -> None:
    broker, collector = env

    @broker.task(task_name="verbose_failure")
    async def verbose_failure() -> None:
        raise ValueError("x" * 300_000)

    kicked = await verbose_failure.kiq()
    events = await collector.wait_terminal(kicked.task_id)
    step_error, run_error = events[-2], events[-1]
    for event in (step_error, run_error):
        assert event.error.startswith("ValueError: xxx")
        assert event.error.endswith(events_module.TRUNCATION_MARK)
        assert len(event.error) == events_module.ERROR_TEXT_MAX_CHARS


async def test_instrumenting_twice_keeps_one_middleware(
        caplog: pytest.LogCaptureFixture) -> None:
    broker, collector, first = build()
    with caplog.at_level("WARNING", logger="flowtrace"):
        second = flowtrace.instrument(broker, service_name="again")
    assert second is first
    assert "already instrumented" in caplog.text
    assert [m for m in broker.middlewares if isinstance(m, FlowtraceMiddleware)] == [first]
    await broker.startup()
    try:
        pipeline = flowtrace.Pipeline(broker, task(broker, "extract"), name="twice").call_next(
            task(broker, "total"))
        kicked = await pipeline.kiq(3)
        assert (await kicked.wait_result(timeout=10)).return_value == 3
        events = await collector.wait_terminal(kicked.task_id)
    finally:
        await broker.shutdown()
    check_common(events, kicked.task_id, "twice", "sequential")
    assert shape(events) == [
        ("PipelineStartEvent", None), ("StepStartEvent", 0), ("StepCompleteEvent", 0),
        ("StepStartEvent", 1), ("StepCompleteEvent", 1), ("PipelineCompleteEvent", None),
    ]
    assert events[2].result == [0, 1, 2]


async def test_a_plain_task_that_skips_its_result_completes() -> None:
    """taskiq's ``NoResultError``: the task ran and chose to store nothing."""
    broker, collector, _ = build()

    @broker.task(task_name="skips_result")
    async def skips_result() -> int:
        raise NoResultError

    pipeline_id, events = await run_alone(broker, collector, skips_result)
    assert shape(events) == [("PipelineStartEvent", None), ("StepStartEvent", 0),
                             ("StepCompleteEvent", 0), ("PipelineCompleteEvent", None)]
    check_common(events, pipeline_id, "skips_result", "task")
    assert events[-1].result is None


async def test_retries_exhausted_fail_once(env: tuple[InMemoryBroker, Collector]) -> None:
    broker, collector = env
    kicked = await task(broker, "always_fails").kiq(1)
    events = await collector.wait_terminal(kicked.task_id)
    assert shape(events) == [
        ("PipelineStartEvent", None), ("StepStartEvent", 0), ("StepErrorEvent", 0),
        ("StepStartEvent", 0), ("StepErrorEvent", 0), ("PipelineErrorEvent", None),
    ]
    assert [e.will_retry for e in events if e.type == "StepErrorEvent"] == [True, False]
    assert [e.attempt for e in events if e.type == "StepStartEvent"] == [1, 2]
    check_common(events, kicked.task_id, "always_fails", "task")


async def test_non_json_and_huge_results_never_break_anything(
        env: tuple[InMemoryBroker, Collector]) -> None:
    broker, collector = env
    opaque = await task(broker, "opaque").kiq(1)
    huge = await task(broker, "huge").kiq(1)
    opaque_events = await collector.wait_terminal(opaque.task_id)
    huge_events = await collector.wait_terminal(huge.task_id)
    assert opaque_events[-1].type == "PipelineCompleteEvent"
    assert opaque_events[-1].result.startswith("<object object")
    assert huge_events[-1].type == "PipelineCompleteEvent"
    assert len(huge_events[-2].result.encode()) <= 1024
    assert len((await huge.wait_result()).return_value) == 10_000_000


async def test_capture_payloads_off_and_redact() -> None:
    broker, collector, _ = build(redact=lambda v: "***" if isinstance(v, int) else v)
    quiet_broker, quiet, _ = build(capture_payloads=False)
    for b in (broker, quiet_broker):
        await b.startup()
    try:
        kicked = await task(broker, "double").kiq(2)
        events = await collector.wait_terminal(kicked.task_id)
        assert events[0].input == "***" and events[-1].result == "***"
        kicked = await task(quiet_broker, "double").kiq(2)
        events = await quiet.wait_terminal(kicked.task_id)
        assert events[0].input is None and events[-1].result is None
    finally:
        for b in (broker, quiet_broker):
            await b.shutdown()


class RaisingHook:
    def on_step_start(self, event: Any) -> None:
        raise RuntimeError("hook bug")

    async def on_pipeline_complete(self, event: Any) -> None:
        raise RuntimeError("async hook bug")


class SlowHook:
    """An async hook stuck on its first event until the test releases it."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.seen = 0

    async def on_event(self, event: Any) -> None:
        self.started.set()
        await self.release.wait()
        self.seen += 1


class BlockingSyncHook:
    """A sync hook that blocks its thread until the test releases it."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = threading.Event()

    def on_event(self, event: Any) -> None:
        self.calls += 1
        self.release.wait(timeout=60)


async def test_raising_and_slow_hooks_never_slow_or_fail_tasks() -> None:
    from flowtrace import metrics

    before = metrics.HOOK_ERRORS.labels(hook="RaisingHook")._value.get()
    broker, collector, middleware = build()
    slow, blocking = SlowHook(), BlockingSyncHook()
    assert middleware.hooks is not None
    for hook in (RaisingHook(), slow, blocking):
        middleware.hooks.add_hook(hook)
    await broker.startup()
    try:
        pipeline = flowtrace.Pipeline(broker, task(broker, "extract"), name="hooked").call_next(
            task(broker, "total"))
        kicked = await pipeline.kiq(3)
        assert (await kicked.wait_result(timeout=10)).return_value == 3
        await collector.wait_terminal(kicked.task_id)
        # The run finished while the slow hooks are still on their first event.
        assert slow.started.is_set() and slow.seen == 0 and blocking.calls == 1
        await async_wait_until(
            lambda: metrics.HOOK_ERRORS.labels(hook="RaisingHook")._value.get() >= before + 2,
            message="hook errors counted")
        slow.release.set()
        blocking.release.set()
        await async_wait_until(lambda: slow.seen > 0 and blocking.calls > 1,
                               message="released hooks to go on")
    finally:
        slow.release.set()
        blocking.release.set()
        await broker.shutdown()


async def test_hook_backlog_is_bounded_and_overflow_counted() -> None:
    from flowtrace import metrics

    hooks = HookManager(backlog=5)
    slow = SlowHook()
    hooks.add_hook(slow)
    before = metrics.EVENTS_DROPPED.labels(reason="hook_backlog")._value.get()
    broker = InMemoryBroker()
    flowtrace.instrument(broker, hooks=hooks)
    await broker.startup()
    try:
        @broker.task(task_name="noop")
        async def noop() -> None:
            return None

        for _ in range(10):
            await (await noop.kiq()).wait_result(timeout=5)
        dropped = metrics.EVENTS_DROPPED.labels(reason="hook_backlog")._value.get() - before
        assert dropped >= 40 - 6
        assert hooks.dropped == dropped
    finally:
        slow.release.set()
        await broker.shutdown()


async def test_hook_filters_and_clean_shutdown_delivers_queued_events() -> None:
    broker = InMemoryBroker()
    everything, only_errors, only_one = Collector(), Collector(), Collector()
    hooks = HookManager()
    hooks.add_hook(everything)
    hooks.add_hook(only_errors, EventFilter(event_types=["StepErrorEvent", "PipelineErrorEvent"]))
    flowtrace.instrument(broker, hooks=hooks)

    @broker.task(task_name="ok")
    async def ok() -> int:
        return 1

    @broker.task(task_name="ko")
    async def ko() -> int:
        raise KeyError("nope")

    await broker.startup()
    good = await ok.kiq()
    bad = await ko.kiq()
    hooks.add_hook(only_one, EventFilter(pipeline_ids=[bad.task_id]))
    await good.wait_result(timeout=5)
    await bad.wait_result(timeout=5)
    await broker.shutdown()  # must deliver what is queued before returning
    assert {e.type for e in only_errors.events} == {"StepErrorEvent", "PipelineErrorEvent"}
    assert all(e.pipeline_id == bad.task_id for e in only_one.events)
    assert len(everything.of(good.task_id)) == 4 and len(everything.of(bad.task_id)) == 4
    start = everything.of(good.task_id)[0]
    assert start.type == "PipelineStartEvent" and start.input is None  # called with no arguments

    manager_filtered = HookManager()
    manager_filtered.add_filter(EventFilter(event_types=["PipelineStartEvent"]))
    manager_filtered.add_filter(EventFilter(pipeline_ids=["nope"]))
    seen = Collector()
    manager_filtered.add_hook(seen)
    from flowtrace.events import PipelineStartEvent
    await manager_filtered.dispatch(PipelineStartEvent(pipeline_id="nope"))
    await manager_filtered.dispatch(PipelineStartEvent(pipeline_id="other"))
    await manager_filtered.close()
    assert [e.pipeline_id for e in seen.events] == ["nope"]


async def test_a_result_backend_set_after_instrument_still_fails_unstorable_results() -> None:
    """``broker.with_result_backend(...)`` after ``instrument()``: the backend the worker
    stores with is the one whose failures fail the step (SPEC §3)."""
    from taskiq.brokers.inmemory_broker import InmemoryResultBackend

    class Refusing(InmemoryResultBackend[Any]):
        async def set_result(self, task_id: str, result: Any) -> None:
            if result.return_value == "unstorable":
                raise TypeError("cannot store this")
            await super().set_result(task_id, result)

    broker = InMemoryBroker()
    collector = Collector()
    hooks = HookManager()
    hooks.add_hook(collector)
    flowtrace.instrument(broker, hooks=hooks)
    broker.with_result_backend(Refusing())

    @broker.task(task_name="refused")
    async def refused() -> str:
        return "unstorable"

    _, events = await run_alone(broker, collector, refused)
    assert shape(events) == [("PipelineStartEvent", None), ("StepStartEvent", 0),
                             ("StepErrorEvent", 0), ("PipelineErrorEvent", None)]
    assert events[-1].error == "TypeError: cannot store this"  # type: ignore[attr-defined]


def test_hooks_keep_delivering_after_their_event_loop_ends() -> None:
    """A script may run its kicks in two ``asyncio.run`` calls: the first loop cancels the
    hook's worker, the next event starts another one on the new loop."""
    from flowtrace.events import PipelineStartEvent

    hooks = HookManager()
    seen = Collector()
    hooks.add_hook(seen)

    async def dispatch_and_see(pipeline_id: str) -> None:
        await hooks.dispatch(PipelineStartEvent(pipeline_id=pipeline_id))
        await async_wait_until(lambda: bool(seen.of(pipeline_id)), timeout=5,
                               message=f"{pipeline_id} delivered")

    asyncio.run(dispatch_and_see("first loop"))
    asyncio.run(dispatch_and_see("second loop"))
    assert [e.pipeline_id for e in seen.events] == ["first loop", "second loop"]


async def test_pipeline_id_is_what_kiq_returns_and_kicker_publishes_start_first() -> None:
    broker, collector, middleware = build()
    await broker.startup()
    try:
        pipeline = flowtrace.Pipeline(broker, task(broker, "extract"), name="ids").call_next(
            task(broker, "total"))
        kicked = await pipeline.kiq(2)
        # The kicking process published PipelineStartEvent before kiq() returned.
        published = [e async for e in middleware.transport.replay(FROM_BEGINNING)]
        assert published[0].type == "PipelineStartEvent"
        assert published[0].pipeline_id == kicked.task_id and published[0].id is not None
        await collector.wait_terminal(kicked.task_id)
    finally:
        await broker.shutdown()


async def test_metrics_port_serves_this_process_counters() -> None:
    import httpx

    from tests.support.processes import free_port

    port = free_port()
    hooks = HookManager()
    hooks.add_hook(RaisingHook())
    broker = InMemoryBroker()
    flowtrace.instrument(broker, hooks=hooks, metrics_port=port)

    @broker.task(task_name="metered")
    async def metered() -> int:
        return 1

    await broker.startup()
    try:
        await (await metered.kiq()).wait_result(timeout=5)

        async def exposed() -> bool:
            async with httpx.AsyncClient() as client:
                try:
                    text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
                except httpx.HTTPError:
                    return False
            return 'flowtrace_hook_errors_total{hook="RaisingHook"}' in text

        await async_wait_until(exposed, message="hook errors on the metrics port")
    finally:
        await broker.shutdown()


async def test_a_stuck_hook_does_not_cut_off_taskiqs_shutdown(
        caplog: pytest.LogCaptureFixture) -> None:
    """taskiq's worker gives ``broker.shutdown()`` 5 s (``--shutdown-timeout``) and abandons
    it after: flowtrace's wait for its hooks and span flush ends before, so the rest of the
    shutdown (other middlewares, the result backend) still runs."""
    from taskiq.cli.worker.run import shutdown_broker

    release = asyncio.Event()

    class Stuck:
        async def on_event(self, event: Any) -> None:
            await release.wait()  # e.g. an HTTP call with no timeout

    broker, collector, _ = build(hooks_extra=Stuck())
    await broker.startup()
    kicked = await task(broker, "double").kiq(1)
    await collector.wait_terminal(kicked.task_id)
    with caplog.at_level("WARNING"):
        await shutdown_broker(broker, 5)
    release.set()
    assert "cannot be completed" not in caplog.text
