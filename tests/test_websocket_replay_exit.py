"""A client that resumes a run (``since``) and leaves while the gateway still reads the
history: its connection ends at once and frees its slot, instead of lasting as long as the
replay (a long stream, with no event of that run to send, gave nothing to notice the leave).
A frame a client sends meanwhile is answered once the replay is done, and live events that
arrive just as the replay ends are all delivered.

The transport here is the in-memory one with one change: reading one run's history takes
until the test says so (what reading a stream of millions of entries takes, made exact).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator

import httpx
from websockets.asyncio.client import connect

from flowtrace.app import create_app
from flowtrace.events import Event, StepProgressEvent
from flowtrace.transport.memory import InMemoryTransport
from tests.support.app_thread import AppServer
from tests.support.waiting import async_wait_until


class EndlessRunHistory(InMemoryTransport):
    """Replays of one run last until ``released`` (or cancelled), and yield nothing; the
    gateway's own replays are as usual."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()
        self.replays_started = 0
        self.replays_cancelled = 0

    def replay(self, since: str, pipeline_id: str | None = None) -> AsyncIterator[Event]:
        if pipeline_id is None:
            return super().replay(since)
        return self._endless()

    async def _endless(self) -> AsyncIterator[Event]:
        self.replays_started += 1
        try:
            while not self.released.is_set():
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.replays_cancelled += 1
            raise
        for event in ():  # an async generator with nothing to yield
            yield event


async def connections(http: httpx.AsyncClient, server: AppServer) -> int:
    stats = (await http.get(f"{server.url}/ws/metrics")).json()
    return int(stats["connections"])


async def replay_started(transport: EndlessRunHistory) -> bool:
    return transport.replays_started == 1


async def test_a_client_leaving_during_a_replay_frees_its_slot_at_once() -> None:
    transport = EndlessRunHistory()
    server = AppServer(create_app(transport, max_connections=1)).start()
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as http:
            async with connect(f"{server.ws_url}/ws/run-1?since=0-0") as ws:
                assert json.loads(await ws.recv())["type"] == "subscribed"
                await async_wait_until(lambda: replay_started(transport),
                                       message="the replay under way")

            # Left mid-replay: the replay is given up and the slot is free again.
            async def gone() -> bool:
                return await connections(http, server) == 0

            await async_wait_until(gone, message="the connection gone")
            assert transport.replays_cancelled == 1
            async with connect(f"{server.ws_url}/ws/*") as ws:
                assert json.loads(await ws.recv())["type"] == "subscribed"
    finally:
        transport.released.set()
        server.stop()


async def test_a_frame_sent_during_a_replay_is_answered_after_it() -> None:
    transport = EndlessRunHistory()
    server = AppServer(create_app(transport)).start()
    try:
        async with connect(f"{server.ws_url}/ws/*") as ws:
            assert json.loads(await ws.recv())["type"] == "subscribed"
            await ws.send(json.dumps({"type": "subscribe", "pipeline_id": "run-2",
                                      "since": "0-0"}))
            assert json.loads(await ws.recv())["pipeline_id"] == "run-2"
            await async_wait_until(lambda: replay_started(transport),
                                   message="the replay under way")
            await ws.send(json.dumps({"type": "ping"}))  # read ahead, kept for the reader
            transport.released.set()
            assert json.loads(await ws.recv()) == {"type": "pong"}
            assert transport.replays_cancelled == 0  # a frame is not a leave
    finally:
        transport.released.set()
        server.stop()


class BurstAsReplayEnds(InMemoryTransport):
    """A run's replay ends just as a burst of its live events is published: more than a
    resuming client may hold, so the burst arrives while the replay hands over to live."""

    BURST = 30

    def replay(self, since: str, pipeline_id: str | None = None) -> AsyncIterator[Event]:
        replayed = super().replay(since, pipeline_id)
        return replayed if pipeline_id is None else self._then_burst(replayed, pipeline_id)

    async def _then_burst(self, replayed: AsyncIterator[Event],
                          pipeline_id: str) -> AsyncIterator[Event]:
        async for event in replayed:
            yield event
        for n in range(self.BURST):
            self.publish_nowait(progress(pipeline_id, 100 + n))


def progress(pipeline_id: str, done: int) -> StepProgressEvent:
    return StepProgressEvent(pipeline_id=pipeline_id, step_name="m", done=done)


async def test_live_events_arriving_as_a_replay_ends_are_all_delivered() -> None:
    transport = BurstAsReplayEnds()
    # A send queue of 40: a resuming client holds 20 live events at most, then re-reads.
    server = AppServer(create_app(transport, send_queue_size=40)).start()
    try:
        for done in range(5):
            server.call(transport.publish, progress("run-3", done))
        async with connect(f"{server.ws_url}/ws/run-3?since=0-0") as ws:
            dones: list[int] = []
            while len(dones) < 5 + BurstAsReplayEnds.BURST:
                frame = json.loads(await asyncio.wait_for(ws.recv(), timeout=20))
                if frame["type"] == "StepProgressEvent":
                    dones.append(frame["done"])
            assert dones == [*range(5), *range(100, 100 + BurstAsReplayEnds.BURST)]
    finally:
        server.stop()
