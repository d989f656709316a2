"""The one interface every transport offers.

``publish`` (and its synchronous form ``publish_nowait``, the one the middleware
uses) never raises into the caller and never waits on the network: it
buffers, a background task ships batches, and what cannot be kept is counted as
dropped. ``subscribe`` yields events with ``id`` set. ``flush`` is the single
awaited wait flowtrace allows on a task's path (once per pipeline hop, SPEC §3).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Callable

from flowtrace.events import BaseEvent, Event, EventFields, event_of

FROM_BEGINNING = "0-0"
"""``since`` value meaning "every retained event" (never reported as truncated)."""

DropCallback = Callable[[str, int], None]
"""Called as ``on_drop(reason, count)`` whenever events are lost."""


class Transport(abc.ABC):
    """Carries events from the processes that emit them to the ones that consume them."""

    buffers: bool = True
    """False when ``publish`` hands events over at once, so ``flush`` has nothing to wait for."""

    def __init__(self) -> None:
        self.dropped: dict[str, int] = {}
        self._drop_callbacks: list[DropCallback] = []

    async def publish(self, event: BaseEvent) -> None:
        """Queue ``event`` for delivery. Never raises, never blocks on I/O."""
        self.publish_nowait(event)

    @abc.abstractmethod
    def publish_nowait(self, event: BaseEvent) -> None:
        """:meth:`publish` without the coroutine."""

    def publish_fields_nowait(self, fields: EventFields) -> None:
        """:meth:`publish_nowait` of an event's fields: what the middleware calls on a task's
        path. Transports that can keep fields as they are need no model of them."""
        self.publish_nowait(event_of(fields))

    @abc.abstractmethod
    def subscribe(self, since: str | None = None) -> AsyncIterator[Event]:
        """Events with ``id`` set: only new ones, or every retained one after ``since`` first."""

    @abc.abstractmethod
    def replay(self, since: str, pipeline_id: str | None = None) -> AsyncIterator[Event]:
        """Every retained event after ``since`` up to the newest one now, then stop.

        Finite, unlike :meth:`subscribe`. ``since=FROM_BEGINNING`` replays everything
        retained; ``pipeline_id`` keeps one run's events (the others are skipped before they
        are decoded). Used by the gateway to rebuild its run store and to resume clients.
        """

    async def flush(self, timeout: float = 2.0) -> bool:
        """Wait until what was published so far has left this process.

        Returns False when it could not (transport unreachable, timeout): callers
        go on regardless, order is then best effort.
        """
        return True

    async def close(self) -> None:  # noqa: B027 - optional for transports holding nothing
        """Ship what is buffered (bounded wait) and release connections."""

    def reopen(self) -> None:  # noqa: B027 - optional for transports holding nothing
        """Undo :meth:`close`: publish and serve subscribers again.

        A broker may be started again after its shutdown in one process (a FastAPI
        app's lifespan run once per test, say): its middleware reopens the transport
        it closed. A no-op on an open transport.
        """

    # Shared per-step item counters, for map/filter progress across processes.
    @abc.abstractmethod
    def count_item(self, key: str, failed: bool) -> None:
        """Count one finished map/filter item under ``key`` (fire and forget)."""

    @abc.abstractmethod
    async def read_counts(self, key: str) -> tuple[int, int]:
        """``(done, failed)`` counted so far under ``key``; (0, 0) when unknown or unreachable."""

    def forget_counts(self, key: str) -> None:  # noqa: B027 - optional: counters may expire
        """Drop the counters under ``key``: their step is over (fire and forget)."""

    async def claim(self, key: str, ttl_s: float) -> bool:
        """Whether this caller is the first, of every process sharing the transport, to claim
        ``key`` (kept ``ttl_s`` seconds); raises when that cannot be told now.

        For what one gateway of many must do alone (declare a run LOST). A transport that
        one process owns has nobody to share with: always True.
        """
        return True

    def history_is_truncated(self, since: str) -> bool:
        """True when events after ``since`` may be gone (or ``since`` is foreign)."""
        return False

    async def is_history_truncated(self, since: str) -> bool:
        """Async form of :meth:`history_is_truncated` for transports that must ask a server."""
        return self.history_is_truncated(since)

    def on_drop(self, callback: DropCallback) -> None:
        """Register a callback told about every drop (for metrics)."""
        self._drop_callbacks.append(callback)

    def _count_drop(self, reason: str, count: int = 1) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + count
        for callback in self._drop_callbacks:
            with contextlib.suppress(Exception):  # a metrics callback must not break publishing
                callback(reason, count)


BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
"""A transport that lost its server retries after 0.1 s, doubling up to 5 s."""


def describe(exc: BaseException) -> str:
    """``Type: message`` (redis-py 8's ``repr`` of its errors is only ``server:ResponseError``)."""
    return f"{type(exc).__name__}: {exc}"


def id_sort_key(event_id: str) -> tuple[int, int]:
    """Order of event ids ("<major>-<minor>", both transports): comparable within one stream."""
    major, _, minor = event_id.partition("-")
    return int(major), int(minor or 0)
