"""SPEC §4 Traces, proven from what a real OTLP receiver gets.

Worker fleets are real ``taskiq worker`` process groups on a private redis-server
(``tests/fleet_app/tracing_worker.py``), configured for tracing only through the
``OTEL_*`` environment from :meth:`OtlpReceiver.env`. The test process kicks the runs
with a broker built from the same module; where it traces (it has to, to join a
FastAPI request's trace), it uses an explicit SDK provider exporting to the receiver.
The last tests run in-process on ``InMemoryBroker`` with an in-memory exporter.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from taskiq import AsyncBroker, InMemoryBroker, SimpleRetryMiddleware
from taskiq.exceptions import NoResultError
from taskiq_pipelines import Pipeline, PipelineMiddleware

import flowtrace
from flowtrace.events import (
    Event,
    PipelineCompleteEvent,
    PipelineErrorEvent,
    PipelineStartEvent,
    StepCompleteEvent,
    StepErrorEvent,
    StepProgressEvent,
    StepStartEvent,
)
from flowtrace.middleware import FlowtraceMiddleware
from flowtrace.tracing.spans import span_event_attributes
from flowtrace.transport import RedisStreamTransport
from flowtrace.transport.base import FROM_BEGINNING
from tests.fleet_app.tracing_worker import make_broker, register_tasks
from tests.support.collect import Collector
from tests.support.otlp_fixture import otlp_receiver
from tests.support.otlp_receiver import OtlpReceiver, Protocol, ReceivedSpan
from tests.support.processes import RedisServer, Workers, free_port
from tests.support.processes import test_env as process_env
from tests.support.trace_checks import assert_events_match_spans, event_names
from tests.support.waiting import async_wait_until

__all__ = ["otlp_receiver"]  # the fixture, used by name

WORKER_REF = "tests.fleet_app.tracing_worker:broker"
WORKER_SERVICE = "flowtrace-worker"
KICKER_SERVICE = "flowtrace-test-api"
PROTOCOLS: list[Protocol] = ["grpc", "http/protobuf"]
RUN_TIMEOUT = 60.0
SPAN_TIMEOUT = 60.0
TERMINAL = (PipelineCompleteEvent, PipelineErrorEvent)

PRODUCE, SQUARE, IS_EVEN = "tracing.produce", "tracing.square", "tracing.is_even"
EXPLODE, FLAKY, USER_SPAN_TASK = "tracing.explode", "tracing.flaky", "tracing.with_user_span"
POKES_SPAN = "tracing.pokes_current_span"
ITEMS = 5
# root + produce + map step + 5 map items + filter step + 5 filter items
MAP_FILTER_SPANS = 1 + 1 + (1 + ITEMS) + (1 + ITEMS)


# Infrastructure -------------------------------------------------------------------


@pytest.fixture
def fleet(redis_server: RedisServer) -> Iterator[Callable[..., Workers]]:
    """Start worker groups on the test's Redis; each is stopped (and its log shown) after."""
    started: list[Workers] = []

    def start(otel_env: dict[str, str], workers: int = 2) -> Workers:
        group = Workers(WORKER_REF, process_env(TEST_REDIS_URL=redis_server.url, **otel_env),
                        workers=workers)
        started.append(group)
        return group

    try:
        yield start
    finally:
        for group in started:
            group.stop()
            print(f"--- worker log {group.log.name} ---\n{group.output()[-6000:]}")


def otlp_provider(receiver: OtlpReceiver, protocol: Protocol, service: str) -> TracerProvider:
    """An SDK provider of the test process, explicitly exporting to ``receiver``."""
    exporter: SpanExporter
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        exporter = GrpcExporter(endpoint=receiver.grpc_endpoint, insecure=True)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        exporter = HttpExporter(endpoint=f"{receiver.http_endpoint}/v1/traces")
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}),
                              shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=100))
    return provider


@dataclass
class Kicker:
    """The test process's side of the fleet: an instrumented broker and the event stream."""

    broker: AsyncBroker
    events: RedisStreamTransport | None = None

    def task(self, name: str) -> Any:
        task = self.broker.find_task(name)
        assert task is not None, name
        return task

    def pipeline(self, *names: str, name: str | None = None) -> Pipeline[Any, Any]:
        """``names[0]`` then ``call_next`` of the others (``map:``/``filter:`` prefixes fan out)."""
        pipeline: Pipeline[Any, Any] = (
            flowtrace.Pipeline(self.broker, self.task(names[0]), name=name) if name
            else Pipeline(self.broker, self.task(names[0]))
        )
        for step in names[1:]:
            kind, _, task_name = step.rpartition(":")
            if kind == "map":
                pipeline = pipeline.map(self.task(task_name), check_interval=0.05)
            elif kind == "filter":
                pipeline = pipeline.filter(self.task(task_name), check_interval=0.05)
            else:
                pipeline = pipeline.call_next(self.task(task_name))
        return pipeline

    async def run(self, pipeline: Pipeline[Any, Any], *args: Any) -> tuple[str, Any]:
        """Kick ``pipeline`` and wait for its result: ``(pipeline_id, TaskiqResult)``."""
        task = await pipeline.kiq(*args)
        result = await task.wait_result(check_interval=0.05, timeout=RUN_TIMEOUT)
        return task.task_id, result

    async def run_events(self, pipeline_id: str) -> list[Event]:
        """Every event of the run in the Redis stream, once its terminal event is there."""
        assert self.events is not None
        stream = self.events

        async def terminal() -> list[Event] | None:
            events = [e async for e in stream.replay(FROM_BEGINNING)
                      if e.pipeline_id == pipeline_id]
            return events if any(isinstance(e, TERMINAL) for e in events) else None

        return await async_wait_until(terminal, timeout=RUN_TIMEOUT, interval=0.05,
                                      message=f"the terminal event of run {pipeline_id}")


@asynccontextmanager
async def kicker(redis_url: str, provider: TracerProvider | None,
                 instrumented: bool = True) -> AsyncIterator[Kicker]:
    """The test process's broker; without flowtrace, workers start the runs (and traces)."""
    broker = make_broker(redis_url)
    if instrumented:
        broker.add_middlewares(FlowtraceMiddleware(transport=RedisStreamTransport(redis_url),
                                                   tracer_provider=provider))
    events = RedisStreamTransport(redis_url)
    await broker.startup()
    try:
        yield Kicker(broker, events)
    finally:
        await broker.shutdown()
        await events.close()
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)


# Reading spans ---------------------------------------------------------------------


def of_run(spans: list[ReceivedSpan], pipeline_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.attributes.get("flowtrace.pipeline.id") == pipeline_id]


def root_of(spans: list[ReceivedSpan], pipeline_id: str) -> ReceivedSpan:
    roots = [s for s in of_run(spans, pipeline_id) if s.name.startswith("pipeline ")]
    assert len(roots) == 1, f"expected one root span for {pipeline_id}, got {roots}"
    return roots[0]


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    """``parent``'s children in start order."""
    found = [s for s in spans
             if s.trace_id == parent.trace_id and s.parent_span_id == parent.span_id]
    return sorted(found, key=lambda s: s.start_ns)


def span_event(span: ReceivedSpan, name: str) -> dict[str, Any]:
    matching = [e for e in span.events if e.name == name]
    assert len(matching) == 1, f"{span.describe()}: expected one {name} event"
    return matching[0].attributes


async def wait_spans(receiver: OtlpReceiver, pipeline_id: str, count: int) -> list[ReceivedSpan]:
    """Wait (off the event loop) until ``count`` spans of the run, its root among them, arrived."""

    def arrived(spans: list[ReceivedSpan]) -> bool:
        mine = of_run(spans, pipeline_id)
        return len(mine) >= count and any(s.name.startswith("pipeline ") for s in mine)

    return await asyncio.to_thread(receiver.wait_for_spans, arrived, SPAN_TIMEOUT,
                                   f"{count} spans of run {pipeline_id}")


def assert_step_span(span: ReceivedSpan, root: ReceivedSpan, *, name: str, index: int,
                     task_id: str, pipeline_name: str, attempt: int = 1) -> None:
    """SPEC §4: a step span's name, kind, parent and attributes."""
    assert span.name == name, span.describe()
    assert span.kind == "CONSUMER", span.describe()
    assert span.trace_id == root.trace_id and span.parent_span_id == root.span_id, span.describe()
    expected = {
        "messaging.system": "taskiq",
        "messaging.operation.type": "process",
        "messaging.message.id": task_id,
        "flowtrace.pipeline.id": root.attributes["flowtrace.pipeline.id"],
        "flowtrace.pipeline.name": pipeline_name,
        "flowtrace.pipeline.type": "sequential",
        "flowtrace.step.index": index,
        "flowtrace.step.name": name,
        "flowtrace.step.attempt": attempt,
    }
    assert {k: span.attributes.get(k) for k in expected} == expected, span.describe()


def assert_within(outer: ReceivedSpan, inner: ReceivedSpan) -> None:
    assert outer.start_ns <= inner.start_ns, f"{inner.describe()} starts before its parent"
    assert inner.end_ns <= outer.end_ns, f"{inner.describe()} ends after its parent"


# Across worker processes -----------------------------------------------------------


@pytest.mark.fleet
@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_map_filter_run_is_one_trace_across_workers(
        protocol: Protocol, redis_server: RedisServer, otlp_receiver: OtlpReceiver,
        fleet: Callable[..., Workers]) -> None:
    workers = fleet(otlp_receiver.env(protocol, service_name=WORKER_SERVICE))
    async with kicker(redis_server.url,
                      otlp_provider(otlp_receiver, protocol, KICKER_SERVICE)) as fleet_kicker:
        pipeline = fleet_kicker.pipeline(PRODUCE, f"map:{SQUARE}", f"filter:{IS_EVEN}",
                                         name="etl")
        pipeline_id, result = await fleet_kicker.run(pipeline, ITEMS)
        step_ids = [step.task_id for step in pipeline.steps]  # assigned by kiq()
        assert not result.is_err, result.error
        assert result.return_value == [0, 4, 16]
        events = await fleet_kicker.run_events(pipeline_id)
        await wait_spans(otlp_receiver, pipeline_id, MAP_FILTER_SPANS)
    workers.stop()  # a graceful stop flushes: anything extra or duplicated is in by now
    assert workers.proc.returncode == 0, workers.output()[-3000:]

    received = otlp_receiver.spans
    root = root_of(received, pipeline_id)
    trace = [s for s in received if s.trace_id == root.trace_id]
    assert {s.trace_id for s in of_run(received, pipeline_id)} == {root.trace_id}
    assert len(trace) == MAP_FILTER_SPANS, otlp_receiver.dump(trace)
    wire = "grpc" if protocol == "grpc" else "http"
    assert {(s.protocol, s.service_name) for s in trace} == {(wire, WORKER_SERVICE)}

    # The root: brackets everything, carries the pipeline's events.
    assert root.name == "pipeline etl"
    assert root.parent_span_id is None  # kicked outside any span: a new trace
    assert root.status_code != "ERROR"
    assert root.attributes["flowtrace.pipeline.name"] == "etl"
    assert root.attributes["flowtrace.pipeline.type"] == "sequential"
    assert event_names(root) == ["PipelineStartEvent", "PipelineCompleteEvent"]
    assert span_event(root, "PipelineCompleteEvent")["flowtrace.status"] == "COMPLETED"
    assert span_event(root, "PipelineStartEvent")["flowtrace.pipeline_id"] == pipeline_id
    assert span_event(root, "PipelineStartEvent")["flowtrace.total_steps"] == 3
    for span in trace:
        if span is not root:
            assert_within(root, span)

    # Step spans, in order, children of the root, one after the other.
    steps = children(trace, root)
    for index, (span, name) in enumerate(zip(steps, (PRODUCE, SQUARE, IS_EVEN), strict=True)):
        assert_step_span(span, root, name=name, index=index, task_id=step_ids[index],
                         pipeline_name="etl")
        assert event_names(span)[0] == "StepStartEvent", span.describe()
        assert event_names(span)[-1] == "StepCompleteEvent", span.describe()
        assert "StepProgressEvent" not in event_names(span)
        assert span_event(span, "StepCompleteEvent")["flowtrace.step_index"] == index
        assert span_event(span, "StepCompleteEvent")["flowtrace.duration_ms"] >= 0
        assert span.status_code != "ERROR"
    for before, after in itertools.pairwise(steps):
        assert before.end_ns <= after.start_ns, "a step started before the previous ended"

    # Map and filter: the step span has the final counts, each item a span under it.
    for step, item_task in ((steps[1], SQUARE), (steps[2], IS_EVEN)):
        counts = {k: step.attributes.get(f"flowtrace.step.{k}") for k in ("done", "failed",
                                                                         "total")}
        assert counts == {"done": ITEMS, "failed": 0, "total": ITEMS}, step.describe()
        items = children(trace, step)
        assert len(items) == ITEMS
        assert sorted(s.attributes["flowtrace.item.index"] for s in items) == list(range(ITEMS))
        for item in items:
            assert item.name == item_task
            assert item.status_code != "ERROR"
            assert not children(trace, item)
            assert_within(step, item)
    assert_events_match_spans(events, trace, root)


@pytest.mark.fleet
async def test_failed_and_retried_steps(redis_server: RedisServer,
                                        otlp_receiver: OtlpReceiver,
                                        fleet: Callable[..., Workers]) -> None:
    fleet(otlp_receiver.env("grpc", service_name=WORKER_SERVICE))
    async with kicker(redis_server.url,
                      otlp_provider(otlp_receiver, "grpc", KICKER_SERVICE)) as fleet_kicker:
        failing = fleet_kicker.pipeline(PRODUCE, EXPLODE, SQUARE)
        failed_id, failed = await fleet_kicker.run(failing, 3)
        retried = fleet_kicker.pipeline(PRODUCE, FLAKY)
        retried_id, recovered = await fleet_kicker.run(retried, 4)
        failed_events = await fleet_kicker.run_events(failed_id)
        retried_events = await fleet_kicker.run_events(retried_id)
        received = await wait_spans(otlp_receiver, failed_id, 3)
        received = await wait_spans(otlp_receiver, retried_id, 4)

    # A failed run: the failing step's span is ERROR with the exception, the root ERROR.
    assert failed.is_err
    root = root_of(received, failed_id)
    trace = [s for s in received if s.trace_id == root.trace_id]
    assert root.status_code == "ERROR"
    assert "invalid input" in root.status_message
    assert event_names(root) == ["PipelineStartEvent", "PipelineErrorEvent"]
    error = span_event(root, "PipelineErrorEvent")
    assert error["flowtrace.status"] == "FAILED"
    assert error["flowtrace.failed_step"] == EXPLODE
    assert error["flowtrace.failed_step_index"] == 1
    steps = children(trace, root)
    assert [s.name for s in steps] == [PRODUCE, EXPLODE]  # the third step never ran
    produce, explode = steps
    assert produce.status_code != "ERROR"
    assert_step_span(explode, root, name=EXPLODE, index=1, task_id=failing.steps[1].task_id,
                     pipeline_name=PRODUCE)
    assert explode.status_code == "ERROR"
    assert explode.attributes["flowtrace.step.will_retry"] is False
    exception = span_event(explode, "exception")
    assert exception["exception.type"] == "ValueError"
    assert exception["exception.message"] == "invalid input: 3 values"
    assert "Traceback" in exception["exception.stacktrace"]
    assert 'raise ValueError(f"invalid input' in exception["exception.stacktrace"]
    step_error = span_event(explode, "StepErrorEvent")
    assert step_error["flowtrace.error_type"] == "ValueError"
    assert step_error["flowtrace.will_retry"] is False
    assert_events_match_spans(failed_events, trace, root)

    # A retried step: one ERROR span for the failed attempt, then the successful one.
    assert not recovered.is_err, recovered.error
    assert recovered.return_value == sum(range(4))
    root = root_of(received, retried_id)
    trace = [s for s in received if s.trace_id == root.trace_id]
    assert len(trace) == 4, otlp_receiver.dump(trace)
    assert root.status_code != "ERROR"
    assert event_names(root) == ["PipelineStartEvent", "PipelineCompleteEvent"]
    produce, *attempts = children(trace, root)
    assert produce.name == PRODUCE
    assert [s.attributes["flowtrace.step.attempt"] for s in attempts] == [1, 2]
    first, second = attempts
    for number, attempt in enumerate(attempts, start=1):
        assert_step_span(attempt, root, name=FLAKY, index=1, attempt=number,
                         task_id=retried_id, pipeline_name=PRODUCE)
    assert first.status_code == "ERROR"
    assert first.attributes["flowtrace.step.will_retry"] is True
    assert span_event(first, "exception")["exception.type"] == "RuntimeError"
    assert span_event(first, "StepErrorEvent")["flowtrace.will_retry"] is True
    assert second.status_code != "ERROR"
    assert "flowtrace.step.will_retry" not in second.attributes
    assert event_names(second) == ["StepStartEvent", "StepCompleteEvent"]
    assert first.end_ns <= second.start_ns
    assert_events_match_spans(retried_events, trace, root)


@pytest.mark.fleet
async def test_workers_trace_runs_kicked_by_an_instrumented_process_that_does_not_trace(
        redis_server: RedisServer, otlp_receiver: OtlpReceiver,
        fleet: Callable[..., Workers], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                 "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(name, raising=False)
    workers = fleet(otlp_receiver.env("grpc", service_name=WORKER_SERVICE))
    async with kicker(redis_server.url, None) as fleet_kicker:
        flowtrace_mw = next(m for m in fleet_kicker.broker.middlewares
                            if isinstance(m, FlowtraceMiddleware))
        # This kicker must not trace, whatever provider an earlier test installed globally.
        flowtrace_mw._sink, flowtrace_mw._sink_resolved = None, True
        pipeline = fleet_kicker.pipeline(PRODUCE, f"map:{SQUARE}", f"filter:{IS_EVEN}")
        pipeline_id, result = await fleet_kicker.run(pipeline, ITEMS)
        assert not result.is_err, result.error
        events = await fleet_kicker.run_events(pipeline_id)
    workers.stop()  # flushes every span the workers finished
    received = otlp_receiver.spans
    root = root_of(received, pipeline_id)
    trace = [s for s in received if s.trace_id == root.trace_id]
    assert len(trace) == MAP_FILTER_SPANS
    assert root.parent_span_id is None
    assert_events_match_spans([e for e in events if e.trace_id is not None], trace, root)
    assert all(e.trace_id == root.trace_id for e in events if e.type != "PipelineStartEvent")


@pytest.mark.fleet
async def test_run_kicked_in_a_fastapi_request_joins_its_trace(
        redis_server: RedisServer, otlp_receiver: OtlpReceiver,
        fleet: Callable[..., Workers]) -> None:
    fleet(otlp_receiver.env("grpc", service_name=WORKER_SERVICE))
    provider = otlp_provider(otlp_receiver, "grpc", KICKER_SERVICE)
    async with kicker(redis_server.url, provider) as fleet_kicker:
        app = FastAPI()

        @app.post("/runs")
        async def start_run() -> dict[str, str]:
            task = await fleet_kicker.pipeline(PRODUCE, USER_SPAN_TASK).kiq(3)
            return {"pipeline_id": task.task_id}

        FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                               log_level="warning", lifespan="off"))
        serving = asyncio.create_task(server.serve())
        try:
            await async_wait_until(lambda: server.started or serving.done(), timeout=20,
                                   message="uvicorn to start")
            assert server.started
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                response = await client.post("/runs")
            assert response.status_code == 200, response.text
        finally:
            server.should_exit = True
            await serving
        pipeline_id = response.json()["pipeline_id"]
        await async_wait_until(
            lambda: fleet_kicker.broker.result_backend.is_result_ready(pipeline_id),
            timeout=RUN_TIMEOUT, message="the run's result")
        result = await fleet_kicker.broker.result_backend.get_result(pipeline_id)
        assert not result.is_err, result.error
        assert result.return_value == 3
        received = await wait_spans(otlp_receiver, pipeline_id, 3)

        def has_server_span_and_user_span(spans: list[ReceivedSpan]) -> bool:
            names = {(s.kind, s.name) for s in spans}
            return ("SERVER", "POST /runs") in names and ("INTERNAL", "user-span") in names

        received = await asyncio.to_thread(otlp_receiver.wait_for_spans,
                                           has_server_span_and_user_span, SPAN_TIMEOUT)

    root = root_of(received, pipeline_id)
    trace = [s for s in received if s.trace_id == root.trace_id]
    (server_span,) = [s for s in received if s.kind == "SERVER"]
    assert server_span.name == "POST /runs"
    assert server_span.service_name == KICKER_SERVICE
    # The run joined the request's trace: its root is a child of the server span.
    assert root.trace_id == server_span.trace_id, otlp_receiver.dump()
    assert root.parent_span_id == server_span.span_id, otlp_receiver.dump()
    assert server_span.start_ns <= root.start_ns
    produce, step = children(trace, root)
    assert (produce.name, step.name) == (PRODUCE, USER_SPAN_TASK)
    # A span the task opened itself is a child of its step's span.
    (user_span,) = [s for s in received if s.name == "user-span"]
    assert user_span.trace_id == root.trace_id, otlp_receiver.dump()
    assert user_span.parent_span_id == step.span_id, otlp_receiver.dump()
    assert user_span.service_name == WORKER_SERVICE
    assert user_span.attributes["test.values"] == 3
    assert_within(step, user_span)


@pytest.mark.fleet
async def test_sigterm_flushes_every_finished_span(redis_server: RedisServer,
                                                   otlp_receiver: OtlpReceiver,
                                                   fleet: Callable[..., Workers]) -> None:
    # Batches would leave only after a minute: only the shutdown flush can deliver them.
    workers = fleet(otlp_receiver.env("http/protobuf", service_name=WORKER_SERVICE,
                                      OTEL_BSP_SCHEDULE_DELAY="60000"))
    # The test process runs no flowtrace: the first worker starts the run and its trace.
    async with kicker(redis_server.url, None, instrumented=False) as fleet_kicker:
        pipeline = fleet_kicker.pipeline(PRODUCE, f"map:{SQUARE}", f"filter:{IS_EVEN}")
        pipeline_id, result = await fleet_kicker.run(pipeline, ITEMS)
        assert not result.is_err, result.error
        events = await fleet_kicker.run_events(pipeline_id)
    assert isinstance(events[-1], PipelineCompleteEvent)
    assert otlp_receiver.spans == [], "spans were exported before the shutdown"

    workers.stop(signal.SIGTERM)
    assert workers.proc.returncode == 0, workers.output()[-3000:]
    received = otlp_receiver.spans
    root = root_of(received, pipeline_id)
    assert len([s for s in received if s.trace_id == root.trace_id]) == MAP_FILTER_SPANS, (
        otlp_receiver.dump())
    assert len(of_run(received, pipeline_id)) == MAP_FILTER_SPANS


@pytest.mark.fleet
@pytest.mark.parametrize("trouble", ["down", "slow"])
async def test_an_unreachable_or_slow_receiver_never_holds_up_runs(
        trouble: str, redis_server: RedisServer, otlp_receiver: OtlpReceiver,
        fleet: Callable[..., Workers]) -> None:
    # Exporters retry a dead collector for OTEL_EXPORTER_OTLP_TIMEOUT: longer than
    # Workers.stop() waits, so only a bounded shutdown flush lets workers exit gracefully.
    env = otlp_receiver.env("grpc", service_name=WORKER_SERVICE,
                            OTEL_EXPORTER_OTLP_TIMEOUT="60")
    if trouble == "down":
        otlp_receiver.stop()
    else:
        otlp_receiver.set_delay(5)
    workers = fleet(env)
    async with kicker(redis_server.url, None, instrumented=False) as fleet_kicker:
        runs = [fleet_kicker.pipeline(PRODUCE, f"map:{SQUARE}", f"filter:{IS_EVEN}")
                for _ in range(3)]
        runs.append(fleet_kicker.pipeline(PRODUCE, FLAKY))
        outcomes = await asyncio.gather(*(fleet_kicker.run(p, ITEMS) for p in runs))
        for pipeline_id, result in outcomes:
            assert not result.is_err, result.error
            events = await fleet_kicker.run_events(pipeline_id)
            assert isinstance(events[0], PipelineStartEvent), events[0]
            assert isinstance(events[-1], PipelineCompleteEvent), events[-1]
        assert [r.return_value for _, r in outcomes] == [[0, 4, 16]] * 3 + [10]
    if trouble == "slow":
        # Held, not lost: the spans still arrive once the receiver answers.
        otlp_receiver.set_delay(0)
        for pipeline_id, _ in outcomes:
            await wait_spans(otlp_receiver, pipeline_id, 1)
    workers.stop()
    assert workers.proc.returncode == 0, "a worker did not exit on SIGTERM"


# In one process --------------------------------------------------------------------


@asynccontextmanager
async def in_memory(provider: TracerProvider) -> AsyncIterator[tuple[Kicker, Collector]]:
    broker = InMemoryBroker(await_inplace=False)
    broker.add_middlewares(PipelineMiddleware(), SimpleRetryMiddleware(default_retry_count=3))
    register_tasks(broker)
    hook = Collector()
    broker.add_middlewares(FlowtraceMiddleware(hooks=[hook], tracer_provider=provider))
    await broker.startup()
    try:
        yield Kicker(broker), hook
    finally:
        await broker.shutdown()
        provider.shutdown()


async def test_in_process_events_carry_the_ids_of_their_spans() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with in_memory(provider) as (local, hook):
        runs = [
            local.pipeline(PRODUCE, f"map:{SQUARE}", f"filter:{IS_EVEN}", name="etl"),
            local.pipeline(PRODUCE, EXPLODE, SQUARE),
            local.pipeline(PRODUCE, FLAKY),
        ]
        pipeline_ids = [(await local.run(p, ITEMS))[0] for p in runs]
        for pipeline_id in pipeline_ids:
            await async_wait_until(lambda pid=pipeline_id: hook.finished(pid), timeout=20,
                                   message=f"the end of {pipeline_id}")
        finished: tuple[ReadableSpan, ...] = exporter.get_finished_spans()

    spans = {(s.context.trace_id, s.context.span_id): s for s in finished}
    assert len(spans) == len(finished), "span ids are unique"
    seen_types: set[str] = set()
    for pipeline_id in pipeline_ids:
        events = hook.of(pipeline_id)
        roots = [s for s in finished if s.name.startswith("pipeline ")
                 and (s.attributes or {}).get("flowtrace.pipeline.id") == pipeline_id]
        assert len(roots) == 1
        root = roots[0]
        for event in events:
            seen_types.add(event.type)
            assert event.trace_id == f"{root.context.trace_id:032x}", event
            assert event.span_id is not None, event
            span = spans.get((root.context.trace_id, int(event.span_id, 16)))
            assert span is not None, f"{event!r}: no such span"
            attributes = span.attributes or {}
            if isinstance(event, (PipelineStartEvent, PipelineCompleteEvent,
                                  PipelineErrorEvent)):
                assert span is root, event
                continue
            assert isinstance(event, (StepStartEvent, StepProgressEvent, StepCompleteEvent,
                                      StepErrorEvent))
            assert span.parent is not None and span.parent.span_id == root.context.span_id
            assert attributes["flowtrace.step.index"] == event.step_index, event
            assert attributes["flowtrace.step.name"] == event.step_name, event
            if isinstance(event, StepProgressEvent):
                assert event.type not in [e.name for e in span.events]
            else:
                assert attributes["flowtrace.step.attempt"] == event.attempt, event
                assert event.type in [e.name for e in span.events], event
    assert seen_types == {t.__name__ for t in (PipelineStartEvent, StepStartEvent,
                                               StepProgressEvent, StepCompleteEvent,
                                               StepErrorEvent, PipelineCompleteEvent,
                                               PipelineErrorEvent)}


async def test_in_process_unsampled_run_exports_nothing_and_still_emits_events() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with in_memory(provider) as (local, hook):
        pipeline = local.pipeline(PRODUCE, f"map:{SQUARE}", f"filter:{IS_EVEN}", FLAKY)
        pipeline_id, result = await local.run(pipeline, ITEMS)
        assert not result.is_err, result.error
        assert result.return_value == 4 + 16
        await async_wait_until(lambda: hook.finished(pipeline_id), timeout=20,
                               message="the run's last event")
        provider.force_flush()
        assert exporter.get_finished_spans() == ()
    types = [e.type for e in hook.of(pipeline_id)]
    assert types[0] == "PipelineStartEvent" and types[-1] == "PipelineCompleteEvent"
    assert types.count("StepCompleteEvent") == 4
    assert types.count("StepErrorEvent") == 1  # flaky's first attempt


async def test_in_process_plain_task_is_one_span_unless_it_may_be_retried() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with in_memory(provider) as (local, hook):
        kicked = {
            "ok": await local.task(SQUARE).kiq(7),
            "failed": await local.task(EXPLODE).kiq([1, 2]),
            "retried": await local.task(FLAKY).kiq([1, 2]),
        }
        for task in kicked.values():
            await async_wait_until(lambda pid=task.task_id: hook.finished(pid), timeout=20,
                                   message=f"the end of {task.task_id}")
        finished: tuple[ReadableSpan, ...] = exporter.get_finished_spans()
    ids = {name: task.task_id for name, task in kicked.items()}

    def spans_of(pipeline_id: str) -> list[ReadableSpan]:
        return sorted((s for s in finished
                       if (s.attributes or {}).get("flowtrace.pipeline.id") == pipeline_id),
                      key=lambda s: s.start_time or 0)

    def check_events_on(spans: list[ReadableSpan], pipeline_id: str) -> None:
        by_id = {s.context.span_id: s for s in spans}
        for event in hook.of(pipeline_id):
            assert event.trace_id == f"{spans[0].context.trace_id:032x}", event
            assert event.span_id is not None
            span = by_id[int(event.span_id, 16)]
            assert event.type in event_names(span), (event, event_names(span))
            # SPEC §4: the span event's attributes are the event's scalar fields, prefixed.
            (span_event,) = [e for e in span.events if e.name == event.type]
            assert dict(span_event.attributes or {}) == span_event_attributes(event.__dict__)
        for span in spans:  # what the console exporter reads (private fields of the SDK)
            assert json.loads(span.to_json())["events"][0]["name"] == "PipelineStartEvent" or (
                span.parent is not None)

    # A run that ends in its first attempt: one span, the root, named after the task.
    (ok,) = spans_of(ids["ok"])
    assert ok.name == SQUARE and ok.parent is None and ok.kind.name == "CONSUMER"
    assert event_names(ok) == ["PipelineStartEvent", "StepStartEvent", "StepCompleteEvent",
                               "PipelineCompleteEvent"]
    assert (ok.attributes or {})["flowtrace.pipeline.type"] == "task"
    assert (ok.attributes or {})["messaging.message.id"] == ids["ok"]
    check_events_on([ok], ids["ok"])

    (failed,) = spans_of(ids["failed"])
    assert failed.parent is None and failed.status.status_code.name == "ERROR"
    assert event_names(failed) == ["PipelineStartEvent", "StepStartEvent", "exception",
                                   "StepErrorEvent", "PipelineErrorEvent"]
    check_events_on([failed], ids["failed"])

    # A task a retry middleware may retry keeps the pipeline shape: the root has the run's
    # events, each attempt is a span under it.
    root, first, second = spans_of(ids["retried"])
    assert root.name == f"pipeline {FLAKY}" and root.parent is None
    assert event_names(root) == ["PipelineStartEvent", "PipelineCompleteEvent"]
    assert root.status.status_code.name != "ERROR"  # the run completed
    assert {first.parent.span_id, second.parent.span_id} == {root.context.span_id}  # type: ignore[union-attr]
    assert event_names(first) == ["StepStartEvent", "exception", "StepErrorEvent"]
    assert event_names(second) == ["StepStartEvent", "StepCompleteEvent"]
    assert [(s.attributes or {})["flowtrace.step.attempt"] for s in (first, second)] == [1, 2]
    check_events_on([root, first, second], ids["retried"])


async def test_in_process_the_current_span_of_a_step_is_not_changed_by_user_code() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with in_memory(provider) as (local, hook):
        kicked = await local.task(POKES_SPAN).kiq([1])
        result = await kicked.wait_result(check_interval=0.05, timeout=RUN_TIMEOUT)
        await async_wait_until(lambda: hook.finished(kicked.task_id), timeout=20,
                               message="the end of the run")
        (span,) = exporter.get_finished_spans()
    assert not result.is_err, result.error
    # The step's span was current: its ids, not recording.
    assert result.return_value == {"recording": False,
                                   "trace_id": f"{span.context.trace_id:032x}",
                                   "span_id": f"{span.context.span_id:016x}"}
    assert span.name == POKES_SPAN and span.status.status_code.name == "UNSET"
    assert event_names(span) == ["PipelineStartEvent", "StepStartEvent", "StepCompleteEvent",
                                 "PipelineCompleteEvent"]
    assert not {"user.attribute", "user.other"} & set(span.attributes or {})


async def test_in_process_runs_executed_in_place_leave_the_callers_context_as_it_was() -> None:
    """``InMemoryBroker(await_inplace=True)`` runs a task inside the caller's own asyncio task:
    the step's span must not stay current there, or the caller's next run would join its
    trace."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    broker = InMemoryBroker(await_inplace=True)
    register_tasks(broker)
    broker.add_middlewares(FlowtraceMiddleware(tracer_provider=provider))

    @broker.task(task_name="tracing.stores_nothing")
    async def stores_nothing() -> None:
        raise NoResultError  # taskiq stores no result and calls no post_save

    await broker.startup()
    try:
        square = broker.find_task(SQUARE)
        assert square is not None
        before = trace.get_current_span()
        first, second = await square.kiq(2), await square.kiq(3)
        assert trace.get_current_span() is before
        await stores_nothing.kiq()
        assert trace.get_current_span() is before
    finally:
        await broker.shutdown()
    spans = {s.attributes["flowtrace.pipeline.id"]: s  # type: ignore[index]
             for s in exporter.get_finished_spans()
             if s.name == SQUARE}
    assert set(spans) == {first.task_id, second.task_id}
    assert all(s.parent is None for s in spans.values())
    assert spans[first.task_id].context.trace_id != spans[second.task_id].context.trace_id


# Set up from the environment alone -----------------------------------------------------

CONSOLE_RUN = """
import asyncio

from taskiq import InMemoryBroker

import flowtrace

broker = InMemoryBroker()
flowtrace.instrument(broker)


@broker.task(task_name="console.noop")
async def noop() -> int:
    return 1


async def main() -> None:
    await broker.startup()
    task = await noop.kiq()
    assert not (await task.wait_result(timeout=10)).is_err
    await broker.shutdown()


asyncio.run(main())
"""


def printed_spans(text: str) -> list[dict[str, Any]]:
    """The JSON objects ``ConsoleSpanExporter`` printed one after another."""
    decoder, spans, at = json.JSONDecoder(), [], 0
    while (start := text.find("{", at)) >= 0:
        span, at = decoder.raw_decode(text, start)
        spans.append(span)
    return spans


@pytest.mark.parametrize("exporters", ["console", "console, zipkin"])
def test_otel_traces_exporter_console_prints_every_span(exporters: str) -> None:
    env = {name: value for name, value in process_env().items()
           if not name.startswith("OTEL_")}
    env.update(OTEL_TRACES_EXPORTER=exporters, OTEL_SERVICE_NAME="console-test")
    done = subprocess.run([sys.executable, "-c", CONSOLE_RUN], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    (span,) = printed_spans(done.stdout)
    assert span["name"] == "console.noop"
    assert span["resource"]["attributes"]["service.name"] == "console-test"
    assert span["attributes"]["flowtrace.pipeline.type"] == "task"
    if "zipkin" in exporters:
        assert "OTEL_TRACES_EXPORTER names 'zipkin'" in done.stderr, done.stderr
