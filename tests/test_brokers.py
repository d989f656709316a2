"""flowtrace on every real taskiq broker: the ``examples/brokers`` worker apps.

For each broker (taskiq-redis streams and lists, taskiq-aio-pika on RabbitMQ,
taskiq-nats on JetStream) real ``taskiq worker examples.brokers.<x>:broker
--workers 2`` process groups run the same pipelines as ``tests/test_fleet_redis.py``;
their events (SPEC §3) and traces (SPEC §4) must come out exactly as on Redis. A
private redis-server holds the results and the event stream (and the Redis brokers'
queue); RabbitMQ and NATS are the machine's services, and every test uses queues,
exchanges, streams and subjects of its own, deleted afterwards. Workers trace only
through the ``OTEL_*`` environment of the test's OTLP receiver.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
from opentelemetry.sdk.trace import TracerProvider
from taskiq import AsyncBroker

import flowtrace
from examples.brokers.tasks import Tasks
from flowtrace.middleware import FlowtraceMiddleware
from flowtrace.transport.redis_stream import RedisStreamTransport
from tests.support.collect import check_common, shape
from tests.support.fleet import StreamCollector
from tests.support.otlp_fixture import otlp_receiver
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.processes import RedisServer, Workers, test_env
from tests.support.trace_checks import assert_events_match_spans
from tests.support.waiting import async_wait_until

__all__ = ["otlp_receiver"]  # the fixture, used by name

pytestmark = pytest.mark.fleet

BROKERS = ("redis_stream", "redis_list", "rabbitmq", "nats")
DEFAULT_URLS = {"RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5672/",
                "NATS_URL": "nats://127.0.0.1:4222"}
ITEMS = 10
SLOW_S = 2.0  # the step the workers are killed in; shorter than REDELIVER_AFTER_S
REDELIVER_AFTER_S = 5  # JetStream ack_wait, Redis stream idle_timeout (examples/brokers)
RUN_TIMEOUT = 60.0
FLOWTRACE_ERROR = re.compile(r"\[flowtrace[\w.]*\]\[(ERROR|CRITICAL)")
#: pipeline name -> spans of one run: root + steps + items (+ retried attempts)
SPAN_COUNTS = {"fleet-etl": 1 + 4 + 2 * ITEMS, "bad": 1 + 2, "retry": 1 + 3}
HAPPY_SHAPE = [
    ("PipelineStartEvent", None),
    *[pair for i in range(4) for pair in (("StepStartEvent", i), ("StepCompleteEvent", i))],
    ("PipelineCompleteEvent", None),
]


# Services ---------------------------------------------------------------------------


def _service_url(name: str) -> str:
    return os.environ.get(name, DEFAULT_URLS[name])


def _where(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


async def require_service(broker: str) -> None:
    """FAIL (never skip) with how to start the service the broker needs."""
    problem = None
    if broker == "rabbitmq":
        problem = await _rabbitmq_problem(_service_url("RABBITMQ_URL"))
    elif broker == "nats":
        problem = await _nats_problem(_service_url("NATS_URL"))
    if problem is not None:
        pytest.fail(problem, pytrace=False)


async def _rabbitmq_problem(url: str) -> str | None:
    import aio_pika

    try:
        connection = await aio_pika.connect(url, timeout=5)
    except Exception as exc:
        return (f"RabbitMQ not reachable on {_where(url)} ({exc!r}): start it with "
                "`rabbitmq-server -detached` (or set RABBITMQ_URL)")
    await connection.close()
    return None


async def _nats_problem(url: str) -> str | None:
    import nats

    async def quiet(_: Exception) -> None:
        return None

    try:
        client = await nats.connect(url, connect_timeout=2, allow_reconnect=False,
                                    max_reconnect_attempts=1, reconnect_time_wait=0.1,
                                    error_cb=quiet)
    except Exception as exc:
        return (f"NATS not reachable on {_where(url)} ({exc!r}): start it with "
                "`nats-server -js` (or set NATS_URL)")
    try:
        await client.jetstream().account_info()
    except Exception as exc:
        return f"NATS on {_where(url)} has no JetStream ({exc!r}): start it with `nats-server -js`"
    finally:
        await client.close()
    return None


async def delete_broker_objects(broker: str, name: str) -> None:
    """Remove what the example declared on the shared RabbitMQ/NATS (best effort)."""
    if broker == "rabbitmq":
        import aio_pika

        connection = await aio_pika.connect(_service_url("RABBITMQ_URL"), timeout=5)
        async with connection:
            channel = await connection.channel()
            for queue in (name, f"{name}.dead_letter"):
                await channel.queue_delete(queue)
            await channel.exchange_delete(name)
    elif broker == "nats":
        import nats

        client = await nats.connect(_service_url("NATS_URL"), connect_timeout=2,
                                    allow_reconnect=False, max_reconnect_attempts=1)
        try:
            await client.jetstream().delete_stream(name)
        finally:
            await client.close()


# The fleet ----------------------------------------------------------------------------


@dataclass
class Kicker:
    """The test process's side: the example's broker (instrumented) and its tasks."""

    broker: AsyncBroker
    tasks: Tasks

    async def result(self, task: Any) -> Any:
        return await task.wait_result(check_interval=0.05, timeout=RUN_TIMEOUT)


@dataclass
class BrokerFleet:
    """One broker's example app, its private names, worker groups and event stream."""

    broker: str
    module: ModuleType
    queue: str
    redis: RedisServer
    monkeypatch: pytest.MonkeyPatch
    collector: StreamCollector
    groups: list[Workers] = field(default_factory=list)
    reachable: bool = False

    async def require_service(self) -> None:
        """First thing in every test: FAIL there (not in a fixture) when it is down."""
        await require_service(self.broker)
        self.reachable = True

    async def start_workers(self, otel_env: dict[str, str]) -> Workers:
        env = test_env(REDIS_URL=self.redis.url, FLOWTRACE_REDIS_URL=self.redis.url,
                       BROKER_QUEUE=self.queue,
                       BROKER_REDELIVER_AFTER_S=str(REDELIVER_AFTER_S), **otel_env)
        group = Workers(f"examples.brokers.{self.broker}:broker", env, workers=2,
                        extra_args=["--max-async-tasks", "3"])
        self.groups.append(group)
        await async_wait_until(lambda: group.output().count("Listening started") >= 2,
                               timeout=30, interval=0.05,
                               message=f"2 {self.broker} worker processes to listen")
        return group

    @asynccontextmanager
    async def kicker(self) -> AsyncIterator[Kicker]:
        """The example's broker built in this process, as an API that kicks runs would.

        Its flowtrace middleware traces (an SDK provider that exports nothing), so the
        run's trace ids ride in the labels through the broker; the workers export every
        span, the root too (whichever process sees the run end). A kicker that does not
        trace at all works too (workers derive the ids: ``tests/test_tracing.py``).
        """
        for name, value in (("REDIS_URL", self.redis.url), ("BROKER_QUEUE", self.queue),
                            ("BROKER_REDELIVER_AFTER_S", str(REDELIVER_AFTER_S))):
            self.monkeypatch.setenv(name, value)
        broker = self.module.make_broker()
        provider = TracerProvider(shutdown_on_exit=False)
        broker.add_middlewares(FlowtraceMiddleware(transport=RedisStreamTransport(
            self.redis.url), tracer_provider=provider))
        await broker.startup()
        try:
            yield Kicker(broker, Tasks.of(broker))
        finally:
            await broker.shutdown()
            provider.shutdown()

    async def events(self, pipeline_id: str) -> list[Any]:
        """The run's events once its terminal one arrived (typed loosely: any event type)."""
        return await self.collector.wait_terminal(pipeline_id, timeout=RUN_TIMEOUT)

    def seen(self, pipeline_id: str) -> list[Any]:
        """The run's events so far."""
        return self.collector.of(pipeline_id)


@pytest.fixture(params=BROKERS)
async def fleet(request: pytest.FixtureRequest, redis_server: RedisServer,
                monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[BrokerFleet]:
    broker: str = request.param
    queue = f"flowtrace-test-{uuid.uuid4().hex[:12]}"
    collector = StreamCollector(redis_server.url)
    await collector.start()
    fleet = BrokerFleet(broker, importlib.import_module(f"examples.brokers.{broker}"), queue,
                        redis_server, monkeypatch, collector)
    try:
        yield fleet
    finally:
        for group in fleet.groups:
            await stop_group(group)
            print(f"--- {broker} worker log {group.log.name} ---\n{group.output()[-4000:]}")
        await collector.stop()
        if fleet.reachable:
            await delete_broker_objects(broker, queue)


async def stop_group(workers: Workers) -> None:
    """SIGTERM the group and wait for it off the event loop (the test's clients keep going)."""
    await asyncio.to_thread(workers.stop)


async def kill_group(workers: Workers) -> None:
    """SIGKILL the whole worker process group: parent and worker processes alike."""
    pgid = workers.proc.pid
    os.killpg(pgid, signal.SIGKILL)

    def gone() -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        return False

    await asyncio.to_thread(workers.proc.wait, 10)
    await async_wait_until(gone, timeout=10, message="the killed worker group to exit")


# Reading traces -----------------------------------------------------------------------


def run_spans(spans: list[ReceivedSpan], pipeline_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.attributes.get("flowtrace.pipeline.id") == pipeline_id]


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return sorted((s for s in spans if s.trace_id == parent.trace_id
                   and s.parent_span_id == parent.span_id), key=lambda s: s.start_ns)


async def wait_run_spans(receiver: OtlpReceiver, pipeline_id: str,
                         count: int) -> list[ReceivedSpan]:
    def arrived(spans: list[ReceivedSpan]) -> bool:
        mine = run_spans(spans, pipeline_id)
        return len(mine) >= count and any(s.name.startswith("pipeline ") for s in mine)

    return await asyncio.to_thread(receiver.wait_for_spans, arrived, RUN_TIMEOUT,
                                   f"{count} spans of run {pipeline_id}")


def check_trace(spans: list[ReceivedSpan], pipeline_id: str, name: str,
                steps: list[tuple[str, int]]) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    """SPEC §4: one trace, one root ``pipeline {name}``, step spans children of the root
    (in order, ``steps`` as ``(task name, step index)``) and every other span of the run
    under a step."""
    mine = run_spans(spans, pipeline_id)
    roots = [s for s in mine if s.name.startswith("pipeline ")]
    assert len(roots) == 1, f"expected one root span:\n{[s.describe() for s in mine]}"
    root = roots[0]
    assert root.name == f"pipeline {name}" and root.parent_span_id is None
    assert {s.trace_id for s in mine} == {root.trace_id}, "a run must be one trace"
    trace = [s for s in spans if s.trace_id == root.trace_id]
    assert len(trace) == len(mine), "spans in the run's trace that are not the run's"
    step_spans = children(trace, root)
    assert [(s.name, s.attributes["flowtrace.step.index"]) for s in step_spans] == steps, [
        s.describe() for s in step_spans]
    for index, span in enumerate(step_spans):
        assert span.kind == "CONSUMER"
        assert span.attributes["messaging.system"] == "taskiq"
        assert span.attributes["flowtrace.pipeline.name"] == name
        assert span.attributes["flowtrace.step.name"] == span.name
        assert root.start_ns <= span.start_ns and span.end_ns <= root.end_ns
        if index:
            assert step_spans[index - 1].end_ns <= span.start_ns, "steps overlap"
    step_ids = {s.span_id for s in step_spans}
    for span in trace:
        if span is not root and span.span_id not in step_ids:
            assert span.parent_span_id in step_ids, f"{span.describe()} is not under a step"
    return root, step_spans


# Tests ----------------------------------------------------------------------------------


async def test_runs_give_the_same_events_and_traces_as_on_redis(
        fleet: BrokerFleet, otlp_receiver: OtlpReceiver) -> None:
    await fleet.require_service()
    workers = await fleet.start_workers(otlp_receiver.env("grpc",
                                                    service_name=f"worker-{fleet.broker}"))
    async with fleet.kicker() as kicker:
        app = kicker.tasks
        etl = flowtrace.Pipeline(kicker.broker, app.extract, name="fleet-etl").map(
            app.where, check_interval=0.05).filter(app.is_big, check_interval=0.05).call_next(
            app.total)
        bad = flowtrace.Pipeline(kicker.broker, app.extract, name="bad").call_next(
            app.explode).call_next(app.total)
        retry = flowtrace.Pipeline(kicker.broker, app.extract, name="retry").call_next(
            app.flaky)
        kicked = {"fleet-etl": await etl.kiq(ITEMS), "bad": await bad.kiq(2),
                  "retry": await retry.kiq(2)}
        results = {name: await kicker.result(task) for name, task in kicked.items()}
        ids = {name: task.task_id for name, task in kicked.items()}
        events = {name: await fleet.events(ids[name]) for name in kicked}
        for name, count in SPAN_COUNTS.items():
            await wait_run_spans(otlp_receiver, ids[name], count)
    await stop_group(workers)  # a graceful stop exports every finished span: nothing more can come
    assert workers.proc.returncode == 0, workers.output()[-3000:]
    assert not FLOWTRACE_ERROR.search(workers.output()), workers.output()[-3000:]

    # Events (SPEC §3): exactly the sequences of tests/test_fleet_redis.py.
    assert not results["fleet-etl"].is_err, results["fleet-etl"].error
    run = events["fleet-etl"]
    check_common(run, ids["fleet-etl"], "fleet-etl", "sequential")
    assert [s for s in shape(run) if s[0] != "StepProgressEvent"] == HAPPY_SHAPE
    starts = [e for e in run if e.type == "StepStartEvent"]
    assert [s.step_name for s in starts] == ["extract", "where", "is_big", "total"]
    assert all(s.worker and s.attempt == 1 for s in starts)
    assert [s.queue_wait_ms is None for s in starts] == [False, True, True, False]
    map_done = next(e for e in run if e.type == "StepCompleteEvent" and e.step_index == 1)
    assert len(map_done.result) == ITEMS
    assert len(set(map_done.result)) == 2, "map items should run in both worker processes"
    for index in (1, 2):
        progress = [e for e in run if e.type == "StepProgressEvent" and e.step_index == index]
        assert progress, f"no progress for step {index}"
        assert (progress[-1].done, progress[-1].failed, progress[-1].total) == (
            ITEMS, 0, ITEMS)
    assert run[0].input == ITEMS and run[-1].result == sum(map_done.result)
    assert results["fleet-etl"].return_value == sum(map_done.result)

    assert results["bad"].is_err
    run = events["bad"]
    check_common(run, ids["bad"], "bad", "sequential")
    assert shape(run) == [("PipelineStartEvent", None), ("StepStartEvent", 0),
                          ("StepCompleteEvent", 0), ("StepStartEvent", 1),
                          ("StepErrorEvent", 1), ("PipelineErrorEvent", None)]
    assert run[-1].error == "ValueError: invalid input" and run[-1].failed_step == "explode"

    assert not results["retry"].is_err, results["retry"].error
    assert results["retry"].return_value == "ok"
    run = events["retry"]
    check_common(run, ids["retry"], "retry", "sequential")
    assert shape(run) == [
        ("PipelineStartEvent", None), ("StepStartEvent", 0), ("StepCompleteEvent", 0),
        ("StepStartEvent", 1), ("StepErrorEvent", 1), ("StepStartEvent", 1),
        ("StepCompleteEvent", 1), ("PipelineCompleteEvent", None),
    ]
    assert run[4].will_retry is True and run[4].error_type == "ConnectionError"
    assert (run[3].attempt, run[5].attempt) == (1, 2)

    # Traces (SPEC §4): the shape tests/test_tracing.py checks on Redis.
    spans = otlp_receiver.spans
    for name, count in SPAN_COUNTS.items():
        assert len(run_spans(spans, ids[name])) == count, otlp_receiver.dump(
            run_spans(spans, ids[name]))
    assert {s.service_name for s in spans} == {f"worker-{fleet.broker}"}
    root, steps = check_trace(spans, ids["fleet-etl"], "fleet-etl",
                              [("extract", 0), ("where", 1), ("is_big", 2), ("total", 3)])
    assert root.status_code != "ERROR"
    assert [e.name for e in root.events] == ["PipelineStartEvent", "PipelineCompleteEvent"]
    for step, item_task in ((steps[1], "where"), (steps[2], "is_big")):
        items = children(spans, step)
        assert [s.name for s in items] == [item_task] * ITEMS
        assert sorted(s.attributes["flowtrace.item.index"] for s in items) == list(
            range(ITEMS))
        assert (step.attributes["flowtrace.step.done"], step.attributes["flowtrace.step.total"]
                ) == (ITEMS, ITEMS)
    assert_events_match_spans(events["fleet-etl"], spans, root)

    root, steps = check_trace(spans, ids["bad"], "bad", [("extract", 0), ("explode", 1)])
    assert_events_match_spans(events["bad"], spans, root)
    assert root.status_code == "ERROR" and steps[1].status_code == "ERROR"
    assert "exception" in [e.name for e in steps[1].events]

    root, steps = check_trace(spans, ids["retry"], "retry",
                              [("extract", 0), ("flaky", 1), ("flaky", 1)])
    assert_events_match_spans(events["retry"], spans, root)
    assert root.status_code != "ERROR"
    assert [s.attributes["flowtrace.step.attempt"] for s in steps[1:]] == [1, 2]
    assert steps[1].status_code == "ERROR"
    assert steps[1].attributes["flowtrace.step.will_retry"] is True
    assert steps[2].status_code != "ERROR"


async def test_worker_killed_mid_step_then_fresh_workers(
        fleet: BrokerFleet, otlp_receiver: OtlpReceiver) -> None:
    await fleet.require_service()
    otel_env = otlp_receiver.env("grpc", service_name=f"worker-{fleet.broker}")
    doomed = await fleet.start_workers(otel_env)
    async with fleet.kicker() as kicker:
        app = kicker.tasks
        killed = await flowtrace.Pipeline(kicker.broker, app.slow, name="killed").call_next(
            app.double).kiq(SLOW_S)
        killed_id = killed.task_id
        await async_wait_until(
            lambda: ("StepStartEvent", 0) in shape(fleet.seen(killed_id)),
            timeout=RUN_TIMEOUT, message="the slow step to start")
        await kill_group(doomed)
        # As far as anyone knows, the step started and nothing more: no made-up outcome.
        assert shape(fleet.seen(killed_id)) == [("PipelineStartEvent", None),
                                                ("StepStartEvent", 0)]

        fresh = await fleet.start_workers(otel_env)
        after = flowtrace.Pipeline(kicker.broker, app.extract, name="fleet-etl").map(
            app.where, check_interval=0.05).filter(app.is_big, check_interval=0.05).call_next(
            app.total)
        runs = [await after.kiq(ITEMS), await app.double.kiq(21)]
        for task in runs:
            result = await kicker.result(task)
            assert not result.is_err, result.error
        events = await fleet.events(runs[0].task_id)
        check_common(events, runs[0].task_id, "fleet-etl", "sequential")
        assert [s for s in shape(events) if s[0] != "StepProgressEvent"] == HAPPY_SHAPE
        events = await fleet.events(runs[1].task_id)
        check_common(events, runs[1].task_id, "double", "task")
        assert events[-1].result == 42

        if fleet.broker == "redis_list":
            # A popped list item has no acknowledgement: the message died with the worker
            # and the run stays where it was (the gateway declares it LOST later).
            assert shape(fleet.seen(killed_id)) == [("PipelineStartEvent", None),
                                                    ("StepStartEvent", 0)]
            assert not (await killed.is_ready())
        else:
            # The unacknowledged message is delivered again and the step runs again:
            # RabbitMQ at once, JetStream after ack_wait, a Redis stream after
            # idle_timeout -- and only when its workers receive new messages, hence a
            # trickle of small tasks while waiting.
            async def redelivered_run_ended() -> bool:
                if fleet.broker == "redis_stream":
                    await app.double.kiq(0)
                return any(e.type == "PipelineCompleteEvent"
                           for e in fleet.seen(killed_id))

            # (async_wait_until takes coroutine functions; its annotation does not say so)
            await async_wait_until(redelivered_run_ended,  # type: ignore[arg-type]
                                   timeout=RUN_TIMEOUT, interval=0.25,
                                   message="the killed run to be redelivered and complete")
            result = await kicker.result(killed)
            assert not result.is_err and result.return_value == 2 * SLOW_S
            events = fleet.seen(killed_id)
            check_common(events, killed_id, "killed", "sequential")
            assert shape(events) == [
                ("PipelineStartEvent", None), ("StepStartEvent", 0), ("StepStartEvent", 0),
                ("StepCompleteEvent", 0), ("StepStartEvent", 1), ("StepCompleteEvent", 1),
                ("PipelineCompleteEvent", None)]
            first, again = events[1], events[2]
            assert first.worker != again.worker and again.attempt == 1
    await stop_group(fresh)
    assert fresh.proc.returncode == 0, fresh.output()[-3000:]
    assert not FLOWTRACE_ERROR.search(fresh.output()), fresh.output()[-3000:]
    if fleet.broker != "redis_list":
        # The run survived the crash as one trace; the killed attempt's span never ended.
        spans = await wait_run_spans(otlp_receiver, killed_id, 3)
        check_trace(spans, killed_id, "killed", [("slow", 0), ("double", 1)])

