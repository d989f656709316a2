"""Resume (``since``) while live events keep arriving (SPEC §6): a client that reads is
never a slow consumer, gets every event once and in order, then goes live; one that stops
reading is still closed 4008. Real uvicorn, real clients over TCP; the last test uses a
``flowtrace serve`` subprocess that is still catching up on a burst from a private Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from flowtrace.events import StepProgressEvent
from flowtrace.transport.base import FROM_BEGINNING, id_sort_key
from flowtrace.transport.redis_stream import RedisStreamTransport
from tests.support.gateway_proc import serve_gateways, stream_events
from tests.support.processes import RedisServer
from tests.support.waiting import async_wait_until
from tests.support.ws_server import LiveServer, connect, small_buffer_socket

SEND_QUEUE = 40  # small: a replay holds 20 live events at most, then must re-read
BACKLOG = 5_000
RUN = "resumed"


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    options: dict[str, Any] = getattr(request, "param", {})
    with LiveServer(maxlen=100_000, send_queue_size=SEND_QUEUE, **options) as live:
        yield live


def progress(done: int, pipeline_id: str = RUN) -> StepProgressEvent:
    return StepProgressEvent(pipeline_id=pipeline_id, pipeline_name="load",
                             pipeline_type="sequential", step_name="m", done=done)


class LivePublisher:
    """Publishes ``done`` = BACKLOG, BACKLOG + 1, ... on the server's loop until finished."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.published = 0
        self.running = True
        self.task = asyncio.ensure_future(server.acall(self._run, timeout=120))

    async def _run(self) -> int:
        transport = self.server.transport
        assert transport is not None
        while self.running:
            await transport.publish(progress(BACKLOG + self.published))
            self.published += 1
            # A steady live feed (~1 000/s), far above what a replay may hold meanwhile.
            await asyncio.sleep(0.001)
        return BACKLOG + self.published - 1

    async def finish(self) -> int:
        """Stop publishing; the ``done`` of the last live event."""
        self.running = False
        return await self.task


class Reader:
    """Reads a client's events in the background (``StepProgressEvent``s in ``events``)."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for text in self.ws:
                frame = json.loads(text)
                self.frames.append(frame)
                if frame["type"] == "StepProgressEvent":
                    self.events.append(frame)

    async def wait_for(self, done: int, timeout: float = 60) -> None:
        def reached() -> bool:
            assert not self.task.done(), f"closed {self.ws.close_code} {self.ws.close_reason}"
            return bool(self.events) and self.events[-1]["done"] >= done

        await async_wait_until(reached, timeout=timeout, interval=0.01,
                               message=f"done={done} (last: {self.last()})")

    def last(self) -> int | None:
        return self.events[-1]["done"] if self.events else None

    def check_complete(self, first: int, final: int) -> None:
        """Every ``done`` from ``first`` to ``final`` once, in order, ids increasing."""
        assert not [f for f in self.frames if f["type"] == "error"], self.frames[:3]
        dones = [event["done"] for event in self.events]
        assert dones == list(range(first, final + 1)), "gap or duplicate"
        ids = [id_sort_key(event["id"]) for event in self.events]
        assert ids == sorted(set(ids))

    async def close(self) -> None:
        await self.ws.close()
        await self.task


async def test_resume_under_live_load_is_complete_and_never_slow(server: LiveServer) -> None:
    await server.publish(*(progress(done) for done in range(BACKLOG)))
    live = LivePublisher(server)
    await async_wait_until(lambda: live.published >= 50, message="the live feed to flow")

    ws = await connect(server, f"/ws/{RUN}?since={FROM_BEGINNING}", max_queue=None)
    reader = Reader(ws)
    # Past the replay and well into the live feed, then the feed stops and the rest arrives.
    await reader.wait_for(BACKLOG + live.published + 200)
    final = await live.finish()
    await reader.wait_for(final)
    reader.check_complete(0, final)
    stats = await server.stats()
    assert stats["slow_consumer_disconnects"] == 0
    assert stats["messages_dropped"] == 0
    assert stats["resume_rereads"] >= 1, "the replay never had to catch up: test too easy"
    # Live now: the next event comes straight through.
    await server.publish(progress(final + 1))
    await reader.wait_for(final + 1)
    reader.check_complete(0, final + 1)
    await reader.close()


@pytest.mark.parametrize("server", [{"resume_stall_timeout": 0.5}], indirect=True)
async def test_resuming_client_that_stops_reading_is_closed_4008(server: LiveServer) -> None:
    # 5 000 events of 4 kB: more than socket buffers hold, so the replay itself stalls.
    padding = "x" * 4000
    await server.publish(*(progress(done).model_copy(update={"step_name": padding})
                           for done in range(BACKLOG)))
    healthy = Reader(await connect(server, f"/ws/{RUN}", max_queue=None))
    await async_wait_until(lambda: healthy.frames, message="subscribed")
    # max_queue=1: the client's library stops reading its socket as soon as one frame waits.
    stalled = await connect(server, f"/ws/{RUN}?since={FROM_BEGINNING}",
                            sock=small_buffer_socket(server.port), max_queue=1)
    live = LivePublisher(server)
    try:
        async def closed() -> bool:
            return bool((await server.stats())["slow_consumer_disconnects"])

        await async_wait_until(closed, timeout=60, interval=0.05,
                               message="the stalled resuming client to be closed")
    finally:
        final = await live.finish()
    await healthy.wait_for(final)
    healthy.check_complete(BACKLOG, final)

    received = 0
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            frame = json.loads(await asyncio.wait_for(stalled.recv(), 30))
            received += frame["type"] == "StepProgressEvent"
    assert (stalled.close_code, stalled.close_reason) == (4008, "slow consumer")
    assert received < BACKLOG, "closed after its replay: not the resume's stall detection"
    stats = await server.stats()
    assert stats["slow_consumer_disconnects"] == 1
    assert stats["resume_rereads"] >= 1
    assert stats["messages_dropped_by_reason"].keys() == {"slow_consumer"}
    await healthy.close()


BURST = 30_000


@pytest.mark.fleet
async def test_resume_while_the_gateway_catches_up_on_a_burst(events_redis: RedisServer) -> None:
    """The audit's second case: ``since`` right after a burst that the gateway is still
    consuming (it broadcasts hundreds of events per read) was closed 4008 after 3 messages."""
    publisher = RedisStreamTransport(events_redis.url)
    try:
        await publisher.publish(progress(-1, "burst"))
        assert await publisher.flush(timeout=10)
        (marker,) = await stream_events(events_redis.url)
        with serve_gateways(events_redis.url, 1) as (gateway,):
            for done in range(BURST):
                publisher.publish_nowait(progress(done, "burst"))
                if done % 2000 == 1999:  # within the publish buffer
                    assert await publisher.flush(timeout=30)
            assert await publisher.flush(timeout=30)
            url = gateway.ws_url(f"/ws/burst?since={marker.id}")
            async with websockets.connect(url, max_queue=None, max_size=None, proxy=None,
                                          compression=None, open_timeout=15) as ws:
                reader = Reader(ws)
                await reader.wait_for(BURST - 1, timeout=120)
                # Live afterwards: one more event comes straight through.
                await publisher.publish(progress(BURST, "burst"))
                assert await publisher.flush(timeout=10)
                await reader.wait_for(BURST)
                reader.check_complete(0, BURST)
                await reader.close()
            stats = (await gateway.get("/ws/metrics")).json()
    finally:
        await publisher.close()
    assert stats["slow_consumer_disconnects"] == 0
    assert stats["messages_dropped"] == 0
