"""How hooks are given and configured (SPEC §2, the reference API): what used to be a silent
misconfiguration either works or is logged. Real hooks, brokers and gateway; no mocks."""

from __future__ import annotations

import functools
import logging
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from taskiq import InMemoryBroker

import flowtrace
from flowtrace import metrics
from flowtrace.app import create_app
from flowtrace.events import PipelineCompleteEvent, PipelineErrorEvent, PipelineStartEvent
from flowtrace.hooks import EventFilter, HookManager, setup_websocket_bridge
from flowtrace.websocket import FastAPIWebSocketManager
from flowtrace.websocket.bridge import WebSocketBridgeHook
from tests.support.typecheck import strict_mypy
from tests.support.waiting import async_wait_until

HOOKS_LOGGER = "flowtrace.hooks"


def hook_errors(hook_class: str) -> float:
    value = metrics.PROCESS_REGISTRY.get_sample_value("flowtrace_hook_errors_total",
                                                      {"hook": hook_class})
    return value or 0.0


def error(pipeline_id: str = "run") -> PipelineErrorEvent:
    return PipelineErrorEvent(pipeline_id=pipeline_id, error="x")


# ------------------------------------------------------------------ EventFilter lists


def test_a_single_string_is_a_list_of_one() -> None:
    by_type = EventFilter(event_types="PipelineErrorEvent")
    assert by_type == EventFilter(event_types=["PipelineErrorEvent"])
    assert by_type.matches(error())
    assert not by_type.matches(PipelineStartEvent(pipeline_id="run"))

    by_id = EventFilter(pipeline_ids="run-1")
    assert by_id.pipeline_ids == ["run-1"]
    assert by_id.matches(error("run-1")) and not by_id.matches(error("run-2"))


def test_any_iterable_of_names_is_accepted() -> None:
    event_filter = EventFilter(pipeline_ids=("run",), event_types=iter(["PipelineErrorEvent"]))
    assert event_filter == EventFilter(pipeline_ids=["run"], event_types=["PipelineErrorEvent"])
    assert event_filter.matches(error())


# --------------------------------------------------------- methods that are awaitable


class AsyncCallable:
    def __init__(self, calls: list[str], tag: str) -> None:
        self.calls, self.tag = calls, tag

    async def __call__(self, event: Any) -> None:
        self.calls.append(f"{self.tag}:{event.type}")


class RaisesWhenAwaited:
    async def __call__(self, event: Any) -> None:
        raise ValueError("raised in the awaited part")


async def test_a_hook_method_that_returns_an_awaitable_is_awaited() -> None:
    calls: list[str] = []

    class CallableMethod:  # an object with an async __call__: recognised as async
        def __init__(self) -> None:
            self.on_pipeline_start = AsyncCallable(calls, "callable")

    class PartialOfCallable:  # only its result shows it is async: awaited after the call
        def __init__(self) -> None:
            self.on_pipeline_start = functools.partial(AsyncCallable(calls, "partial"))

    hooks = HookManager()
    hooks.add_hook(CallableMethod())
    hooks.add_hook(PartialOfCallable())
    hooks.emit_nowait(PipelineStartEvent(pipeline_id="run"))
    await async_wait_until(lambda: len(calls) == 2, message="both awaited")
    assert sorted(calls) == ["callable:PipelineStartEvent", "partial:PipelineStartEvent"]
    await hooks.close()


async def test_an_awaitable_that_raises_is_counted_as_a_hook_error() -> None:
    class AwaitableRaises:
        def __init__(self) -> None:
            self.on_event = functools.partial(RaisesWhenAwaited())

    before = hook_errors("AwaitableRaises")
    hooks = HookManager()
    hooks.add_hook(AwaitableRaises())
    hooks.emit_nowait(error())
    await async_wait_until(lambda: hook_errors("AwaitableRaises") == before + 1,
                           message="the error counted")
    await hooks.close()


async def test_a_sync_hook_that_raises_or_exits_is_counted_and_keeps_its_thread() -> None:
    class SyncRaises:
        def __init__(self) -> None:
            self.seen: list[str] = []

        def on_event(self, event: PipelineErrorEvent) -> None:
            self.seen.append(event.pipeline_id)
            if event.pipeline_id == "raise":
                raise ValueError("boom")
            if event.pipeline_id == "exit":
                sys.exit(1)

    before = hook_errors("SyncRaises")
    hooks = HookManager()
    hook = SyncRaises()
    hooks.add_hook(hook)
    for pipeline_id in ("raise", "exit", "after"):
        hooks.emit_nowait(error(pipeline_id))
    await async_wait_until(lambda: hook.seen == ["raise", "exit", "after"],
                           message="every call, the one after sys.exit() too")
    assert hook_errors("SyncRaises") == before + 2
    await hooks.close()


# ---------------------------------------------------------- hooks that are never called


def test_a_hook_with_no_known_method_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    class Misspelled:
        def on_step_completed(self, event: Any) -> None: ...

    class Fine:
        def on_pipeline_error(self, event: Any) -> None: ...

    hooks = HookManager()
    with caplog.at_level(logging.WARNING, logger=HOOKS_LOGGER):
        hooks.add_hook(Fine())
        assert not caplog.records
        hooks.add_hook(Misspelled())
    [record] = caplog.records
    assert "Misspelled" in record.getMessage() and "never called" in record.getMessage()
    assert len(hooks.hooks) == 2  # still added, as asked


# -------------------------------------------------------------- setup_websocket_bridge


def test_setup_websocket_bridge_accepts_the_references_use_fastapi() -> None:
    hooks = HookManager()
    bridge = setup_websocket_bridge(hooks, use_fastapi=True)
    assert isinstance(bridge, WebSocketBridgeHook)
    assert hooks.hooks == [bridge]

    manager = FastAPIWebSocketManager()
    assert setup_websocket_bridge(HookManager(), manager, use_fastapi=True).manager is manager


async def test_every_bridge_to_one_manager_feeds_its_run_store() -> None:
    """Two brokers, each with its own HookManager, bridged to one manager: the runs of
    both are known (snapshot, REST), not only the first bridge's."""
    manager = FastAPIWebSocketManager()
    first = setup_websocket_bridge(HookManager(), manager)
    second = setup_websocket_bridge(HookManager(), manager)
    assert first.store is second.store is manager.store is not None

    await second.on_event(PipelineStartEvent(pipeline_id="second", pipeline_name="b"))
    assert manager.store.get("second") is not None


def test_a_bridge_leaves_a_store_the_gateway_feeds_alone() -> None:
    app = create_app()
    manager = app.state.flowtrace_manager
    assert manager.store is app.state.flowtrace_store
    assert setup_websocket_bridge(HookManager(), manager).store is None


def test_setup_websocket_bridge_imports_from_the_references_path() -> None:
    from flowtrace.hooks.bridge import setup_websocket_bridge as from_bridge

    assert from_bridge is setup_websocket_bridge


# ------------------------------------------------ one manager for instrument + create_app


async def test_one_manager_given_to_instrument_and_create_app_is_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    broker = InMemoryBroker()
    seen: Counter[str] = Counter()

    class Counting:
        def on_event(self, event: Any) -> None:
            seen[event.type] += 1

    hooks = HookManager()
    hooks.add_hook(Counting())
    middleware = flowtrace.instrument(broker, hooks=hooks)
    app = create_app(middleware.transport, hooks=hooks)

    @broker.task
    async def task(x: int) -> int:
        return x

    with caplog.at_level(logging.WARNING, logger=HOOKS_LOGGER):
        async with app.router.lifespan_context(app):
            await broker.startup()
            try:
                kicked = await task.kiq(1)
                await kicked.wait_result(timeout=10, check_interval=0.01)
                # Each event twice: once from the middleware, once from the gateway.
                await async_wait_until(lambda: seen["PipelineCompleteEvent"] == 2,
                                       message="the gateway's copy too")
            finally:
                await broker.shutdown()
    warnings = [r for r in caplog.records if "instrument() and to create_app()" in r.message]
    assert len(warnings) == 1  # once, not per event


async def test_dispatching_by_hand_into_an_instrumented_manager_is_not_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    hooks = HookManager()
    flowtrace.instrument(InMemoryBroker(), hooks=hooks)
    with caplog.at_level(logging.WARNING, logger=HOOKS_LOGGER):
        await hooks.dispatch(PipelineCompleteEvent(pipeline_id="run"))
    assert not caplog.records
    await hooks.close()


# --------------------------------------------------------------------------- typing

USER_CODE = '''\
from flowtrace.hooks import EventFilter, HookManager, setup_websocket_bridge

hooks = HookManager()
hooks.add_hook(object(), EventFilter(pipeline_ids="run-1", event_types=("PipelineErrorEvent",)))
reveal_type(setup_websocket_bridge(hooks, use_fastapi=True))
'''


@pytest.mark.timeout(180)
def test_strict_mypy_accepts_the_forms_the_runtime_accepts(tmp_path: Path) -> None:
    returncode, report = strict_mypy(tmp_path, "user_hooks", USER_CODE)
    assert returncode == 0, report
    assert 'Revealed type is "flowtrace.websocket.bridge.WebSocketBridgeHook"' in report


# ------------------------------------------------------------------ metrics_port
@pytest.mark.parametrize("port", [-1, 0, 70_000, "9100", True])
def test_a_metrics_port_that_is_no_port_is_refused(port: Any) -> None:
    with pytest.raises(ValueError, match="metrics_port must be a port from 1 to 65535"):
        flowtrace.instrument(InMemoryBroker(), metrics_port=port)
