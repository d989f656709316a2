"""In-process hooks: user callbacks that see every event this process emits.

A hook never fails, blocks or slows the task it observes: each hook has its own
bounded queue drained by its own worker (async hooks on the event loop, sync
hooks on a dedicated thread), errors are logged and counted, and what overflows
a backlog is counted as dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from flowtrace import metrics
from flowtrace.events import (
    EVENT_CLASSES,
    BaseEvent,
    EventFields,
    PipelineCompleteEvent,
    PipelineErrorEvent,
    PipelineStartEvent,
    StepCompleteEvent,
    StepErrorEvent,
    StepProgressEvent,
    StepStartEvent,
    trusted_event,
)

logger = logging.getLogger("flowtrace.hooks")
_get_running_loop = asyncio.get_running_loop

HOOK_METHODS: dict[str, str] = {
    PipelineStartEvent.__name__: "on_pipeline_start",
    StepStartEvent.__name__: "on_step_start",
    StepProgressEvent.__name__: "on_step_progress",
    StepCompleteEvent.__name__: "on_step_complete",
    StepErrorEvent.__name__: "on_step_error",
    PipelineCompleteEvent.__name__: "on_pipeline_complete",
    PipelineErrorEvent.__name__: "on_pipeline_error",
}

WILDCARD = "*"
_BATCH = 4096
"""Events a hook's worker takes at once. A run of sync calls is one thread hop, and the hook's
thread waits for the GIL (up to the 5 ms switch interval while the loop is busy): with 256 a
trivial sync hook fell behind a worker doing 10 000 tasks/s and lost events to its backlog."""


@dataclass
class EventFilter:
    """Passes an event whose pipeline id AND type each match one of the lists (``*`` = any)."""

    pipeline_ids: list[str] = field(default_factory=lambda: [WILDCARD])
    event_types: list[str] = field(default_factory=lambda: [WILDCARD])

    def __post_init__(self) -> None:
        self._any_id = WILDCARD in self.pipeline_ids
        self._any_type = WILDCARD in self.event_types
        self._ids = frozenset(self.pipeline_ids)
        self._types = frozenset(self.event_types)

    def matches(self, event: BaseEvent | EventFields) -> bool:
        if isinstance(event, dict):
            pipeline_id, event_type = event["pipeline_id"], event["type"]
        else:
            pipeline_id, event_type = event.pipeline_id, getattr(event, "type",
                                                                 type(event).__name__)
        return (self._any_id or pipeline_id in self._ids) and (
            self._any_type or event_type in self._types
        )


Offered = BaseEvent | EventFields
"""What a hook's backlog holds: an event, or the fields of one (the middleware's, see
:data:`~flowtrace.events.EventFields`), made a model only when a hook method is called with
it. A backlog of field dicts is nothing the garbage collector tracks; one of models, taken
by the worker in batches, made it collect 40 % more often on a busy worker."""


class _Subscription:
    """One hook object with its filter, backlog and worker.

    The backlog is a plain deque: offering an event is an append, and the worker
    is woken (one future) only when it waits for an empty backlog.
    """

    def __init__(self, hook: Any, event_filter: EventFilter | None, backlog: int) -> None:
        self.hook = hook
        self.filter = event_filter
        self.name = type(hook).__name__
        self.backlog = backlog
        self.pending: deque[Offered] = deque()
        self.delivering = 0
        self.stopped = False  # removed: never called again, the worker and thread end
        self.worker: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.executor: ThreadPoolExecutor | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._idle: asyncio.Event | None = None
        self._method_cache: dict[type[BaseEvent], list[tuple[str, Any, bool]]] = {}

    def offer(self, event: Offered, loop: asyncio.AbstractEventLoop) -> bool:
        """Queue ``event`` (False when the backlog is full)."""
        if self.loop is not loop or self.worker is None:  # a worker that ended is None
            if self.stopped:
                return True  # removed meanwhile: nothing to deliver, nothing lost
            self._start(loop)
        pending = self.pending
        if len(pending) >= self.backlog:
            return False
        pending.append(event)
        wakeup = self._wakeup
        if wakeup is not None:  # the worker waits for an empty backlog to fill
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)
        return True

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is not loop:
            self.pending.clear()  # events of a finished loop (a test's, say) are not delivered
        self.loop = loop
        self._wakeup = None
        self._idle = asyncio.Event()
        self.worker = loop.create_task(self._drain(), name=f"flowtrace-hook-{self.name}")
        self.worker.add_done_callback(self._worker_ended)

    def _worker_ended(self, worker: asyncio.Task[None]) -> None:
        """Cancelled with its loop (or by ``close``): the next event starts a new one."""
        if self.worker is worker:
            self.worker = None

    async def _drain(self) -> None:
        pending, idle = self.pending, self._idle
        assert self.loop is not None and idle is not None
        while not self.stopped:
            if not pending:
                idle.set()
                self._wakeup = self.loop.create_future()
                await self._wakeup
                continue
            idle.clear()
            if len(pending) <= _BATCH:
                batch = list(pending)
                pending.clear()
            else:
                batch = [pending.popleft() for _ in range(_BATCH)]
            self.delivering = len(batch)
            try:
                await self._deliver(batch)
            finally:
                self.delivering = 0

    async def _until_idle(self, idle: asyncio.Event) -> None:
        while self.queued:
            idle.clear()
            await idle.wait()

    def _methods(self, event_class: type[BaseEvent]) -> list[tuple[str, Any, bool]]:
        """``(name, bound method, is_async)`` to call for ``event_class``, looked up once."""
        found = self._method_cache.get(event_class)
        if found is None:
            found = []
            for name in (HOOK_METHODS.get(event_class.__name__), "on_event"):
                method = getattr(self.hook, name, None) if name else None
                if method is not None:
                    found.append((name or "", method, inspect.iscoroutinefunction(method)))
            self._method_cache[event_class] = found
        return found

    async def _deliver(self, batch: list[Offered]) -> None:
        """Call the hook for each event in order; runs of sync calls share one thread hop."""
        sync_calls: list[tuple[str, Any, BaseEvent]] = []
        cache = self._method_cache
        for item in batch:
            if self.stopped:
                return
            kind = EVENT_CLASSES[item["type"]] if isinstance(item, dict) else type(item)
            calls = cache.get(kind) or self._methods(kind)
            if not calls:  # nothing to call: no model is built
                continue
            # event_of(item), with the class looked up once
            event = trusted_event(kind, item) if isinstance(item, dict) else item
            for name, method, is_async in calls:
                if not is_async:
                    sync_calls.append((name, method, event))
                    continue
                if sync_calls:
                    await self._run_sync(sync_calls)
                    sync_calls = []
                if self.stopped:
                    return
                try:
                    await method(event)
                except Exception:  # noqa: BLE001 - logged and counted by _failed
                    self._failed(name)
        if sync_calls:
            await self._run_sync(sync_calls)

    def _failed(self, method_name: str) -> None:
        logger.exception("flowtrace hook %s.%s raised", self.name, method_name)
        metrics.count_hook_error(self.name)

    async def _run_sync(self, calls: list[tuple[str, Any, BaseEvent]]) -> None:
        """Sync hooks run on their own thread so a slow one never stalls the event loop."""
        if self.stopped:
            return
        if self.executor is None:
            self.executor = ThreadPoolExecutor(1, thread_name_prefix=f"flowtrace-hook-{self.name}")
        await asyncio.get_running_loop().run_in_executor(self.executor, self._call_all, calls)

    def _call_all(self, calls: list[tuple[str, Any, BaseEvent]]) -> None:
        for name, method, event in calls:
            if self.stopped:
                return
            try:
                method(event)
            except Exception:  # noqa: BLE001 - logged and counted by _failed
                self._failed(name)

    @property
    def queued(self) -> int:
        """Events offered and not yet fully delivered."""
        return len(self.pending) + self.delivering

    def stop(self) -> None:
        """No call starts after this (one in progress may finish); the worker and thread end.

        Callable from any thread: the worker, if it waits for events, is woken on its loop.
        """
        self.stopped = True
        self.pending.clear()
        if self.executor is not None:
            # Its thread ends once the call in progress, if any, returns.
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None
        worker = self.worker
        if worker is None or worker.done():
            return
        loop = worker.get_loop()
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._wake()
        else:
            with contextlib.suppress(RuntimeError):  # its loop is closed: so is the worker
                loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def close(self, timeout: float) -> None:
        idle = self._idle
        if idle is not None and self.worker is not None and not self.worker.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._until_idle(idle), timeout)
        if self.worker is not None:
            self.worker.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self.worker
            self.worker = None
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self.executor = None


class HookManager:
    """Collects events and hands each to the hooks that want it.

    ``backlog`` bounds each hook's queue: a hook that falls further behind loses
    events (counted in ``flowtrace_events_dropped_total{reason="hook_backlog"}``).
    """

    def __init__(self, backlog: int = 10_000) -> None:
        self.backlog = backlog
        self._subscriptions: list[_Subscription] = []
        self._filters: list[EventFilter] = []
        self.dropped = 0

    def add_hook(self, hook: Any, filter: EventFilter | None = None) -> None:
        self._subscriptions.append(_Subscription(hook, filter, self.backlog))

    def remove_hook(self, hook: Any) -> None:
        """Once this returns ``hook`` is called no more (a call in progress may finish);
        events still queued for it are discarded and its worker task and thread end."""
        kept: list[_Subscription] = []
        for subscription in self._subscriptions:
            if subscription.hook is hook:
                subscription.stop()
            else:
                kept.append(subscription)
        self._subscriptions = kept

    def add_filter(self, event_filter: EventFilter) -> None:
        """A manager-wide filter: every added filter must pass."""
        self._filters.append(event_filter)

    @property
    def hooks(self) -> list[Any]:
        return [s.hook for s in self._subscriptions]

    def emit_nowait(self, event: BaseEvent | EventFields) -> None:
        """Queue ``event`` (or an event's fields) for every interested hook; never blocks,
        never raises."""
        subscriptions = self._subscriptions
        if not subscriptions or (self._filters and not self._passes_filters(event)):
            return
        try:
            loop = _get_running_loop()
        except RuntimeError:
            self._drop(metrics.DROP_NO_EVENT_LOOP)
            return
        for subscription in subscriptions:
            wanted = subscription.filter is None or subscription.filter.matches(event)
            if wanted and not subscription.offer(event, loop):
                self._drop(metrics.DROP_HOOK_BACKLOG)

    def _passes_filters(self, event: Offered) -> bool:
        """Every manager-wide filter passes (not a genexpr in ``emit_nowait``: its closure
        would cost a cell per event even without filters)."""
        return all(event_filter.matches(event) for event_filter in self._filters)

    async def dispatch(self, event: BaseEvent) -> None:
        """Awaitable form of :meth:`emit_nowait` (it does not wait for the hooks)."""
        self.emit_nowait(event)

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout`` per hook), then stop the workers."""
        await asyncio.gather(*(s.close(timeout) for s in self._subscriptions))

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        metrics.count_drop(reason)


def setup_websocket_bridge(hook_manager: HookManager, manager: Any = None) -> Any:
    """Forward every event of ``hook_manager`` to a WebSocket manager (single process)."""
    from flowtrace.websocket.bridge import setup_websocket_bridge as bridge

    return bridge(hook_manager, manager)


def hooks_of(objects: Iterable[Any] | HookManager | None) -> HookManager | None:
    """Accept a HookManager, a list of hook objects, or None."""
    if objects is None or isinstance(objects, HookManager):
        return objects
    manager = HookManager()
    for hook in objects:
        manager.add_hook(hook)
    return manager


__all__ = [
    "EventFilter",
    "HookManager",
    "PipelineCompleteEvent",
    "PipelineErrorEvent",
    "PipelineStartEvent",
    "StepCompleteEvent",
    "StepErrorEvent",
    "StepProgressEvent",
    "StepStartEvent",
    "setup_websocket_bridge",
]
