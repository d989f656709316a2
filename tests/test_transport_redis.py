"""Redis transports against a real, private redis-server that tests stop and restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis
import websockets
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from taskiq import InMemoryBroker

import flowtrace
from flowtrace.app import create_app
from flowtrace.events import Event, StepStartEvent
from flowtrace.middleware import FlowtraceMiddleware
from flowtrace.transport import RedisPubSubTransport, RedisStreamTransport
from flowtrace.transport.base import FROM_BEGINNING, Transport, id_sort_key
from flowtrace.transport.memory import InMemoryTransport
from flowtrace.websocket.protocol import parse_since
from tests.support.app_thread import AppServer
from tests.support.processes import RedisServer
from tests.support.waiting import async_wait_until

PROBE = "probe"


def step(n: int, pipeline_id: str = "p") -> StepStartEvent:
    return StepStartEvent(pipeline_id=pipeline_id, step_name="s", step_index=n)


def index(event: Event) -> int:
    assert isinstance(event, StepStartEvent)
    return event.step_index


class Collector:
    """Drains a subscription in the background; probe events are kept apart."""

    def __init__(self, events: AsyncIterator[Event]) -> None:
        self.received: list[Event] = []
        self.probes = 0
        self.task = asyncio.create_task(self._drain(events))

    async def _drain(self, events: AsyncIterator[Event]) -> None:
        async for event in events:
            if event.pipeline_id == PROBE:
                self.probes += 1
            else:
                self.received.append(event)

    def indexes(self) -> list[int]:
        return [index(e) for e in self.received]

    async def wait_for(self, count: int, timeout: float = 15) -> list[int]:
        await async_wait_until(lambda: len(self.received) >= count, timeout=timeout,
                               message=f"{count} events (have {len(self.received)})")
        return self.indexes()

    async def wait_live(self, transport: Transport) -> None:
        """Publish probes until a new one arrives: the subscription is then surely live."""
        before = self.probes

        async def probe_seen() -> bool:
            await transport.publish(step(0, PROBE))
            return self.probes > before

        await async_wait_until(probe_seen, interval=0.05, message="a probe event")

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.wait([self.task])


@pytest.fixture
def no_task_leaks(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.WARNING)
    yield
    assert "Task was destroyed" not in caplog.text
    assert "exception was never retrieved" not in caplog.text


def outage_logs(caplog: pytest.LogCaptureFixture, what: str) -> int:
    return sum(1 for r in caplog.records if "lost Redis" in r.getMessage() and what in
               r.getMessage())


async def stream_ids(url: str, stream: str = "flowtrace:events") -> list[str]:
    async with Redis.from_url(url) as raw:
        return [entry_id.decode() for entry_id, _ in await raw.xrange(stream)]


# -- RedisStreamTransport -------------------------------------------------------------------


async def test_stream_round_trip_ordered_with_stream_ids(redis_server: RedisServer,
                                                         no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url)
    for n in range(300):
        await transport.publish(step(n))
    assert await transport.flush()
    collector = Collector(transport.subscribe(since=FROM_BEGINNING))
    received = await collector.wait_for(300)
    await collector.stop()
    await transport.close()

    assert received == list(range(300))
    ids = [e.id or "" for e in collector.received]
    assert ids == await stream_ids(redis_server.url)
    assert [id_sort_key(i) for i in ids] == sorted(id_sort_key(i) for i in ids)


async def test_stream_subscribe_without_since_gets_only_new_events(
        redis_server: RedisServer, no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url)
    await transport.publish(step(1))
    assert await transport.flush()
    collector = Collector(transport.subscribe())
    await collector.wait_live(transport)
    await transport.publish(step(2))

    assert await collector.wait_for(1) == [2]
    await collector.stop()
    await transport.close()


async def test_stream_resume_with_since_while_publishing(redis_server: RedisServer,
                                                         no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url, batch_size=7)
    for n in range(50):
        await transport.publish(step(n))
    assert await transport.flush()
    since = (await stream_ids(redis_server.url))[24]

    async def keep_publishing() -> None:
        for n in range(50, 250):
            await transport.publish(step(n))
            if n % 20 == 0:
                await transport.flush()

    publisher = asyncio.create_task(keep_publishing())
    collector = Collector(transport.subscribe(since=since))
    received = await collector.wait_for(225)
    await publisher
    assert await transport.flush()
    await collector.stop()
    await transport.close()

    assert received == list(range(25, 250))
    assert id_sort_key(collector.received[0].id or "") > id_sort_key(since)


async def test_stream_replay_is_finite_and_resumes_after_since(redis_server: RedisServer,
                                                               no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url, batch_size=4)
    for n in range(10):
        await transport.publish(step(n))
    assert await transport.flush()

    everything = [e async for e in transport.replay(FROM_BEGINNING)]
    assert [index(e) for e in everything] == list(range(10))
    after = [index(e) async for e in transport.replay(everything[6].id or "")]
    assert after == [7, 8, 9]
    assert [e async for e in transport.replay("not-an-id")] == []
    await transport.close()


ODD_ID = 'run "ü/1"'  # no plain id: its entries are decoded to be told apart


async def test_stream_replay_of_one_run_yields_only_that_runs_events(
        redis_server: RedisServer, no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url, batch_size=4)
    runs = ["a1b2-c3", "a1b2", ODD_ID]
    for n in range(12):
        await transport.publish(step(n, runs[n % 3]))
    assert await transport.flush()

    for pipeline_id in runs:
        replayed = [e async for e in transport.replay(FROM_BEGINNING, pipeline_id)]
        assert {e.pipeline_id for e in replayed} == {pipeline_id}
        assert [index(e) for e in replayed] == [n for n in range(12) if runs[n % 3] == pipeline_id]
    # An id that is only part of another's, or of a field's value, matches nothing.
    assert [e async for e in transport.replay(FROM_BEGINNING, "a1b")] == []
    assert [e async for e in transport.replay(FROM_BEGINNING, "s")] == []
    await transport.close()


async def test_stream_detects_trimmed_history(redis_server: RedisServer,
                                              no_task_leaks: None) -> None:
    fresh = RedisStreamTransport(redis_server.url, stream="other")
    assert not await fresh.is_history_truncated(FROM_BEGINNING)
    await fresh.close()

    transport = RedisStreamTransport(redis_server.url, maxlen=5, approximate=False)
    await transport.publish(step(0))
    assert await transport.flush()
    (first_id,) = await stream_ids(redis_server.url)
    assert not await transport.is_history_truncated(first_id)  # nothing trimmed yet
    for n in range(1, 20):
        await transport.publish(step(n))
    assert await transport.flush()
    retained = await stream_ids(redis_server.url)
    assert len(retained) == 5

    assert await transport.is_history_truncated(first_id)  # 1..14 were trimmed after it
    assert not await transport.is_history_truncated(retained[0])
    assert not await transport.is_history_truncated(retained[-1])
    assert not await transport.is_history_truncated(FROM_BEGINNING)
    ms, _, _ = retained[-1].partition("-")
    for foreign in ("garbage", "12", f"{int(ms) + 10_000}-0"):
        assert await transport.is_history_truncated(foreign), foreign
    assert transport.history_is_truncated(retained[0])  # no I/O: conservative
    replayed = [index(e) async for e in transport.replay(first_id)]
    assert replayed == [15, 16, 17, 18, 19]  # what is left after the gap
    await transport.close()


async def test_stream_id_without_its_sequence_number_reads_as_seq_0(
        redis_server: RedisServer, no_task_leaks: None) -> None:
    """Redis reads ``since="<ms>"`` as ``"<ms>-0"``, and so does the transport (it was
    malformed: truncated history, nothing replayed)."""
    transport = RedisStreamTransport(redis_server.url)
    for n in range(5):
        await transport.publish(step(n))
    assert await transport.flush()
    ms = (await stream_ids(redis_server.url))[0].partition("-")[0]
    after = [index(e) async for e in transport.replay(f"{ms}-0")]
    assert after[-4:] == [1, 2, 3, 4]

    assert [index(e) async for e in transport.replay(ms)] == after
    assert not await transport.is_history_truncated(ms)
    assert not transport.history_is_truncated("0")  # "0-0": FROM_BEGINNING
    collector = Collector(transport.subscribe(since=ms))
    assert await collector.wait_for(len(after)) == after
    await collector.stop()
    await transport.close()


async def _resumed(url: str, since: str, last: int) -> list[dict[str, Any]]:
    """What a WebSocket client resuming ``/ws/p`` from ``since`` gets, up to step ``last``."""
    messages: list[dict[str, Any]] = []
    async with websockets.connect(f"{url}/ws/p?since={since}", open_timeout=10) as ws:
        while not messages or messages[-1].get("step_index") != last:
            messages.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            assert messages[-1]["type"] != "error", messages[-1]
    return messages


async def test_websocket_resume_from_a_stream_id_without_its_sequence_number(
        redis_server: RedisServer) -> None:
    """The protocol takes ``since=<ms>``: the gateway replays what follows ``<ms>-0``."""
    publisher = RedisStreamTransport(redis_server.url)
    for n in range(5):
        await publisher.publish(step(n))
    assert await publisher.flush()
    await publisher.close()
    ms = (await stream_ids(redis_server.url))[0].partition("-")[0]
    transport = RedisStreamTransport(redis_server.url)
    with AppServer(create_app(transport)) as server:
        try:
            messages = await _resumed(server.ws_url, ms, last=4)
        finally:
            server.call(transport.close)
    assert messages[0] == {"type": "subscribed", "pipeline_id": "p", "event_types": None,
                           "since": f"{ms}-0"}
    assert [m["step_index"] for m in messages if "step_index" in m][-4:] == [1, 2, 3, 4]


async def test_an_id_without_its_sequence_number_means_seq_0_in_memory_too() -> None:
    """The protocol hands every transport ``"<major>-0"``: in memory, the whole epoch."""
    transport = InMemoryTransport()
    for n in range(3):
        transport.publish_nowait(step(n))
    since = parse_since(transport.epoch)
    assert since == f"{transport.epoch}-0"
    assert not transport.history_is_truncated(since)
    assert [index(e) async for e in transport.replay(since)] == [0, 1, 2]


async def test_stream_publish_while_redis_down_buffers_and_delivers_after_restart(
        redis_server: RedisServer, no_task_leaks: None,
        caplog: pytest.LogCaptureFixture) -> None:
    transport = RedisStreamTransport(redis_server.url, batch_size=3)
    await transport.publish(step(0))
    assert await transport.flush()
    redis_server.stop()

    for n in range(1, 21):
        await transport.publish(step(n))  # neither raises nor waits for Redis
    assert not await transport.flush(timeout=10)
    assert not await transport.flush(timeout=10)  # known down: answers at once

    redis_server.start()  # empty again: the server keeps no data across restarts
    await async_wait_until(lambda: transport.flush(timeout=1), message="the buffer to drain")
    replayed = [index(e) async for e in transport.replay(FROM_BEGINNING)]
    await transport.close()

    assert replayed == list(range(1, 21))
    assert outage_logs(caplog, "publisher") == 1
    assert transport.dropped == {}


async def test_stream_subscriber_survives_redis_restart(redis_server: RedisServer,
                                                        no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url, block_ms=200)
    collector = Collector(transport.subscribe(since=FROM_BEGINNING))
    await transport.publish(step(1))
    assert await collector.wait_for(1) == [1]

    redis_server.stop()
    redis_server.start()
    await transport.publish(step(2))
    await transport.publish(step(3))

    assert await collector.wait_for(3) == [1, 2, 3]
    await collector.stop()
    await transport.close()


async def test_stream_subscriber_started_while_redis_down_catches_up(
        redis_server: RedisServer, no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url, block_ms=200)
    redis_server.stop()
    collector = Collector(transport.subscribe(since=FROM_BEGINNING))
    await transport.publish(step(1))
    redis_server.start()

    assert await collector.wait_for(1) == [1]
    await collector.stop()
    await transport.close()


async def test_stream_buffer_overflow_drops_oldest_and_counts(redis_server: RedisServer,
                                                              no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url, buffer_size=10)
    reported: list[tuple[str, int]] = []
    transport.on_drop(lambda reason, count: reported.append((reason, count)))
    redis_server.stop()
    for n in range(30):
        await transport.publish(step(n))  # publish never yields: the sender cannot run
    assert transport.dropped == {"buffer_full": 20}
    assert reported == [("buffer_full", 1)] * 20

    redis_server.start()
    await async_wait_until(lambda: transport.flush(timeout=1), message="the buffer to drain")
    assert [index(e) async for e in transport.replay(FROM_BEGINNING)] == list(range(20, 30))
    await transport.close()


async def test_stream_skips_invalid_entries(redis_server: RedisServer,
                                            no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url)
    collector = Collector(transport.subscribe(since=FROM_BEGINNING))
    async with Redis.from_url(redis_server.url) as raw:
        for fields in ({"e": "not json"}, {"e": b"\xff\xfe"}, {"other": "field"},
                       {"e": '{"type": "NoSuchEvent"}'}, {"e": "[1, 2]"}):
            await raw.xadd("flowtrace:events", fields)
    await transport.publish(step(7))

    assert await collector.wait_for(1) == [7]
    assert transport.dropped == {"invalid_event": 5}
    assert [index(e) async for e in transport.replay(FROM_BEGINNING)] == [7]
    await collector.stop()
    await transport.close()


async def test_stream_item_counts(redis_server: RedisServer, no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url)
    for failed in (False, False, False, True):
        transport.count_item("run-1:2", failed)
    assert await transport.read_counts("run-1:2") == (3, 1)
    assert await transport.read_counts("unknown") == (0, 0)
    async with Redis.from_url(redis_server.url) as raw:
        assert 0 < await raw.ttl("flowtrace:items:run-1:2") <= 86_400

    redis_server.stop()
    assert await transport.read_counts("run-1:2") == (0, 0)
    await transport.close()


async def _calls(raw: Redis, command: str) -> int:
    stats = await raw.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def _batches_sent(raw: Redis) -> int:
    """Batches the server got since its stats were reset: a batch is one script call, or
    without scripting a MULTI/EXEC transaction (the sender's first question whether the
    server runs scripts is a script call too)."""
    return await _calls(raw, "eval") + await _calls(raw, "exec")


async def test_stream_events_trickling_in_share_a_batch(redis_server: RedisServer,
                                                        no_task_leaks: None) -> None:
    """A busy worker emits an event every few hundred µs: each must not cost a round trip."""
    transport = RedisStreamTransport(redis_server.url, linger_ms=500)
    async with Redis.from_url(redis_server.url) as raw:
        await raw.config_resetstat()
        for n in range(40):
            await transport.publish(step(n))
            await asyncio.sleep(0.001)  # one event per loop turn, as tasks finish
        assert await transport.flush(timeout=10)
        assert await raw.xlen("flowtrace:events") == 40
        assert await _batches_sent(raw) <= 1 + 5  # one per event (40) without a linger
    assert [index(e) async for e in transport.replay(FROM_BEGINNING)] == list(range(40))
    await transport.close()


async def test_stream_flush_does_not_wait_for_the_linger(redis_server: RedisServer,
                                                         no_task_leaks: None) -> None:
    """A pipeline hop flushes before kicking its next step: a linger must not delay it."""
    transport = RedisStreamTransport(redis_server.url, linger_ms=600_000)
    await transport.publish(step(1))
    await asyncio.sleep(0)  # the sender starts lingering
    assert await transport.flush(timeout=30)  # False (timed out) if it waited ten minutes
    async with Redis.from_url(redis_server.url) as raw:
        assert await raw.xlen("flowtrace:events") == 1
    await transport.close()


async def test_stream_unflushed_events_leave_after_the_linger(redis_server: RedisServer,
                                                              no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url, linger_ms=50)
    await transport.publish(step(1))
    async with Redis.from_url(redis_server.url) as raw:
        await async_wait_until(lambda: raw.xlen("flowtrace:events"), timeout=10,
                               message="the event to reach Redis without a flush")
    await transport.close()


async def test_stream_batch_is_one_script_call(redis_server: RedisServer,
                                              no_task_leaks: None) -> None:
    """redis-py packs and parses each command in Python: a batch goes as one EVAL, its
    events in order, with the item counts queued between them applied too."""
    transport = RedisStreamTransport(redis_server.url, linger_ms=600_000)
    async with Redis.from_url(redis_server.url) as raw:
        await raw.config_resetstat()
        for n in range(200):
            await transport.publish(step(n))
            if n % 50 == 0:
                transport.count_item("run:1", failed=False)
        assert await transport.flush(timeout=10)
        # One batch: one EVAL, and the sender's one question whether the server runs
        # scripts (200 XADDs and 8 count commands in MULTI/EXEC without them).
        assert (await _calls(raw, "eval"), await _calls(raw, "exec")) == (1 + 1, 0)
        assert await raw.hget("flowtrace:items:run:1", "done") == b"4"
    assert [index(e) async for e in transport.replay(FROM_BEGINNING)] == list(range(200))
    await transport.close()


async def _user_url(raw: Redis, server: RedisServer, name: str, *commands: str) -> str:
    """The URL of ACL user ``name`` (created or changed), allowed every key and channel and
    the given ``commands`` rules."""
    await raw.acl_setuser(name, enabled=True, nopass=True, keys=["~*"], channels=["*"],
                          commands=list(commands))
    return f"redis://{name}@127.0.0.1:{server.port}/0"


async def test_stream_without_scripting_publishes_each_event(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """A server (or an ACL) that runs no scripts still gets every event, one XADD each."""
    async with Redis.from_url(redis_server.url) as raw:
        url = await _user_url(raw, redis_server, "noscripts", "+@all", "-@scripting")
        await raw.config_resetstat()
        transport = RedisStreamTransport(url, maxlen=150, approximate=False)
        for n in range(200):
            await transport.publish(step(n))
        assert await transport.flush(timeout=10)
        assert "runs no scripts" in caplog.text
        assert [index(e) async for e in transport.replay(FROM_BEGINNING)] == list(range(50, 200))
        assert await _calls(raw, "xadd") == 200
        await transport.close()


async def test_stream_without_access_to_the_batch_keys_publishes_each_event(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """An ACL that allows the stream and the item counters but not the key where the batch
    script keeps a sender's last batch: every event and count still arrives, one command
    each (applied again if sent again after a timeout, unlike a script call's)."""
    async with Redis.from_url(redis_server.url) as raw:
        await raw.acl_setuser("publisher", enabled=True, nopass=True, commands=["+@all"],
                              keys=["~flowtrace:events", "~flowtrace:items:*"])
        transport = RedisStreamTransport(f"redis://publisher@127.0.0.1:{redis_server.port}/0")
        for n in range(20):
            await transport.publish(step(n))
        transport.count_item("run:1", failed=False)
        assert await transport.flush(timeout=10)
        assert "runs no scripts" in caplog.text
        assert [index(e) async for e in transport.replay(FROM_BEGINNING)] == list(range(20))
        assert await raw.hget("flowtrace:items:run:1", "done") == b"1"
        assert transport.dropped == {}
        await transport.close()


async def test_stream_events_redis_rejects_are_counted(redis_server: RedisServer,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A key of another type where the stream belongs: every event of the failed script
    call is counted as dropped, not one per call."""
    async with Redis.from_url(redis_server.url) as raw:
        await raw.set("flowtrace:events", "not a stream")
    transport = RedisStreamTransport(redis_server.url)
    for n in range(30):
        await transport.publish(step(n))
    assert await transport.flush(timeout=10)
    assert transport.dropped == {"redis_error": 30}
    assert "WRONGTYPE" in caplog.text
    await transport.close()


async def _replica_synced(raw: Redis) -> bool:
    return (await raw.info("replication")).get("master_link_status") == "up"


async def test_stream_events_sent_to_a_replica_wait_for_its_promotion(
        redis_server: RedisServer, events_redis: RedisServer, no_task_leaks: None,
        caplog: pytest.LogCaptureFixture) -> None:
    """After a failover a publisher may still be connected to the old primary, now a
    replica, which refuses the script call (READONLY) before running it: the events wait,
    as in an outage, and arrive once the server takes writes again. None is counted lost."""
    transport = RedisStreamTransport(events_redis.url, linger_ms=0)
    await transport.publish(step(0))
    assert await transport.flush()  # the sender has asked whether the server runs scripts
    async with Redis.from_url(events_redis.url) as raw:
        await raw.replicaof("127.0.0.1", redis_server.port)
        await async_wait_until(lambda: _replica_synced(raw), message="the replica to sync")
        for n in range(1, 41):
            await transport.publish(step(n))
        await async_wait_until(lambda: outage_logs(caplog, "publisher") == 1,
                               message="the replica to refuse the events")
        await raw.replicaof("NO", "ONE")
    await async_wait_until(lambda: transport.flush(timeout=1), message="the buffer to drain")
    replayed = [index(e) async for e in transport.replay(FROM_BEGINNING)]
    await transport.close()
    assert replayed == list(range(1, 41))  # event 0 went with the replica's own data
    assert transport.dropped == {}
    assert "ReadOnlyError" in caplog.text


async def _busy_script(url: str) -> None:
    """A script that runs until ``SCRIPT KILL``: meanwhile Redis answers BUSY to others."""
    async with Redis.from_url(url) as client:
        with contextlib.suppress(ResponseError):  # "Script killed by user"
            await client.eval("while true do end", 0)


async def _answers_busy(raw: Redis) -> bool:
    try:
        await raw.ping()
    except ResponseError as exc:
        return str(exc).startswith("BUSY")
    return False


async def test_stream_events_wait_out_a_busy_script(redis_server: RedisServer,
                                                   no_task_leaks: None,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A script running past ``busy-reply-threshold`` makes Redis answer BUSY to every
    command: to a batch of events alone, to a batch with an item count (each one script
    call), and to a new sender's question whether the server runs scripts. Each
    sender keeps its events and delivers them, still by script, once the busy script is
    gone."""
    alone = RedisStreamTransport(redis_server.url, stream="alone", linger_ms=0)
    mixed = RedisStreamTransport(redis_server.url, stream="mixed", linger_ms=0)
    for transport in (alone, mixed):
        await transport.publish(step(0))
        assert await transport.flush()  # each has asked whether the server runs scripts
    async with Redis.from_url(redis_server.url) as raw:
        await raw.config_set("busy-reply-threshold", 50)
        busy = asyncio.create_task(_busy_script(redis_server.url))
        await async_wait_until(lambda: _answers_busy(raw), message="Redis to answer BUSY")
        new = RedisStreamTransport(redis_server.url, stream="new", linger_ms=0)
        senders = {"alone": (alone, 0), "mixed": (mixed, 0), "new": (new, 1)}
        for n in range(1, 31):  # queued before any sender runs: one batch each
            for transport, _ in senders.values():
                transport.publish_nowait(step(n))
        mixed.count_item("run:1", failed=False)
        for stream in senders:
            await async_wait_until(lambda s=stream: outage_logs(caplog, f"({s})") == 1,
                                   message=f"BUSY for the {stream} sender")
        await raw.script_kill()
        await busy
        for transport, first in senders.values():
            await async_wait_until(lambda t=transport: t.flush(timeout=1),
                                   message="the buffer to drain")
            replayed = [index(e) async for e in transport.replay(FROM_BEGINNING)]
            assert replayed == list(range(first, 31))
            assert transport.dropped == {}
            await transport.close()
        assert await raw.hget("flowtrace:items:run:1", "done") == b"1"
    assert "runs no scripts" not in caplog.text


async def test_stream_scripting_denied_mid_session_still_delivers(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """An ACL that takes scripting away after the sender asked: the refused script call
    (events alone, or with an item count) makes the sender ask again, and the same batch
    goes one command per event (in a transaction). Nothing is lost or counted twice."""
    async with Redis.from_url(redis_server.url) as raw:
        url = await _user_url(raw, redis_server, "publisher", "+@all")
        alone = RedisStreamTransport(url, stream="alone", linger_ms=600_000)
        mixed = RedisStreamTransport(url, stream="mixed", linger_ms=600_000)
        for transport in (alone, mixed):
            await transport.publish(step(0))
            assert await transport.flush(timeout=10)
        await raw.acl_setuser("publisher", enabled=True, nopass=True, commands=["-@scripting"])
        for n in range(1, 41):
            await alone.publish(step(n))
            await mixed.publish(step(n))
            if n % 20 == 0:
                mixed.count_item("run:1", failed=False)
        assert await alone.flush(timeout=10)
        assert await mixed.flush(timeout=10)  # was False: a refused transaction, retried forever
        assert await raw.hget("flowtrace:items:run:1", "done") == b"2"
    for transport in (alone, mixed):
        assert [index(e) async for e in transport.replay(FROM_BEGINNING)] == list(range(41))
        assert transport.dropped == {}
        await transport.close()
    assert caplog.text.count("runs no scripts") == 2


async def test_stream_command_redis_refuses_in_a_batch_is_counted_alone(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """A command Redis refuses for good inside the batch's script call (an ACL denying the
    item counter): its count is dropped, the batch's events are not."""
    async with Redis.from_url(redis_server.url) as raw:
        url = await _user_url(raw, redis_server, "publisher", "+@all", "-hincrby")
    transport = RedisStreamTransport(url, linger_ms=600_000)
    for n in range(10):
        await transport.publish(step(n))
    transport.count_item("run:1", failed=False)
    await transport.publish(step(10))
    assert await transport.flush(timeout=10)
    assert [index(e) async for e in transport.replay(FROM_BEGINNING)] == list(range(11))
    assert transport.dropped == {"redis_error": 1}
    assert "can't run this command" in caplog.text
    await transport.close()


async def test_stream_batch_redis_refuses_whole_is_counted_and_later_ones_go(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """A transaction Redis refuses for good before it runs (without scripting, an ACL
    denying the item counter): its events and its count are counted as dropped, once each,
    and the batches after it are sent, not stuck behind it."""
    async with Redis.from_url(redis_server.url) as raw:
        url = await _user_url(raw, redis_server, "publisher", "+@all", "-@scripting",
                              "-hincrby")
    transport = RedisStreamTransport(url, linger_ms=600_000)
    for n in range(10):
        await transport.publish(step(n))
    transport.count_item("run:1", failed=False)
    assert await transport.flush(timeout=10)
    for n in range(10, 15):
        await transport.publish(step(n))
    assert await transport.flush(timeout=10)
    assert [index(e) async for e in transport.replay(FROM_BEGINNING)] == list(range(10, 15))
    assert transport.dropped == {"redis_error": 11}
    assert "NoPermissionError" in caplog.text
    await transport.close()


def test_stream_rejects_a_negative_linger() -> None:
    with pytest.raises(ValueError, match="linger"):
        RedisStreamTransport("redis://127.0.0.1:1/0", linger_ms=-1)


async def test_stream_close_is_clean_and_ends_subscribers(redis_server: RedisServer,
                                                          no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url, block_ms=200)
    collector = Collector(transport.subscribe())
    await collector.wait_live(transport)
    await transport.publish(step(1))
    await transport.close()  # ships what is buffered first

    await asyncio.wait_for(collector.task, timeout=10)  # the iterator ends by itself
    reader = RedisStreamTransport(redis_server.url)
    history = [e async for e in reader.replay(FROM_BEGINNING) if e.pipeline_id != PROBE]
    await reader.close()
    assert [index(e) for e in history] == [1]
    await transport.publish(step(2))
    assert transport.dropped == {"closed": 1}


async def test_stream_close_while_redis_down_is_bounded(redis_server: RedisServer,
                                                        no_task_leaks: None) -> None:
    transport = RedisStreamTransport(redis_server.url)
    redis_server.stop()
    await transport.publish(step(1))
    await asyncio.wait_for(transport.close(), timeout=10)
    assert transport.dropped == {"closed": 1}


# -- RedisPubSubTransport -------------------------------------------------------------------


async def test_pubsub_round_trip_with_local_ids(redis_server: RedisServer,
                                                no_task_leaks: None) -> None:
    async with Redis.from_url(redis_server.url) as client:
        transport = RedisPubSubTransport(client)
        collector = Collector(transport.subscribe(since="ignored"))
        await collector.wait_live(transport)
        for n in range(50):
            await transport.publish(step(n))
        assert await transport.flush()

        assert await collector.wait_for(50) == list(range(50))
        ids = [id_sort_key(e.id or "") for e in collector.received]
        assert ids == sorted(ids) and len(set(ids)) == 50
        assert transport.history_is_truncated("5")
        assert [e async for e in transport.replay(FROM_BEGINNING)] == []
        await collector.stop()
        await transport.close()


@pytest.mark.parametrize("given", ["sync-client", "url"])
async def test_pubsub_takes_the_references_sync_client_or_a_url(
        redis_server: RedisServer, given: str, no_task_leaks: None) -> None:
    """The reference design passes ``redis.Redis(host=..., port=...)``: awaiting its calls
    failed on every publish, and every event was lost behind an "outage" log line."""
    host, port = redis_server.url.removeprefix("redis://").split(":")
    sync_client = redis.Redis(host=host, port=int(port.split("/")[0]))
    transport = RedisPubSubTransport(sync_client if given == "sync-client" else redis_server.url)
    collector = Collector(transport.subscribe())
    await collector.wait_live(transport)
    for n in range(3):
        await transport.publish(step(n))
    assert await transport.flush()
    assert await collector.wait_for(3) == [0, 1, 2]
    await collector.stop()
    await transport.close()
    sync_client.close()


def test_pubsub_refuses_what_is_no_redis_client() -> None:
    with pytest.raises(TypeError, match=r"redis\.asyncio\.Redis"):
        RedisPubSubTransport(42)  # type: ignore[arg-type]


async def test_pubsub_subscriber_survives_redis_restart(redis_server: RedisServer,
                                                        no_task_leaks: None) -> None:
    async with Redis.from_url(redis_server.url) as client:
        transport = RedisPubSubTransport(client)
        collector = Collector(transport.subscribe())
        await collector.wait_live(transport)
        redis_server.stop()
        redis_server.start()
        await collector.wait_live(transport)  # resubscribed (what came before is lost)
        await transport.publish(step(1))
        assert await collector.wait_for(1) == [1]
        await collector.stop()
        await transport.close()


async def test_pubsub_item_counts(redis_server: RedisServer, no_task_leaks: None) -> None:
    async with Redis.from_url(redis_server.url) as client:
        transport = RedisPubSubTransport(client)
        transport.count_item("k", failed=True)
        transport.count_item("k", failed=False)
        assert await transport.read_counts("k") == (1, 1)
        await transport.close()


def _run_one_task(broker: InMemoryBroker, middleware: FlowtraceMiddleware,
                  in_memory_subscriber: bool = False) -> tuple[str, list[Event]]:
    """One broker session in a fresh event loop, as each test of an app's lifespan runs:
    start, run a task to its end, shut down. Returns its run id and what a subscriber to
    the (in-memory) transport saw meanwhile."""
    async def session() -> tuple[str, list[Event]]:
        seen: list[Event] = []
        await broker.startup()
        reader = None
        if in_memory_subscriber:
            async def read() -> None:
                async for event in middleware.transport.subscribe():
                    seen.append(event)
            reader = asyncio.create_task(read())
            await asyncio.sleep(0)
        try:
            kicked = await broker.find_task("restart.one").kiq()
            assert (await kicked.wait_result(timeout=10)).return_value == 1
            if reader is not None:
                await async_wait_until(
                    lambda: any(e.type == "PipelineCompleteEvent" for e in seen), timeout=10,
                    message="the run's end on the in-memory transport")
        finally:
            await broker.shutdown()
        return kicked.task_id, seen
    return asyncio.run(session())


def _restartable_broker(**options: Any) -> tuple[InMemoryBroker, FlowtraceMiddleware]:
    broker = InMemoryBroker()
    middleware = flowtrace.instrument(broker, **options)

    @broker.task(task_name="restart.one")
    async def one() -> int:
        return 1

    return broker, middleware


def test_a_broker_started_again_in_new_event_loops_keeps_publishing(
        redis_server: RedisServer) -> None:
    """Shut down, started again, each time in a new loop: no event is dropped as closed."""
    broker, middleware = _restartable_broker(redis_url=redis_server.url)
    runs = [_run_one_task(broker, middleware)[0] for _ in range(3)]

    async def ended() -> set[str]:
        reader = RedisStreamTransport(redis_server.url)
        try:
            return {e.pipeline_id async for e in reader.replay(FROM_BEGINNING)
                    if e.type == "PipelineCompleteEvent"}
        finally:
            await reader.close()
    assert asyncio.run(ended()) == set(runs)
    assert middleware.transport.dropped == {}


def test_the_in_memory_transport_serves_subscribers_after_a_restart() -> None:
    broker, middleware = _restartable_broker()
    for _ in range(2):
        pipeline_id, seen = _run_one_task(broker, middleware, in_memory_subscriber=True)
        assert [e.type for e in seen if e.pipeline_id == pipeline_id] == [
            "PipelineStartEvent", "StepStartEvent", "StepCompleteEvent",
            "PipelineCompleteEvent"]
