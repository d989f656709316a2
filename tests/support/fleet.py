"""The client side of fleet tests: a broker on the worker app, and an event subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from flowtrace.events import TERMINAL_TYPES, BaseEvent
from flowtrace.transport.redis_stream import RedisStreamTransport
from tests.support.waiting import async_wait_until


class StreamCollector:
    """Subscribes to the events stream like a gateway would, in the test process."""

    def __init__(self, url: str) -> None:
        self.transport = RedisStreamTransport(url)
        self.events: list[BaseEvent] = []
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async def consume() -> None:
            async for event in self.transport.subscribe():
                self.events.append(event)

        self._task = asyncio.create_task(consume())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.transport.close()

    def of(self, pipeline_id: str) -> list[BaseEvent]:
        return [e for e in self.events if e.pipeline_id == pipeline_id]

    async def wait_terminal(self, pipeline_id: str, timeout: float = 60) -> list[BaseEvent]:
        await async_wait_until(
            lambda: any(e.type in TERMINAL_TYPES for e in self.of(pipeline_id)),  # type: ignore[attr-defined]
            timeout=timeout, message=f"terminal event of {pipeline_id}")
        return self.of(pipeline_id)


@asynccontextmanager
async def fleet_client(broker_url: str, events_url: str) -> AsyncIterator[object]:
    """Import the worker app in this process as a client (it kicks, the workers run)."""
    saved = {k: os.environ.get(k) for k in ("TEST_REDIS_URL", "FLOWTRACE_REDIS_URL")}
    os.environ["TEST_REDIS_URL"] = broker_url
    os.environ["FLOWTRACE_REDIS_URL"] = events_url
    import importlib

    import tests.fleet_app.spine_worker as app

    try:
        app = importlib.reload(app)
        await app.broker.startup()
        try:
            yield app
        finally:
            await app.broker.shutdown()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
