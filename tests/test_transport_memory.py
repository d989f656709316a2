"""InMemoryTransport: ids, order, resume without gap or duplicate, truncation, drops."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flowtrace.transport
from flowtrace.events import Event, PipelineCompleteEvent, PipelineStartEvent, StepStartEvent
from flowtrace.progress import ProgressMonitor
from flowtrace.transport import InMemoryTransport
from flowtrace.transport.base import FROM_BEGINNING, id_sort_key
from tests.support.processes import test_env
from tests.support.waiting import async_wait_until


def step(n: int, pipeline_id: str = "p") -> StepStartEvent:
    return StepStartEvent(pipeline_id=pipeline_id, step_name="s", step_index=n)


def index(event: Event) -> int:
    assert isinstance(event, StepStartEvent)
    return event.step_index


async def take(iterator: AsyncIterator[Event], n: int) -> list[Event]:
    return [await anext(iterator) for _ in range(n)]


async def test_round_trip_sets_ids_with_epoch_and_keeps_fields() -> None:
    transport = InMemoryTransport()
    events = transport.subscribe()
    sent = PipelineCompleteEvent(pipeline_id="run-1", pipeline_name="etl", result={"x": 1})
    await transport.publish(sent)

    (received,) = await take(events, 1)

    assert received is sent, "one object: the emitting process's hooks see the id too"
    assert received.id == f"{transport.epoch}-1"
    assert received.model_dump(exclude={"id"}) == sent.model_dump(exclude={"id"})


async def test_fields_published_arrive_as_one_model_with_their_id_and_replay_equal() -> None:
    """What the middleware publishes: an event's fields (declared order), no model yet."""
    transport = InMemoryTransport()
    first, second = transport.subscribe(), transport.subscribe()
    model = PipelineStartEvent(pipeline_id="run-2", pipeline_name="etl", pipeline_type="task",
                               input={"n": 1}, steps=["etl"])
    fields = dict(model.__dict__)
    transport.publish_fields_nowait(fields)

    (one,), (other,) = await take(first, 1), await take(second, 1)
    assert one is other, "one model for every subscriber"
    assert isinstance(one, PipelineStartEvent) and one.id == fields["id"] == f"{transport.epoch}-1"
    assert one.model_dump(exclude={"id"}) == model.model_dump(exclude={"id"})
    (replayed,) = [e async for e in transport.replay(FROM_BEGINNING)]
    assert replayed == one and replayed is not one


async def test_every_subscriber_sees_every_event_in_publish_order() -> None:
    transport = InMemoryTransport()
    first, second = transport.subscribe(), transport.subscribe()
    for n in range(500):
        await transport.publish(step(n))

    for events in (first, second):
        received = await take(events, 500)
        assert [index(e) for e in received] == list(range(500))
        ids = [id_sort_key(e.id or "") for e in received]
        assert ids == sorted(ids) and len(set(ids)) == 500


async def test_subscribe_without_since_gets_only_new_events() -> None:
    transport = InMemoryTransport()
    await transport.publish(step(0))
    events = transport.subscribe()
    await transport.publish(step(1))

    assert [index(e) for e in await take(events, 1)] == [1]


async def test_resume_replays_then_goes_live_without_gap_or_duplicate() -> None:
    transport = InMemoryTransport()
    everything = transport.subscribe()
    for n in range(100):
        await transport.publish(step(n))
    history = await take(everything, 100)
    since = history[49].id
    assert since is not None

    async def keep_publishing() -> None:
        for n in range(100, 300):
            await transport.publish(step(n))
            if n % 10 == 0:
                await asyncio.sleep(0)  # let the subscriber interleave with the publisher

    publisher = asyncio.create_task(keep_publishing())
    resumed = await take(transport.subscribe(since=since), 250)
    await publisher

    assert [index(e) for e in resumed] == list(range(50, 300))
    assert not transport.history_is_truncated(since)


async def test_ring_overflow_is_reported_as_truncated_history() -> None:
    transport = InMemoryTransport(maxlen=5)
    everything = transport.subscribe()
    for n in range(10):
        await transport.publish(step(n))
    ids = [e.id or "" for e in await take(everything, 10)]  # seqs 1..10, ring keeps 6..10

    assert transport.history_is_truncated(ids[3])  # seq 4: seq 5 is gone
    assert not transport.history_is_truncated(ids[4])  # seq 5: everything after it is kept
    assert not transport.history_is_truncated(ids[9])
    replayed = await take(transport.subscribe(since=ids[0]), 5)
    assert [index(e) for e in replayed] == [5, 6, 7, 8, 9]


async def test_replay_is_finite_and_from_beginning_means_everything_retained() -> None:
    transport = InMemoryTransport(maxlen=3)
    for n in range(5):
        await transport.publish(step(n))
    history = transport.replay(FROM_BEGINNING)
    await transport.publish(step(5))  # after the call: not part of this replay

    replayed = [e async for e in history]
    assert [index(e) for e in replayed] == [2, 3, 4]
    assert [index(e) async for e in transport.replay(replayed[0].id or "")] == [3, 4, 5]
    assert [e async for e in transport.replay("garbage")] == []
    assert not transport.history_is_truncated(FROM_BEGINNING)
    assert [index(e) for e in await take(transport.subscribe(since=FROM_BEGINNING), 3)] == [3, 4, 5]


async def test_a_bare_epoch_resumes_from_this_incarnations_first_event() -> None:
    transport = InMemoryTransport(maxlen=3)
    await transport.publish(step(0))
    assert not transport.history_is_truncated(transport.epoch)
    assert [index(e) for e in await take(transport.subscribe(since=transport.epoch), 1)] == [0]

    for n in range(1, 5):
        await transport.publish(step(n))
    assert transport.history_is_truncated(transport.epoch)  # step 0 and 1 are gone
    assert [index(e) async for e in transport.replay(transport.epoch)] == [2, 3, 4]


async def test_replay_of_one_run_yields_only_that_runs_events() -> None:
    transport = InMemoryTransport()
    for n in range(9):
        await transport.publish(step(n, ["a", "b", "c"][n % 3]))
    assert [index(e) async for e in transport.replay(FROM_BEGINNING, "b")] == [1, 4, 7]
    assert [e async for e in transport.replay(FROM_BEGINNING, "x")] == []


async def test_ids_from_another_incarnation_or_malformed_are_truncated() -> None:
    old, new = InMemoryTransport(), InMemoryTransport()
    assert old.epoch != new.epoch
    old_events = old.subscribe()
    await old.publish(step(0))
    (old_event,) = await take(old_events, 1)
    await new.publish(step(1))

    assert old_event.id is not None
    assert new.history_is_truncated(old_event.id)
    for bad in ("", "nonsense", "1-x", "²-1", f"{new.epoch}-²", f"{new.epoch}-99"):
        assert new.history_is_truncated(bad), bad
    # A client of the previous incarnation gets everything this one still has.
    assert [index(e) for e in await take(new.subscribe(since=old_event.id), 1)] == [1]


async def test_slow_subscriber_overflow_is_dropped_and_counted_without_blocking() -> None:
    transport = InMemoryTransport(subscriber_queue_size=3)
    reported: list[tuple[str, int]] = []
    transport.on_drop(lambda reason, count: reported.append((reason, count)))
    slow, fast = transport.subscribe(), transport.subscribe()
    fast_seen: list[int] = []

    async def consume_fast() -> None:
        async for event in fast:
            fast_seen.append(index(event))

    consumer = asyncio.create_task(consume_fast())
    for n in range(9):
        await transport.publish(step(n))  # returns although `slow` is full
        if n % 3 == 2:
            await caught_up(fast_seen, n + 1)
    consumer.cancel()

    assert [index(e) for e in await take(slow, 3)] == [0, 1, 2]
    assert transport.dropped == {"subscriber_overflow": 6}
    assert reported == [("subscriber_overflow", 1)] * 6
    assert fast_seen == list(range(9))


async def caught_up(seen: list[int], count: int) -> None:
    await async_wait_until(lambda: len(seen) >= count, message=f"{count} events")


async def test_an_abandoned_unstarted_subscription_does_not_hold_a_queue() -> None:
    transport = InMemoryTransport(subscriber_queue_size=1)
    transport.subscribe()  # never iterated, immediately garbage
    gc.collect()
    for n in range(3):
        await transport.publish(step(n))
    assert transport.dropped == {}


async def test_item_counts() -> None:
    transport = InMemoryTransport()
    for failed in (False, False, True):
        transport.count_item("run:1", failed)
    assert await transport.read_counts("run:1") == (2, 1)
    assert await transport.read_counts("unknown") == (0, 0)


async def test_close_ends_subscribers() -> None:
    transport = InMemoryTransport()
    events = transport.subscribe()
    waiting = asyncio.create_task(take(events, 1))
    await transport.close()
    assert await transport.flush()
    with pytest.raises(StopAsyncIteration):
        await waiting


@settings(max_examples=60, deadline=None)
@given(maxlen=st.integers(1, 8), published=st.integers(0, 20), since_seq=st.integers(0, 22))
def test_resume_matches_ring_contents(maxlen: int, published: int, since_seq: int) -> None:
    """Replay after ``since`` = every retained event after it; truncated iff one is missing."""

    async def scenario() -> None:
        transport = InMemoryTransport(maxlen=maxlen)
        for n in range(1, published + 1):
            await transport.publish(step(n))
        since = f"{transport.epoch}-{since_seq}"
        retained = list(range(max(1, published - maxlen + 1), published + 1))
        lost = since_seq > published or any(
            n not in retained for n in range(since_seq + 1, published + 1))
        assert transport.history_is_truncated(since) == lost
        live = transport.subscribe(since=since)
        await transport.publish(step(-1))  # marks the end of the replay
        replayed: list[int] = []
        async for event in live:
            if index(event) == -1:
                break
            replayed.append(index(event))
        assert replayed == [n for n in retained if n > since_seq]

    asyncio.run(scenario())


_IN_MEMORY_PROCESS = """
import asyncio, sys
from taskiq import InMemoryBroker
import flowtrace
from flowtrace.app import create_app

broker = InMemoryBroker()
middleware = flowtrace.instrument(broker)

@broker.task
async def add(a: int, b: int) -> int:
    return a + b

async def main() -> None:
    await broker.startup()
    task = await add.kiq(1, 2)
    assert (await task.wait_result(timeout=10)).return_value == 3
    await broker.shutdown()
    events = [event.type async for event in middleware.transport.replay("0-0")]
    assert events[-1] == "PipelineCompleteEvent", events

asyncio.run(main())
create_app(transport=middleware.transport)
print("redis" in sys.modules)
from flowtrace.transport import RedisPubSubTransport, RedisStreamTransport
redis_broker = InMemoryBroker()
with_redis = flowtrace.instrument(redis_broker, redis_url="redis://127.0.0.1:1/0")
print(type(with_redis.transport) is RedisStreamTransport, "redis" in sys.modules)
"""


def test_a_process_with_events_in_memory_does_not_load_the_redis_client() -> None:
    """The Redis client (≈ 60 ms and 7 MiB per process) is loaded only by a process that uses
    a Redis transport; ``flowtrace.transport`` still exports both Redis classes."""
    done = subprocess.run([sys.executable, "-c", _IN_MEMORY_PROCESS], env=test_env(),
                          capture_output=True, text=True, timeout=120, check=False)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True"]
    with pytest.raises(AttributeError, match="has no attribute 'RedisTransport'"):
        _ = flowtrace.transport.RedisTransport  # type: ignore[attr-defined]


# ------------------------------------------------------------------ a step's item counts
async def test_progress_never_counts_more_items_than_the_step_has() -> None:
    """Items redelivered after they counted themselves (a broker's idle timeout) count again:
    a report keeps done + failed within total, and the counters go when the step is over."""
    transport = InMemoryTransport()
    reports: list[tuple[int, int]] = []

    async def report(done: int, failed: int) -> None:
        reports.append((done, failed))

    monitor = ProgressMonitor(transport, "run:1", total=5, report=report, interval=0.01)
    for failed in (False, False, False, True, True, False, False, True):
        transport.count_item("run:1", failed)
    monitor.start()
    await async_wait_until(lambda: reports, message="a progress report")
    await monitor.finish(5, 0)
    assert reports == [(5, 0)]

    transport.forget_counts("run:1")
    assert await transport.read_counts("run:1") == (0, 0)
