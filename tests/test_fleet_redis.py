"""The event spine across real processes: taskiq-redis, 2 workers, a Redis stream."""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

import flowtrace
from flowtrace.transport.base import FROM_BEGINNING
from tests.support.collect import check_common, shape
from tests.support.fleet import StreamCollector, fleet_client
from tests.support.processes import RedisServer, Workers, free_port, test_env, wait_for_log
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.fleet
FLOWTRACE_ERROR = re.compile(r"\[flowtrace[\w.]*\]\[(ERROR|CRITICAL)")


def free_ports_from(count: int) -> int:
    """A port from which ``count`` consecutive ports can be bound right now."""
    for _ in range(100):
        base = free_port()
        try:
            with contextlib.ExitStack() as held:
                for port in range(base, base + count):
                    sock = held.enter_context(socket.socket())
                    sock.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports")


@pytest.fixture
def metrics_port() -> int:
    return free_ports_from(2)


@pytest.fixture
def workers(redis_server: RedisServer, events_redis: RedisServer,
            metrics_port: int) -> Iterator[Workers]:
    group = Workers("tests.fleet_app.spine_worker:broker",
                    test_env(TEST_REDIS_URL=redis_server.url,
                             FLOWTRACE_REDIS_URL=events_redis.url,
                             TEST_METRICS_PORT=str(metrics_port)),
                    workers=2, extra_args=["--max-async-tasks", "3"])
    wait_for_log(group, "Listening started", count=2)
    yield group
    group.stop()
    assert not FLOWTRACE_ERROR.search(group.output()), group.output()


@pytest.fixture
async def fleet(redis_server: RedisServer, events_redis: RedisServer,
                workers: Workers) -> AsyncIterator[tuple[Any, StreamCollector]]:
    collector = StreamCollector(events_redis.url)
    await collector.start()
    async with fleet_client(redis_server.url, events_redis.url) as app:
        yield app, collector
    await collector.stop()


async def no_item_counters_left(url: str) -> None:
    """A map/filter step's shared counters go once the step is over (else kept for a day)."""
    client = Redis.from_url(url)
    try:
        async def none_left() -> bool:
            return not [key async for key in client.scan_iter("flowtrace:items:*")]

        await async_wait_until(none_left, message="no flowtrace:items:* key left")
    finally:
        await client.aclose()


async def test_pipeline_with_map_and_filter_across_two_worker_processes(
        fleet: tuple[Any, StreamCollector], events_redis: RedisServer) -> None:
    app, collector = fleet
    pipeline = flowtrace.Pipeline(app.broker, app.extract, name="fleet-etl").map(
        app.where, check_interval=0.05).filter(app.is_big, check_interval=0.05).call_next(
        app.total)
    kicked = await pipeline.kiq(10)
    result = await kicked.wait_result(timeout=60)
    assert not result.is_err, result.error
    events = await collector.wait_terminal(kicked.task_id)
    check_common(events, kicked.task_id, "fleet-etl", "sequential")
    assert [s for s in shape(events) if s[0] != "StepProgressEvent"] == [
        ("PipelineStartEvent", None),
        *[pair for i in range(4) for pair in (("StepStartEvent", i), ("StepCompleteEvent", i))],
        ("PipelineCompleteEvent", None),
    ]
    map_done = next(e for e in events if e.type == "StepCompleteEvent" and e.step_index == 1)
    assert len(map_done.result) == 10
    assert len(set(map_done.result)) == 2, "map items should run in both worker processes"
    for index in (1, 2):
        progress = [e for e in events if e.type == "StepProgressEvent" and e.step_index == index]
        assert progress, f"no progress for step {index}"
        assert (progress[-1].done, progress[-1].failed, progress[-1].total) == (10, 0, 10)
    starts = [e for e in events if e.type == "StepStartEvent"]
    assert [s.step_name for s in starts] == ["extract", "where", "is_big", "total"]
    assert all(s.worker and s.attempt == 1 for s in starts)
    assert [s.queue_wait_ms is None for s in starts] == [False, True, True, False]
    assert all(e.id is not None for e in events)
    assert all(e.trace_id is None for e in events)  # no OTEL_* configured: tracing is off
    assert events[0].input == 10 and events[-1].result == sum(map_done.result)
    assert all(e.duration_ms > 0 for e in events if e.type == "StepCompleteEvent")
    await no_item_counters_left(events_redis.url)


@pytest.fixture
async def lingering_fleet(redis_server: RedisServer,
                          events_redis: RedisServer) -> AsyncIterator[tuple[Any, StreamCollector]]:
    """Two workers whose item counts wait 300 ms for a batch (flowtrace's default: 5 ms)."""
    group = Workers("tests.fleet_app.spine_worker:broker",
                    test_env(TEST_REDIS_URL=redis_server.url, FLOWTRACE_REDIS_URL=events_redis.url,
                             TEST_LINGER_MS="300"),
                    workers=2, extra_args=["--max-async-tasks", "3"])
    try:
        wait_for_log(group, "Listening started", count=2)
        collector = StreamCollector(events_redis.url)
        await collector.start()
        async with fleet_client(redis_server.url, events_redis.url) as app:
            yield app, collector
        await collector.stop()
    finally:
        group.stop()


async def test_final_item_counts_are_exact_when_items_fail_in_other_processes(
        lingering_fleet: tuple[Any, StreamCollector], events_redis: RedisServer) -> None:
    """The waiter sees every item's result before every item's count has reached Redis
    (counts from the other worker process are still waiting for their batch): the last
    StepProgressEvent still reports the final counts (SPEC §3), for each kind of ending."""
    app, collector = lingering_fleet
    kicked = []
    for _ in range(3):
        for name, add in (("map-fails", lambda p: p.map(app.odd_fails, check_interval=0.002)),
                          ("filter-skips", lambda p: p.filter(
                              app.odd_fails, skip_errors=True, check_interval=0.002))):
            pipeline = add(flowtrace.Pipeline(app.broker, app.extract, name=name))
            kicked.append((name, await pipeline.kiq(8)))
    for name, run in kicked:
        events = await collector.wait_terminal(run.task_id)
        check_common(events, run.task_id, name, "sequential")
        assert events[-1].type == ("PipelineErrorEvent" if name == "map-fails"
                                   else "PipelineCompleteEvent"), events[-1]
        progress = [e for e in events if e.type == "StepProgressEvent"]
        assert (progress[-1].done, progress[-1].failed, progress[-1].total) == (4, 4, 8), (
            name, progress)
    await no_item_counters_left(events_redis.url)


async def test_failing_retried_and_unstorable_runs_across_processes(
        fleet: tuple[Any, StreamCollector]) -> None:
    app, collector = fleet
    failing = await flowtrace.Pipeline(app.broker, app.extract, name="bad").call_next(
        app.explode).call_next(app.total).kiq(2)
    retried = await flowtrace.Pipeline(app.broker, app.extract, name="retry").call_next(
        app.flaky).kiq(2)
    unstorable = await app.unstorable.kiq(1)
    plain = await app.double.kiq(4)
    aborted = await flowtrace.Pipeline(app.broker, app.double, name="abort").map(
        app.double).kiq(1)
    after = await flowtrace.Pipeline(app.broker, app.extract, name="after").call_after(
        app.double, x=5).kiq(3)

    events = await collector.wait_terminal(aborted.task_id)
    check_common(events, aborted.task_id, "abort", "sequential")
    assert shape(events) == [("PipelineStartEvent", None), ("StepStartEvent", 0),
                             ("StepCompleteEvent", 0), ("PipelineErrorEvent", None)]
    assert events[-1].error_type == "AbortPipeline" and "not iterable" in events[-1].error

    events = await collector.wait_terminal(after.task_id)
    check_common(events, after.task_id, "after", "sequential")
    assert events[-1].type == "PipelineCompleteEvent" and events[-1].result == 10

    events = await collector.wait_terminal(failing.task_id)
    check_common(events, failing.task_id, "bad", "sequential")
    assert shape(events)[-3:] == [("StepStartEvent", 1), ("StepErrorEvent", 1),
                                  ("PipelineErrorEvent", None)]
    assert events[-1].error == "ValueError: invalid input"

    events = await collector.wait_terminal(retried.task_id)
    check_common(events, retried.task_id, "retry", "sequential")
    assert shape(events) == [
        ("PipelineStartEvent", None), ("StepStartEvent", 0), ("StepCompleteEvent", 0),
        ("StepStartEvent", 1), ("StepErrorEvent", 1), ("StepStartEvent", 1),
        ("StepCompleteEvent", 1), ("PipelineCompleteEvent", None),
    ]
    assert events[4].will_retry is True and events[5].attempt == 2

    events = await collector.wait_terminal(unstorable.task_id)
    check_common(events, unstorable.task_id, "unstorable", "task")
    assert shape(events) == [("PipelineStartEvent", None), ("StepStartEvent", 0),
                             ("StepErrorEvent", 0), ("PipelineErrorEvent", None)]
    assert events[-1].status == "FAILED" and events[2].will_retry is False

    events = await collector.wait_terminal(plain.task_id)
    check_common(events, plain.task_id, "double", "task")
    assert events[-1].result == 8


async def test_events_redis_down_mid_run_never_breaks_tasks(
        redis_server: RedisServer, events_redis: RedisServer, workers: Workers) -> None:
    async with fleet_client(redis_server.url, events_redis.url) as app:
        first = await app.slow.kiq(0.5)
        events_redis.stop()
        # Runs keep completing while the events Redis is gone (kicker and workers buffer).
        during = [await app.double.kiq(i) for i in range(5)]
        assert (await first.wait_result(timeout=30)).return_value == 0.5
        for i, kicked in enumerate(during):
            assert (await kicked.wait_result(timeout=30)).return_value == 2 * i
        events_redis.start()
        after = await app.double.kiq(100)
        assert (await after.wait_result(timeout=30)).return_value == 200
        collector = StreamCollector(events_redis.url)

        async def terminals() -> set[str]:
            seen = [e async for e in collector.transport.replay(FROM_BEGINNING)]
            return {e.pipeline_id for e in seen if e.type in ("PipelineCompleteEvent",)}

        ids = {k.task_id for k in [*during, after]}
        await async_wait_until(lambda: _contains(terminals(), ids), timeout=60,
                               message="buffered events published after Redis returned")
        await collector.stop()
    assert not FLOWTRACE_ERROR.search(workers.output()), "flowtrace logged an error in a worker"
    assert "lost Redis" in workers.output() and "reconnected" in workers.output()


async def _contains(found: Any, wanted: set[str]) -> bool:
    return wanted <= await found


async def test_every_worker_process_serves_its_own_metrics_port(
        workers: Workers, metrics_port: int) -> None:
    """``metrics_port`` under ``taskiq worker --workers 2``: one port per process, from it up."""
    async def serves(port: int) -> bool:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            try:
                response = await client.get(f"http://127.0.0.1:{port}/metrics")
            except httpx.HTTPError:
                return False
        return response.status_code == 200 and "flowtrace_" in response.text

    for port in (metrics_port, metrics_port + 1):
        await async_wait_until(lambda port=port: serves(port), timeout=30,
                               message=f"a worker's metrics on :{port}")
    assert f"serving on {metrics_port + 1}" in workers.output()  # the second one says where
