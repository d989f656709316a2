"""In-process hooks: user callbacks that see every event this process emits.

A hook never fails, blocks or slows the task it observes: each hook has its own
bounded queue drained by its own worker (async hooks on the event loop, sync
hooks on a daemon thread of their own), errors are logged and counted, and what
overflows a backlog is counted as dropped. A hook is offered only the events it has
a method for, so those it has none for never crowd its backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

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

if TYPE_CHECKING:
    from flowtrace.websocket.bridge import WebSocketBridgeHook
    from flowtrace.websocket.manager import FastAPIWebSocketManager

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
ON_EVENT = "on_event"
_BATCH = 4096
"""Events a hook's worker takes at once. A run of sync calls is one thread hop, and the hook's
thread waits for the GIL (up to the 5 ms switch interval while the loop is busy): with 256 a
trivial sync hook fell behind a worker doing 10 000 tasks/s and lost events to its backlog."""


def _names(value: str | Iterable[str]) -> list[str]:
    """A list of names; one given as a string is a list of one, not of its letters."""
    return [value] if isinstance(value, str) else list(value)


@dataclass(init=False)
class EventFilter:
    """Passes an event whose pipeline id AND type each match one of the lists (``*`` = any).

    Each list may be given as any iterable of strings, or one string.
    """

    pipeline_ids: list[str]
    event_types: list[str]

    def __init__(self, pipeline_ids: str | Iterable[str] = (WILDCARD,),
                 event_types: str | Iterable[str] = (WILDCARD,)) -> None:
        self.pipeline_ids = _names(pipeline_ids)
        self.event_types = _names(event_types)
        self._any_id = WILDCARD in self.pipeline_ids
        self._any_type = WILDCARD in self.event_types
        self._ids = frozenset(self.pipeline_ids)
        self._types = frozenset(self.event_types)

    def matches(self, event: BaseEvent | EventFields) -> bool:
        pipeline_id = event["pipeline_id"] if isinstance(event, dict) else event.pipeline_id
        return (self._any_id or pipeline_id in self._ids) and (
            self._any_type or _type_name(event) in self._types
        )


Offered = BaseEvent | EventFields
"""What a hook's backlog holds: an event, or the fields of one (the middleware's, see
:data:`~flowtrace.events.EventFields`), made a model only when a hook method is called with
it. A backlog of field dicts is nothing the garbage collector tracks; one of models, taken
by the worker in batches, made it collect 40 % more often on a busy worker."""

_Call = tuple[str, Any, bool]
"""``(method name, bound method, is_async)``."""
_SyncCall = tuple[str, Any, BaseEvent]
_Returned = list[tuple[str, Awaitable[Any]]] | None
"""What sync calls returned that must still be awaited (on the loop), if any."""


def _type_name(event: Offered) -> str:
    """An event's ``type`` (a bare :class:`BaseEvent` has none: its class name)."""
    name: str = event["type"] if isinstance(event, dict) else getattr(
        event, "type", type(event).__name__)
    return name


def _class_type(event_class: type[BaseEvent]) -> str:
    """The ``type`` every event of ``event_class`` has (a subclass keeps its base's)."""
    field = event_class.model_fields.get("type")
    default = field.default if field is not None else None
    return default if isinstance(default, str) else event_class.__name__


def _is_async(method: Any) -> bool:
    """A coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(method) or inspect.iscoroutinefunction(
        type(method).__call__)


def _resolve(future: asyncio.Future[_Returned], returned: _Returned) -> None:
    if not future.done():  # its waiter was cancelled
        future.set_result(returned)


class _HookThread:
    """A sync hook's own thread: runs the calls of one batch at a time for its worker.

    A daemon thread, unlike a ThreadPoolExecutor's (those are joined at interpreter exit): a
    hook call that never returns cannot keep the process alive once its event loop ended.
    """

    def __init__(self, name: str, run: Callable[[list[_SyncCall]], _Returned]) -> None:
        self._run = run
        self._batches: queue.SimpleQueue[
            tuple[list[_SyncCall], asyncio.Future[_Returned]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # so no batch is queued after the stop mark
        self._stopped = False
        threading.Thread(target=self._serve, name=name, daemon=True).start()

    def run(self, calls: list[_SyncCall]) -> asyncio.Future[_Returned]:
        """Resolved on the running loop once every call returned (at once if stopped)."""
        future: asyncio.Future[_Returned] = _get_running_loop().create_future()
        with self._lock:
            if self._stopped:
                future.set_result(None)
            else:
                self._batches.put((calls, future))
        return future

    def stop(self) -> None:
        """End the thread after the batch in progress, if any (callable from any thread)."""
        with self._lock:
            self._stopped = True
            self._batches.put(None)

    def _serve(self) -> None:
        while (batch := self._batches.get()) is not None:
            calls, future = batch
            returned = self._run(calls)
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                future.get_loop().call_soon_threadsafe(_resolve, future, returned)


class _Subscription:
    """One hook object with its filter, backlog and worker.

    The backlog is a plain deque: offering an event is an append, and the worker
    is woken (one future) only when it waits for an empty backlog. The hook's methods
    are looked up once, here: ``types`` is ``None`` when it takes every event
    (``on_event``), else the types it has a method for, the only ones offered to it.
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
        self.thread: _HookThread | None = None
        self._wakeup: asyncio.Future[None] | None = None
        self._idle: asyncio.Event | None = None
        self._method_cache: dict[type[BaseEvent], list[_Call]] = {
            cls: self._lookup(name) for name, cls in EVENT_CLASSES.items()}
        self._wanted = frozenset(name for name, cls in EVENT_CLASSES.items()
                                 if self._method_cache[cls])
        self.types = None if getattr(hook, ON_EVENT, None) is not None else self._wanted
        # What an event must pass to be offered (None: nothing), one call at most per event.
        self.check: Callable[[Offered], bool] | None = (
            self._wants if self.types is not None
            else event_filter.matches if event_filter is not None else None)

    def _wants(self, event: Offered) -> bool:
        """A type it has a method for, passing its filter if any."""
        return _type_name(event) in self._wanted and (self.filter is None
                                                      or self.filter.matches(event))

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

    def _lookup(self, event_type: str) -> list[_Call]:
        found: list[_Call] = []
        for name in (HOOK_METHODS.get(event_type), ON_EVENT):
            method = getattr(self.hook, name, None) if name else None
            if method is not None:
                found.append((name or "", method, _is_async(method)))
        return found

    def _methods(self, event_class: type[BaseEvent]) -> list[_Call]:
        """What to call for ``event_class`` (one of the user's, say), looked up once."""
        found = self._method_cache.get(event_class)
        if found is None:
            found = self._method_cache[event_class] = self._lookup(_class_type(event_class))
        return found

    async def _deliver(self, batch: list[Offered]) -> None:
        """Call the hook for each event in order; runs of sync calls share one thread hop."""
        sync_calls: list[_SyncCall] = []
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

    async def _run_sync(self, calls: list[_SyncCall]) -> None:
        """Sync hooks run on their own thread so a slow one never stalls the event loop;
        an awaitable one returns (an async callable it did not look like) is awaited here."""
        if self.stopped:
            return
        thread = self.thread
        if thread is None:
            thread = self.thread = _HookThread(f"flowtrace-hook-{self.name}", self._call_all)
        for name, awaitable in await thread.run(calls) or ():
            try:
                await awaitable
            except Exception:  # noqa: BLE001 - logged and counted by _failed
                self._failed(name)

    def _call_all(self, calls: list[_SyncCall]) -> _Returned:
        returned: _Returned = None
        for name, method, event in calls:
            if self.stopped:
                break
            try:
                result = method(event)
            except BaseException:  # noqa: BLE001 - even a hook's sys.exit() must not end its thread
                self._failed(name)
                continue
            if result is not None and inspect.isawaitable(result):
                returned = returned or []
                returned.append((name, result))
        return returned

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
        self._stop_thread()
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

    def _stop_thread(self) -> None:
        """Its thread ends once the call in progress, if any, returns."""
        thread, self.thread = self.thread, None
        if thread is not None:
            thread.stop()

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
        self._stop_thread()


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
        self._fed_by: set[str] = set()  # "middleware", "gateway": see fed_by()

    def add_hook(self, hook: Any, filter: EventFilter | None = None) -> None:
        """Give ``hook`` the events (passing ``filter``) it has a method for.

        Its methods are looked up now; one with none known is logged: it would never be called.
        """
        subscription = _Subscription(hook, filter, self.backlog)
        if subscription.types == frozenset():
            logger.warning("flowtrace: hook %r has none of the methods %s: it is never called",
                           hook, ", ".join([*HOOK_METHODS.values(), ON_EVENT]))
        self._subscriptions.append(subscription)

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
            # An event a hook has no method for is not offered (so never dropped) either.
            check = subscription.check
            if (check is None or check(event)) and not subscription.offer(event, loop):
                self._drop(metrics.DROP_HOOK_BACKLOG)

    def _passes_filters(self, event: Offered) -> bool:
        """Every manager-wide filter passes (not a genexpr in ``emit_nowait``: its closure
        would cost a cell per event even without filters)."""
        return all(event_filter.matches(event) for event_filter in self._filters)

    async def dispatch(self, event: BaseEvent) -> None:
        """Awaitable form of :meth:`emit_nowait` (it does not wait for the hooks).

        The gateway's way in (``create_app(hooks=...)``).
        """
        self.emit_nowait(event)

    def fed_by(self, source: Literal["middleware", "gateway"]) -> None:
        """Note who feeds this manager (``instrument(hooks=...)``, ``create_app(hooks=...)``).

        Warned (once) when both do: the gateway's feed is everyone's events, this process's
        included, so each of them would reach the hooks twice. Only warned: telling the
        copies apart would cost every event, and neither feed can be dropped.
        """
        before = len(self._fed_by)
        self._fed_by.add(source)
        if len(self._fed_by) == 2 and before == 1:
            logger.warning(
                "flowtrace: this HookManager was given to instrument() and to create_app() in "
                "one process: if that gateway consumes this process's events, its hooks get "
                "each of them twice. Give create_app() its own HookManager (it sees every "
                "process's events).")

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout`` per hook), then stop the workers."""
        await asyncio.gather(*(s.close(timeout) for s in self._subscriptions))

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        metrics.count_drop(reason)


def setup_websocket_bridge(hook_manager: HookManager,
                           manager: FastAPIWebSocketManager | None = None, *,
                           use_fastapi: bool = True) -> WebSocketBridgeHook:
    """Forward every event of ``hook_manager`` to a WebSocket manager (single process).

    ``use_fastapi`` is accepted for the reference's calls and ignored: flowtrace's WebSocket
    manager is always FastAPI's.
    """
    from flowtrace.websocket.bridge import setup_websocket_bridge as bridge

    return bridge(hook_manager, manager)


def hooks_of(objects: Iterable[Any] | HookManager | None) -> HookManager | None:
    """Accept a HookManager, hook objects (any iterable), or None."""
    if isinstance(objects, HookManager):
        return objects
    if objects is None:
        return None
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
