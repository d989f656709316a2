"""``HookManager.remove_hook`` (SPEC §2): once it returns the hook gets no further call (one
in progress may finish), events still queued for it are discarded, and its worker task
and thread end. Real hooks on a real event loop and thread; no mocks."""

from __future__ import annotations

import asyncio
import threading

from flowtrace.events import StepProgressEvent
from flowtrace.hooks import HookManager
from tests.support.waiting import async_wait_until

QUEUED = 5


def event(done: int) -> StepProgressEvent:
    return StepProgressEvent(pipeline_id="run", step_name="s", done=done)


class SlowSync:
    """Blocks in its first call until ``gate`` opens, so later events queue behind it."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls: list[int] = []

    def on_event(self, e: StepProgressEvent) -> None:
        self.calls.append(e.done)
        self.gate.wait(30)


class SlowAsync:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.calls: list[int] = []

    async def on_event(self, e: StepProgressEvent) -> None:
        self.calls.append(e.done)
        await self.gate.wait()


class Counting:
    """A hook that stays: it gets every event whatever happens to the others."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def on_event(self, e: StepProgressEvent) -> None:
        self.calls.append(e.done)


def hook_threads(name: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(f"flowtrace-hook-{name}")]


def hook_workers(name: str) -> list[asyncio.Task[object]]:
    """Live worker tasks of hooks of class ``name``."""
    return [t for t in asyncio.all_tasks() if t.get_name() == f"flowtrace-hook-{name}"]


async def ended(name: str) -> None:
    """Wait until hooks of class ``name`` have no worker task and no thread left."""
    await async_wait_until(lambda: not hook_workers(name) and not hook_threads(name),
                           message=f"the worker and thread of {name} to end")


async def test_removed_sync_hook_is_not_called_again_and_its_thread_ends() -> None:
    hooks = HookManager()
    slow, counting = SlowSync(), Counting()
    hooks.add_hook(slow)
    hooks.add_hook(counting)
    for done in range(QUEUED):
        hooks.emit_nowait(event(done))
    await async_wait_until(lambda: slow.calls == [0], message="the first call in progress")
    assert hook_threads("SlowSync") and hook_workers("SlowSync")

    hooks.remove_hook(slow)
    assert hooks.hooks == [counting]
    slow.gate.set()  # the call in progress may finish; the 4 queued events are not delivered
    await ended("SlowSync")
    assert slow.calls == [0]

    hooks.emit_nowait(event(QUEUED))
    await async_wait_until(lambda: counting.calls == list(range(QUEUED + 1)),
                           message="the remaining hook to get every event")
    assert slow.calls == [0]
    assert not hook_threads("SlowSync") and not hook_workers("SlowSync")
    await hooks.close()


async def test_removed_async_hook_is_not_called_again_and_its_worker_ends() -> None:
    hooks = HookManager()
    slow = SlowAsync()
    hooks.add_hook(slow)
    for done in range(QUEUED):
        hooks.emit_nowait(event(done))
    await async_wait_until(lambda: slow.calls == [0], message="the first call in progress")

    hooks.remove_hook(slow)
    slow.gate.set()
    await ended("SlowAsync")
    assert slow.calls == [0]
    await hooks.close()


async def test_removing_an_idle_hook_ends_its_worker_and_thread() -> None:
    hooks = HookManager()
    counting = Counting()
    hooks.add_hook(counting)
    hooks.emit_nowait(event(1))
    await async_wait_until(lambda: counting.calls == [1], message="delivery")
    assert hook_threads("Counting") and hook_workers("Counting")  # waiting for more

    hooks.remove_hook(counting)
    await ended("Counting")
    hooks.emit_nowait(event(2))
    assert counting.calls == [1]
    assert not hook_workers("Counting")


def test_remove_hook_from_another_thread_wakes_the_worker_on_its_loop() -> None:
    """Removal outside the hooks' loop (e.g. from a sync admin thread)."""
    counting = Counting()
    hooks = HookManager()
    hooks.add_hook(counting)

    async def scenario() -> None:
        hooks.emit_nowait(event(1))
        await async_wait_until(lambda: counting.calls == [1], message="delivery")
        remover = threading.Thread(target=hooks.remove_hook, args=(counting,))
        remover.start()
        await asyncio.to_thread(remover.join, 10)
        await ended("Counting")

    asyncio.run(scenario())
    assert counting.calls == [1]
