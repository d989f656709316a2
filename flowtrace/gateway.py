"""The gateway's engine: transport → run store, hooks and WebSocket clients.

On :meth:`Gateway.start` the run store is rebuilt from the transport's retained
history (so a gateway started late, or restarted, shows the runs that happened
without it); then a background task consumes the transport live from where the
history ended — no gap, no duplicate — and a second one declares silent runs LOST.

Replayed history feeds the store only: hooks and WebSocket clients see live events
(clients that want history ask for it with ``since``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any, Protocol

from flowtrace.events import BaseEvent, utc_now
from flowtrace.hooks import HookManager
from flowtrace.runs import RunStore
from flowtrace.transport.base import FROM_BEGINNING, Transport

logger = logging.getLogger("flowtrace.gateway")

MIN_BACKOFF = 0.05
MAX_BACKOFF = 5.0
MAX_SWEEP_INTERVAL = 5.0


class Broadcaster(Protocol):
    """What the gateway needs from a WebSocket manager."""

    async def broadcast(self, event: Any) -> Any: ...


class Gateway:
    """Consumes one transport for a run store, optional hooks and a WebSocket manager.

    ``stale_after`` (default: the store's) is how long a RUNNING run may stay silent
    before it is declared LOST; the sweep runs every ``sweep_interval`` seconds
    (default ``min(stale_after / 4, 5)``).
    """

    def __init__(self, transport: Transport, *, store: RunStore,
                 manager: Broadcaster | None = None, hooks: HookManager | None = None,
                 stale_after: float | None = None, sweep_interval: float | None = None) -> None:
        self.transport = transport
        self.store = store
        self.manager = manager
        self.hooks = hooks
        if stale_after is not None:
            store.stale_after = stale_after
        if store.stale_after <= 0:
            raise ValueError("stale_after must be > 0")
        self.sweep_interval = sweep_interval or min(store.stale_after / 4, MAX_SWEEP_INTERVAL)
        self.last_id: str | None = None
        self.events_consumed = 0
        self._rebuilt = False
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> bool:
        return any(not task.done() for task in self._tasks)

    async def start(self) -> None:
        """Rebuild the store from history, then consume and sweep in the background.

        A transport that cannot replay now (Redis down) does not fail the start: the
        consumer retries the rebuild before it goes live.
        """
        if self._tasks:
            return
        try:
            await self._rebuild()
        except Exception:
            logger.exception("flowtrace gateway: could not rebuild runs from history; retrying")
        self._tasks = [
            asyncio.create_task(self._consume_forever(), name="flowtrace-gateway-consume"),
            asyncio.create_task(self._sweep_forever(), name="flowtrace-gateway-sweep"),
        ]

    async def stop(self) -> None:
        """Cancel the background tasks and wait for them to finish."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _rebuild(self) -> None:
        replayed = 0
        async with _closing(self.transport.replay(self.last_id or FROM_BEGINNING)) as history:
            async for event in history:
                self.store.apply(event, now=_received_at(event))
                if event.id:
                    self.last_id = event.id
                replayed += 1
        self._rebuilt = True
        logger.info("flowtrace gateway: rebuilt %d run(s) from %d retained event(s)",
                    len(self.store), replayed)

    async def _consume_forever(self) -> None:
        backoff = MIN_BACKOFF
        while True:
            try:
                if not self._rebuilt:
                    await self._rebuild()
                # FROM_BEGINNING when nothing was retained: whatever was published
                # between the replay and this subscription is still delivered.
                since = self.last_id or FROM_BEGINNING
                if self.last_id and await self.transport.is_history_truncated(self.last_id):
                    logger.warning("flowtrace gateway: events after %s were trimmed from the "
                                   "transport while it was unreachable", self.last_id)
                async with _closing(self.transport.subscribe(since=since)) as events:
                    async for event in events:
                        await self._handle(event)
                        backoff = MIN_BACKOFF
                logger.warning("flowtrace gateway: transport subscription ended; resubscribing")
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("flowtrace gateway: consuming the transport failed; "
                                 "resuming after %s in %.2f s", self.last_id, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _handle(self, event: BaseEvent) -> None:
        """One live event to every consumer; none of them can break the loop."""
        if event.id:
            self.last_id = event.id
        self.events_consumed += 1
        try:
            self.store.apply(event)
        except Exception:
            logger.exception("flowtrace gateway: run store could not apply %s", event.id)
        if self.hooks is not None:
            try:
                await self.hooks.dispatch(event)
            except Exception:
                logger.exception("flowtrace gateway: hook dispatch failed for %s", event.id)
        if self.manager is not None:
            try:
                await self.manager.broadcast(event)
            except Exception:
                logger.exception("flowtrace gateway: broadcast failed for %s", event.id)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval)
            await self.sweep_once()

    async def sweep_once(self, now: datetime | None = None) -> int:
        """Publish a LOST event for every silent run; returns how many were declared."""
        try:
            lost = self.store.sweep_lost(now)
        except Exception:
            logger.exception("flowtrace gateway: LOST sweep failed")
            return 0
        for event in lost:
            logger.warning("flowtrace gateway: run %s (%s) declared LOST: %s",
                           event.pipeline_id, event.pipeline_name, event.error)
            await self.transport.publish(event)
        return len(lost)


def _received_at(event: BaseEvent) -> datetime:
    """For replayed history, silence counts from the event's own time (not the replay's)."""
    return min(event.timestamp, utc_now())


@contextlib.asynccontextmanager
async def _closing(iterator: AsyncIterator[Any]) -> AsyncIterator[AsyncIterator[Any]]:
    """Close an async generator even when its consumer is cancelled mid-iteration."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


__all__ = ["Broadcaster", "Gateway"]
