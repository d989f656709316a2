"""The gateway in a real fleet: ``flowtrace serve`` subprocesses, taskiq workers, redis-server.

Events go to their own redis-server (``events_redis``) so that it can be killed while the
broker's (``redis_server``) keeps the runs going.
"""

from __future__ import annotations

import asyncio
import re
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import flowtrace
from flowtrace.events import TERMINAL_TYPES, BaseEvent, PipelineStartEvent, StepStartEvent
from flowtrace.transport.base import id_sort_key
from tests.support.collect import check_common, shape
from tests.support.fleet import fleet_client
from tests.support.gateway_proc import (
    WsFeed,
    dumps,
    publish_to_stream,
    serve_gateways,
    stream_events,
)
from tests.support.processes import RedisServer, Workers, test_env, wait_for_log
from tests.support.waiting import async_wait_until

pytestmark = pytest.mark.fleet
FLOWTRACE_ERROR = re.compile(r"\[flowtrace[\w.]*\]\[(ERROR|CRITICAL)")

START = ("PipelineStartEvent", None)
COMPLETE = ("PipelineCompleteEvent", None)
FAILED = ("PipelineErrorEvent", None)


def ok_steps(count: int) -> list[tuple[str, int | None]]:
    return [pair for i in range(count)
            for pair in (("StepStartEvent", i), ("StepCompleteEvent", i))]


# (kind, expected shape without StepProgressEvents, final run status)
EXPECTED: dict[str, tuple[list[tuple[str, int | None]], str]] = {
    "map": ([START, *ok_steps(3), COMPLETE], "COMPLETED"),
    "bad": ([START, *ok_steps(1), ("StepStartEvent", 1), ("StepErrorEvent", 1), FAILED],
            "FAILED"),
    "retry": ([START, *ok_steps(1), ("StepStartEvent", 1), ("StepErrorEvent", 1),
               ("StepStartEvent", 1), ("StepCompleteEvent", 1), COMPLETE], "COMPLETED"),
    "plain": ([START, *ok_steps(1), COMPLETE], "COMPLETED"),
}
NAMES = {"map": "gw-map", "bad": "gw-bad", "retry": "gw-retry", "plain": "double"}


async def kick(app: Any, kind: str, n: int = 4) -> Any:
    """Kick one run of ``kind`` (see EXPECTED); the kicked task (``task_id`` = pipeline id)."""
    if kind == "map":
        pipeline = flowtrace.Pipeline(app.broker, app.extract, name="gw-map").map(
            app.double, check_interval=0.05).call_next(app.total)
    elif kind == "bad":
        pipeline = flowtrace.Pipeline(app.broker, app.extract, name="gw-bad").call_next(
            app.explode)
    elif kind == "retry":
        pipeline = flowtrace.Pipeline(app.broker, app.extract, name="gw-retry").call_next(
            app.flaky)
    else:
        return await app.double.kiq(n)
    return await pipeline.kiq(n)


def check_run(events: list[BaseEvent], pipeline_id: str, kind: str) -> None:
    """A run's complete sequence: causal order, one terminal last, the expected steps."""
    check_common(events, pipeline_id, NAMES[kind], "task" if kind == "plain" else "sequential")
    assert [s for s in shape(events) if s[0] != "StepProgressEvent"] == EXPECTED[kind][0]
    assert all(e.id is not None for e in events)
    ids = [e.id for e in events]
    assert len(set(ids)) == len(ids), "duplicate event ids"
    if kind == "map":
        progress = [e for e in events if e.type == "StepProgressEvent"]  # type: ignore[attr-defined]
        assert progress and (progress[-1].done, progress[-1].failed, progress[-1].total) == (
            4, 0, 4)


def per_run(events: list[BaseEvent], pipeline_id: str) -> list[BaseEvent]:
    return [e for e in events if e.pipeline_id == pipeline_id]


async def wait_stream_terminals(url: str, ids: set[str], timeout: float = 90) -> list[BaseEvent]:
    """Wait until every run in ``ids`` has its terminal event in the stream; the stream."""
    found: list[BaseEvent] = []

    async def done() -> bool:
        found[:] = await stream_events(url)
        return ids <= {e.pipeline_id for e in found if e.type in TERMINAL_TYPES}  # type: ignore[attr-defined]

    await async_wait_until(done, timeout=timeout, interval=0.2,
                           message=f"terminal events of {len(ids)} runs in the stream")
    return found


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def workers(redis_server: RedisServer, events_redis: RedisServer) -> Iterator[Workers]:
    group = Workers("tests.fleet_app.spine_worker:broker",
                    test_env(TEST_REDIS_URL=redis_server.url, FLOWTRACE_REDIS_URL=events_redis.url),
                    workers=2, extra_args=["--max-async-tasks", "3"])
    try:
        wait_for_log(group, "Listening started", count=2, timeout=60)
        yield group
    finally:
        group.stop()
    assert not FLOWTRACE_ERROR.search(group.output()), group.output()


@pytest.fixture
async def app(redis_server: RedisServer, events_redis: RedisServer,
              workers: Workers) -> AsyncIterator[Any]:
    """The worker app imported in this process: it kicks, the workers run."""
    async with fleet_client(redis_server.url, events_redis.url) as client:
        yield client


# --------------------------------------------------------------------------- 1
async def test_two_gateways_serve_identical_complete_sequences(
        events_redis: RedisServer, app: Any) -> None:
    with serve_gateways(events_redis.url, 2) as (one, two):
        async with WsFeed.open(one.ws_url("/ws/*")) as feed_one, \
                WsFeed.open(two.ws_url("/ws/*")) as feed_two:
            kinds = ["map", "bad", "retry", "map", "plain", "retry"]
            runs = {(await kick(app, kind)).task_id: kind for kind in kinds}

            stream = await wait_stream_terminals(events_redis.url, set(runs))
            last = stream[-1].id
            assert last is not None
            for feed in (feed_one, feed_two):
                await feed.wait(lambda f=feed: f.has_id(last), f"event {last} on both gateways")

            for pipeline_id, kind in runs.items():
                seen_one = await feed_one.wait_terminal(pipeline_id)
                seen_two = await feed_two.wait_terminal(pipeline_id)
                check_run(seen_one, pipeline_id, kind)
                # Same events, same ids, same order on both gateways, and exactly what the
                # run published to the stream.
                assert dumps(seen_two) == dumps(seen_one)
                assert dumps(seen_one) == dumps(per_run(stream, pipeline_id))

            # Nothing else on either feed: the stream's events after the first one we saw.
            first = feed_one.events[0].id
            tail = dumps(stream[[e.id for e in stream].index(first):])
            assert dumps(feed_one.events) == tail
            assert dumps(feed_two.events) == tail
            assert not feed_one.frames_of("error") and not feed_two.frames_of("error")

            for pipeline_id, kind in runs.items():
                state_one = await one.run_state(pipeline_id)
                state_two = await two.run_state(pipeline_id)
                assert state_one is not None
                assert state_one == state_two
                assert state_one["status"] == EXPECTED[kind][1]
                assert state_one["pipeline_name"] == NAMES[kind]
            for name, status in [("gw-map", "completed"), ("gw-bad", "failed"),
                                 ("gw-retry", "completed"), ("double", "completed")]:
                labels = {"pipeline": name, "status": status}
                count_one = await one.metric("flowtrace_pipeline_runs_total", **labels)
                assert count_one == await two.metric("flowtrace_pipeline_runs_total", **labels)
                assert count_one == sum(1 for k in runs.values() if NAMES[k] == name)
            assert not feed_one.ended and not feed_two.ended


# --------------------------------------------------------------------------- 2
async def test_resume_with_since_has_no_gap_and_no_duplicate(
        events_redis: RedisServer, app: Any) -> None:
    with serve_gateways(events_redis.url, 1) as (gateway,):
        stop = asyncio.Event()
        kicked: dict[str, str] = {}

        async def keep_kicking(kinds: list[str]) -> None:
            """Runs back to back until told to stop, paced by their own results."""
            i = 0
            while not stop.is_set():
                kind = kinds[i % len(kinds)]
                i += 1
                task = await kick(app, kind)
                kicked[task.task_id] = kind
                await task.wait_result(timeout=60)

        kickers = [asyncio.create_task(keep_kicking(["plain", "map", "bad"])),
                   asyncio.create_task(keep_kicking(["retry", "plain"]))]
        try:
            # Connected mid-stream: without ``since`` only what comes next is sent.
            await async_wait_until(lambda: _at_least(stream_events(events_redis.url), 4),
                                   timeout=60, interval=0.1, message="runs under way")
            async with WsFeed.open(gateway.ws_url("/ws/*")) as first:
                await first.wait(lambda: len(first.events) >= 12, "12 live events")
            seen_first = list(first.events)
            last_seen = seen_first[-1].id
            assert last_seen is not None and not first.frames_of("error")

            # The fleet publishes while nobody listens: the resume has a gap to fill.
            await async_wait_until(
                lambda: _at_least(stream_events(events_redis.url, last_seen), 6),
                timeout=60, interval=0.1, message="events published while disconnected")
            async with WsFeed.open(gateway.ws_url(f"/ws/*?since={last_seen}")) as second:
                end_at_resume = (await stream_events(events_redis.url))[-1].id
                # Runs keep coming until the resumed client is live past its replay.
                await second.wait(lambda: any(_newer(e.id, end_at_resume) for e in second.events),
                                  "live events after the replay")
                await second.wait(lambda: len(second.events) >= 20, "20 events after resume")
                stop.set()
                await asyncio.wait_for(asyncio.gather(*kickers), timeout=90)

                stream = await wait_stream_terminals(events_redis.url, set(kicked))
                end = stream[-1].id
                assert end is not None
                await second.wait(lambda: second.has_id(end), f"the stream's last event {end}")
                assert (await stream_events(events_redis.url))[-1].id == end, "still publishing"
                assert second.frames[0]["type"] == "subscribed"
                assert not second.frames_of("error"), second.frames_of("error")
                seen_second = list(second.events)
        finally:
            stop.set()
            for task in kickers:
                task.cancel()
            await asyncio.gather(*kickers, return_exceptions=True)

        ids = [e.id for e in stream]
        start = ids.index(seen_first[0].id)
        assert start >= 4
        union = seen_first + seen_second
        assert [e.id for e in union] == ids[start:], "gap or duplicate across the resume"
        assert dumps(union) == dumps(stream[start:])
        assert not _newer(seen_second[0].id, end_at_resume), "nothing was replayed"
        # Every run whose start the two connections saw is complete and in causal order.
        started = {e.pipeline_id for e in union if e.type == "PipelineStartEvent"}  # type: ignore[attr-defined]
        assert len(started) >= 3
        for pipeline_id in started:
            check_run(per_run(union, pipeline_id), pipeline_id, kicked[pipeline_id])


async def _at_least(events: Any, count: int) -> bool:
    return len(await events) >= count


def _newer(event_id: str | None, than: str | None) -> bool:
    if event_id is None or than is None:
        return False
    return id_sort_key(event_id) > id_sort_key(than)


# --------------------------------------------------------------------------- 3
async def test_events_redis_killed_and_restarted_mid_stream(
        events_redis: RedisServer, workers: Workers, app: Any) -> None:
    with serve_gateways(events_redis.url, 1) as (gateway,):
        async with WsFeed.open(gateway.ws_url("/ws/*")) as feed:
            # Runs in flight across the outage: their step sleeps while Redis is down.
            slow = [await app.slow.kiq(3.0) for _ in range(2)]
            for task in slow:
                await feed.wait(lambda pid=task.task_id: any(
                    e.type == "StepStartEvent" for e in feed.of(pid)),  # type: ignore[attr-defined]
                    f"StepStartEvent of {task.task_id}")
            seen_before = len(feed.events)
            events_redis.kill()

            # Runs go on without the events Redis (the broker's is another server).
            during = [await kick(app, "plain", i) for i in range(3)]
            for task in [*slow, *during]:
                assert not (await task.wait_result(timeout=60)).is_err
            # The gateway keeps serving: health, REST, and the WebSocket protocol.
            assert gateway.healthy()
            assert (await gateway.get("/api/pipelines")).status_code == 200
            await feed.ping()
            assert len(feed.events) == seen_before

            events_redis.start()
            # What the workers (and this kicker) buffered is published once Redis is back:
            # complete, no duplicate, each process's events in order.
            for task in slow:
                events = await feed.wait_terminal(task.task_id, timeout=90)
                check_common(events, task.task_id, "slow", "task")
                assert shape(events) == [START, *ok_steps(1), COMPLETE]
            for task in during:
                await feed.wait_terminal(task.task_id, timeout=90)
                await feed.wait(lambda pid=task.task_id: len(feed.of(pid)) >= 4,
                                f"every buffered event of {task.task_id}")
                events = feed.of(task.task_id)
                assert Counter(shape(events)) == Counter(EXPECTED["plain"][0]), shape(events)
                # The worker's own events keep their order; the kick's start event came from
                # another process's buffer (order across processes is best effort, SPEC §3).
                assert [s for s in shape(events) if s != START] == EXPECTED["plain"][0][1:]

            # Every run kicked after the restart arrives complete and in order.
            after = {(await kick(app, kind)).task_id: kind
                     for kind in ["map", "bad", "retry", "plain"]}
            stream = await wait_stream_terminals(events_redis.url, set(after))
            for pipeline_id, kind in after.items():
                events = await feed.wait_terminal(pipeline_id)
                check_run(events, pipeline_id, kind)
                assert dumps(events) == dumps(per_run(stream, pipeline_id))
                state = await gateway.run_state(pipeline_id)
                assert state is not None and state["status"] == EXPECTED[kind][1]
            for task in slow:
                state = await gateway.run_state(task.task_id)
                assert state is not None and state["status"] == "COMPLETED"

            # One connection all along: never closed, ids still increasing, no repeat.
            await feed.ping()
            assert not feed.ended and feed.close_error is None
            keys = [id_sort_key(e.id) for e in feed.events if e.id is not None]
            assert len(keys) == len(feed.events)
            assert keys == sorted(keys) and len(set(keys)) == len(keys)
            assert not feed.frames_of("error")
            assert gateway.healthy()
    assert "lost Redis" in workers.output() and "reconnected" in workers.output()


# --------------------------------------------------------------------------- 3b
async def test_runs_kicked_right_after_a_redis_restart_arrive_in_order(
        events_redis: RedisServer, app: Any) -> None:
    with serve_gateways(events_redis.url, 1) as (gateway,):
        async with WsFeed.open(gateway.ws_url("/ws/*")) as feed:
            # This process has published before (as after any earlier kick), the workers not.
            earlier = PipelineStartEvent(pipeline_id=f"earlier-{uuid.uuid4().hex}",
                                         pipeline_name="earlier", pipeline_type="task")
            await app.middleware.transport.publish(earlier)
            assert await app.middleware.transport.flush(timeout=10)
            await feed.wait(lambda: feed.of(earlier.pipeline_id), "the earlier event")

            events_redis.kill()
            events_redis.start()  # back before anything was published: no outage to see
            after = {(await kick(app, kind)).task_id: kind
                     for kind in ["plain", "plain", "map", "bad", "retry"]}
            stream = await wait_stream_terminals(events_redis.url, set(after))
            for pipeline_id, kind in after.items():
                await feed.wait(lambda pid=pipeline_id: len(feed.of(pid)) == len(
                    per_run(stream, pid)), f"every event of {pipeline_id}")
                check_run(feed.of(pipeline_id), pipeline_id, kind)


# --------------------------------------------------------------------------- 3c
async def test_resume_from_before_a_redis_restart_reports_history_truncated(
        events_redis: RedisServer) -> None:
    await publish_to_stream(events_redis.url, [StepStartEvent(
        pipeline_id="before-restart", step_name="s", step_index=step_index, task_id="t",
        attempt=1, worker="w") for step_index in range(3)])
    first_id = (await stream_events(events_redis.url))[0].id  # a client saw this one

    events_redis.kill()
    events_redis.start()  # empty: the two events after first_id are gone for good
    after = f"after-restart-{uuid.uuid4().hex}"
    await publish_to_stream(events_redis.url,
                            [PipelineStartEvent(pipeline_id=after, pipeline_type="task")])

    with serve_gateways(events_redis.url, 1) as (gateway,):
        async with WsFeed.open(gateway.ws_url(f"/ws/*?since={first_id}")) as feed:
            await feed.wait(lambda: feed.of(after), "the replayed event")
            kinds = [f["type"] for f in feed.frames]
            assert kinds[:3] == ["subscribed", "error", "PipelineStartEvent"], feed.frames
            assert feed.frames_of("error")[0]["code"] == "history_truncated"


# --------------------------------------------------------------------------- 4
async def test_worker_killed_mid_step_is_declared_lost_once(
        events_redis: RedisServer, workers: Workers, app: Any) -> None:
    with serve_gateways(events_redis.url, 1, "--stale-after", "2") as (gateway,):
        kicked = await app.slow.kiq(30)
        pipeline_id = kicked.task_id
        # since=0-0: everything this run published so far, then live.
        async with WsFeed.open(gateway.ws_url(f"/ws/{pipeline_id}?since=0-0")) as feed:
            await feed.wait(lambda: any(e.type == "StepStartEvent"  # type: ignore[attr-defined]
                                        for e in feed.of(pipeline_id)), "the step's start")
            workers.stop(signal.SIGKILL)  # the whole worker process group, mid-step

            events = await feed.wait_terminal(pipeline_id, timeout=60)
            assert shape(events) == [START, ("StepStartEvent", 0), FAILED]
            lost = events[-1]
            assert (lost.status, lost.error_type) == ("LOST", "RunLost")  # type: ignore[attr-defined]
            assert (lost.failed_step, lost.failed_step_index) == ("slow", 0)  # type: ignore[attr-defined]
            assert lost.pipeline_name == "slow" and lost.pipeline_type == "task"
            await _check_lost_once(gateway, pipeline_id)

            # A witness run that goes silent now is declared lost only after another
            # stale_after (>= 4 sweep intervals): by then every sweep that could have
            # declared the first run again has run, and its event has been delivered.
            witness = f"witness-{uuid.uuid4().hex}"
            await feed.send({"type": "subscribe", "pipeline_id": witness})
            await feed.wait(lambda: any(f["pipeline_id"] == witness
                                        for f in feed.frames_of("subscribed")), "subscribed")
            await publish_to_stream(events_redis.url, [PipelineStartEvent(
                pipeline_id=witness, pipeline_name="witness", pipeline_type="task")])
            witnessed = await feed.wait_terminal(witness, timeout=60)
            assert witnessed[-1].status == "LOST"  # type: ignore[attr-defined]

            assert [e.type for e in feed.of(pipeline_id)].count("PipelineErrorEvent") == 1  # type: ignore[attr-defined]
            await _check_lost_once(gateway, pipeline_id)
            assert await gateway.metric("flowtrace_pipeline_runs_total",
                                        pipeline="witness", status="lost") == 1.0
            stream = per_run(await stream_events(events_redis.url), pipeline_id)
            assert [e.type for e in stream].count("PipelineErrorEvent") == 1  # type: ignore[attr-defined]
            assert not feed.ended


async def _check_lost_once(gateway: Any, pipeline_id: str) -> None:
    state = await gateway.run_state(pipeline_id)
    assert state is not None and state["status"] == "LOST", state
    assert await gateway.metric("flowtrace_pipeline_runs_total",
                                pipeline="slow", status="lost") == 1.0
    assert await gateway.metric("flowtrace_pipeline_runs_total",
                                pipeline="slow", status="completed") == 0.0
    assert await gateway.metric("flowtrace_pipelines_in_progress", pipeline="slow") == 0.0
