"""The gateway's engine: transport → run store, hooks and WebSocket clients.

On :meth:`Gateway.start` the run store is rebuilt from the transport's retained
history (so a gateway started late, or restarted, shows the runs that happened
without it); then a background task consumes the transport live from where the
history ended — no gap, no duplicate — and a second one declares silent runs LOST.

Replayed history feeds the store only: hooks and WebSocket clients see live events
(clients that want history ask for it with ``since``).

Silence proves a worker dead only while the gateway can hear it. The transport has no
health signal for its subscription (which retries by itself), so the sweep first checks
that the transport answers: while it does not, no run is declared LOST, and once it does
again every run gets a fresh ``stale_after``, counted from when workers and the subscription
have had time to reconnect and deliver what they buffered meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any, Protocol

from flowtrace.events import BaseEvent, PipelineErrorEvent, utc_now
from flowtrace.hooks import HookManager
from flowtrace.runs import RunStore
from flowtrace.transport.base import BACKOFF_MAX_S, FROM_BEGINNING, Transport, describe

logger = logging.getLogger("flowtrace.gateway")

MIN_BACKOFF = 0.05
MAX_BACKOFF = 5.0
MAX_SWEEP_INTERVAL = 5.0
MIN_SWEEP_INTERVAL = 0.25
"""Each sweep reads Redis once: a tiny ``stale_after`` must not make it a busy loop."""
RECONNECT_GRACE = BACKOFF_MAX_S + 1.0
"""Seconds after the transport answers again before silence counts: publishers and the
subscription retry at most every ``BACKOFF_MAX_S``, and a subscriber's read blocks ~1 s."""
LOST_CLAIM_TTL_S = 7 * 24 * 3600.0
"""How long the claim to declare a run LOST is kept where gateways share it (Redis)."""


class Broadcaster(Protocol):
    """What the gateway needs from a WebSocket manager."""

    async def broadcast(self, event: Any) -> Any: ...


class Gateway:
    """Consumes one transport for a run store, optional hooks and a WebSocket manager.

    ``stale_after`` (default: the store's) is how long a RUNNING run may stay silent
    before it is declared LOST; the sweep runs every ``sweep_interval`` seconds
    (default ``stale_after / 4`` within 0.25–5 s) while the transport answers
    (``transport_reachable``, as the sweep last found it).
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
        self.sweep_interval = sweep_interval or min(
            max(store.stale_after / 4, MIN_SWEEP_INTERVAL), MAX_SWEEP_INTERVAL)
        self.last_id: str | None = None
        self.events_consumed = 0
        self.unreachable_since: datetime | None = None
        """Since when the transport has not answered (None: it does), as last found."""
        self.read_failures = 0
        """Reads of the transport that failed (a rebuild or subscription that raised)."""
        self._rebuilt = False
        self._read_error: type[Exception] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        if store.metrics is not None:  # read at each scrape: nothing to keep in step
            store.metrics.transport_up.set_function(
                lambda: 1.0 if self.transport_reachable else 0.0)

    @property
    def running(self) -> bool:
        return any(not task.done() for task in self._tasks)

    @property
    def transport_reachable(self) -> bool:
        return self.unreachable_since is None

    def health(self) -> dict[str, Any]:
        """``/readyz``: whether the gateway hears its transport (a wrong password or a Redis
        that never came up leaves it alive, ``/healthz``, but deaf)."""
        since = self.unreachable_since
        return {"transport": "reachable" if since is None else "unreachable",
                "unreachable_since": since.isoformat() if since else None,
                "read_failures": self.read_failures}

    def _unreachable(self, error: str) -> None:
        if self.unreachable_since is None:
            self.unreachable_since = utc_now()
            logger.info("flowtrace gateway: LOST sweep paused: the transport is unreachable "
                        "(%s)", error)

    async def start(self) -> None:
        """Rebuild the store from history, then consume and sweep in the background.

        A transport that cannot replay now (Redis down) does not fail the start: the
        consumer retries the rebuild before it goes live.
        """
        if self._tasks:
            return
        try:
            await self._rebuild()
        except Exception as exc:  # noqa: BLE001 - logged; the consumer retries
            self._read_failed(exc)
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
        """Run states from the retained history; counters count live events only (see
        :attr:`~flowtrace.metrics.GatewayMetrics.counting`)."""
        replayed = 0
        with self.store.replaying():
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
                    self._read_again()
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
                        self._read_again()
                logger.warning("flowtrace gateway: transport subscription ended; resubscribing")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - logged; retried after a backoff
                self._read_failed(exc)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _read_failed(self, exc: Exception) -> None:
        """One line per outage (Redis not up yet, a wrong password...), and one more if the
        error changes kind (Redis came up, but refuses the password); details at DEBUG."""
        if self._read_error is not type(exc):
            logger.warning("flowtrace gateway: cannot read the transport (%s); retrying "
                           "every %.0f s at most", describe(exc), MAX_BACKOFF)
        self._read_error = type(exc)
        self.read_failures += 1
        self._unreachable(describe(exc))
        logger.debug("flowtrace gateway: reading the transport after %s failed", self.last_id,
                     exc_info=exc)

    def _read_again(self) -> None:
        """Called after each successful read: one line when an outage ends."""
        if self._read_error is not None:
            self._read_error = None
            logger.warning("flowtrace gateway: reading the transport again")

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
            if await self._can_hear_workers():
                await self.sweep_once()

    async def _can_hear_workers(self) -> bool:
        """Whether the transport answers; after it did not, silence counts afresh."""
        error = await self._probe()
        if error is not None:
            self._unreachable(error)
            return False
        if self.unreachable_since is not None:
            self.unreachable_since = None
            self.store.restart_silence(utc_now() + timedelta(seconds=RECONNECT_GRACE))
            logger.info("flowtrace gateway: LOST sweep resumed: every running run is given "
                        "%.0f s more", self.store.stale_after + RECONNECT_GRACE)
        return True

    async def _probe(self) -> str | None:
        """None when the transport can be read now, else the error.

        A replay raises while the transport is unreachable; its first event is enough.
        """
        try:
            async with _closing(self.transport.replay(self.last_id or FROM_BEGINNING)) as events:
                async for _ in events:
                    break
        except Exception as exc:  # noqa: BLE001 - any failure is "unreachable"
            return describe(exc)
        return None

    async def sweep_once(self, now: datetime | None = None) -> int:
        """Publish a LOST event for every silent run; returns how many were declared."""
        try:
            lost = self.store.sweep_lost(now)
        except Exception:
            logger.exception("flowtrace gateway: LOST sweep failed")
            return 0
        declared = 0
        for event in lost:
            if await self._claim_lost(event):
                logger.warning("flowtrace gateway: run %s (%s) declared LOST: %s",
                               event.pipeline_id, event.pipeline_name, event.error)
                await self.transport.publish(event)
                declared += 1
        return declared

    async def _claim_lost(self, event: PipelineErrorEvent) -> bool:
        """Whether this gateway declares the run: of gateways sharing a transport whose sweeps
        find it silent at once, only the first to claim it does (the others apply its event)."""
        try:
            if await self.transport.claim(f"lost:{event.pipeline_id}", LOST_CLAIM_TTL_S):
                return True
        except Exception as exc:  # noqa: BLE001 - cannot tell now: the next sweep asks again
            logger.warning("flowtrace gateway: could not claim run %s to declare it LOST: %s",
                           event.pipeline_id, describe(exc))
            self.store.undeclare_lost(event.pipeline_id)
            return False
        logger.info("flowtrace gateway: run %s is declared LOST by another gateway",
                    event.pipeline_id)
        return False


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
