"""The WebSocket protocol and REST routes of SPEC §6 against a real uvicorn."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection

from flowtrace.events import (
    BaseEvent,
    PipelineCompleteEvent,
    PipelineErrorEvent,
    PipelineStartEvent,
    StepCompleteEvent,
    StepProgressEvent,
    StepStartEvent,
)
from flowtrace.hooks import HookManager
from flowtrace.transport.base import id_sort_key
from flowtrace.transport.memory import InMemoryTransport
from flowtrace.websocket import (
    FastAPIWebSocketManager,
    get_fastapi_ws_manager,
    router,
    setup_websocket_bridge,
)
from tests.support.waiting import async_wait_until
from tests.support.ws_server import LiveServer, connect, recv_json, wait_closed


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    options: dict[str, Any] = getattr(request, "param", {})
    with LiveServer(**options) as live:
        yield live


def with_options(**options: Any) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("server", [options], indirect=True)


def run_events(run: str, name: str = "etl") -> list[BaseEvent]:
    """A complete two-step run."""
    common: dict[str, Any] = {"pipeline_id": run, "pipeline_name": name}
    return [
        PipelineStartEvent(**common, total_steps=2, steps=["extract", "load"]),
        StepStartEvent(**common, step_name="extract", step_index=0),
        StepCompleteEvent(**common, step_name="extract", step_index=0, result=1),
        StepStartEvent(**common, step_name="load", step_index=1),
        StepCompleteEvent(**common, step_name="load", step_index=1, result=2),
        PipelineCompleteEvent(**common, result=2),
    ]


async def known(server: LiveServer, *runs: str) -> None:
    """Wait until the pump has folded ``runs`` into the store."""
    await async_wait_until(lambda: server.query(lambda: all(r in server.store for r in runs)),
                           message=f"runs {runs} in the store")


async def next_event(ws: ClientConnection) -> dict[str, Any]:
    """The next message, which must be an event (``id`` set)."""
    message = await recv_json(ws)
    assert message["type"].endswith("Event"), message
    assert message["id"], message
    return message  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- subscriptions
async def test_path_subscription_gets_snapshot_then_only_its_run(server: LiveServer) -> None:
    await server.publish(run_events("run-a")[0], run_events("run-b")[0])
    await known(server, "run-a", "run-b")

    ws = await connect(server, "/ws/run-a")
    assert await recv_json(ws) == {"type": "subscribed", "pipeline_id": "run-a",
                                   "event_types": None, "since": None}
    snapshot = await recv_json(ws)
    assert snapshot["type"] == "snapshot"
    state = snapshot["pipeline"]
    assert (state["pipeline_id"], state["pipeline_name"], state["status"]) == \
        ("run-a", "etl", "RUNNING")
    assert [step["name"] for step in state["steps"]] == ["extract", "load"]

    a, b = run_events("run-a")[1:], run_events("run-b")[1:]
    await server.publish(*(event for pair in zip(b, a, strict=True) for event in pair))
    received = [await next_event(ws) for _ in a]
    assert [m["type"] for m in received] == [e.type for e in a]  # type: ignore[attr-defined]
    assert {m["pipeline_id"] for m in received} == {"run-a"}
    ids = [id_sort_key(m["id"]) for m in received]
    assert ids == sorted(ids)
    # Nothing of run-b slipped in: the next message is the next run-a event.
    await server.publish(StepProgressEvent(pipeline_id="run-b", step_name="x"),
                         StepProgressEvent(pipeline_id="run-a", step_name="sentinel"))
    assert (await next_event(ws))["step_name"] == "sentinel"

    async with httpx.AsyncClient() as http:
        state = (await http.get(server.http("/api/pipelines/run-a"))).json()
    assert state["status"] == "COMPLETED"
    await ws.close()


async def test_wildcard_gets_every_run_without_snapshot(server: LiveServer) -> None:
    await server.publish(run_events("run-a")[0])
    await known(server, "run-a")
    ws = await connect(server, "/ws/*")
    assert (await recv_json(ws))["pipeline_id"] == "*"
    events = [*run_events("run-b"), *run_events("run-c")]
    await server.publish(*events)
    received = [await next_event(ws) for _ in events]
    assert [(m["pipeline_id"], m["type"]) for m in received] == \
        [(e.pipeline_id, e.type) for e in events]  # type: ignore[attr-defined]
    await ws.close()


async def test_event_types_filter(server: LiveServer) -> None:
    by_query = await connect(server, "/ws/*?event_types=PipelineStartEvent,PipelineCompleteEvent")
    assert (await recv_json(by_query))["event_types"] == ["PipelineCompleteEvent",
                                                          "PipelineStartEvent"]
    by_message = await connect(server, "/ws/run-x")
    await recv_json(by_message)
    await by_message.send(json.dumps({"type": "subscribe", "pipeline_id": "run-y",
                                      "event_types": ["StepCompleteEvent"]}))
    assert (await recv_json(by_message))["pipeline_id"] == "run-y"
    bad = await connect(server, "/ws/run-y?event_types=StepCompleteEvent,Bogus")
    error = await recv_json(bad)
    assert (error["type"], error["code"]) == ("error", "invalid_message")
    assert "Bogus" in error["detail"]

    await server.publish(*run_events("run-y"))
    assert [(await next_event(by_query))["type"] for _ in range(2)] == \
        ["PipelineStartEvent", "PipelineCompleteEvent"]
    assert [(await next_event(by_message))["step_name"] for _ in range(2)] == \
        ["extract", "load"]
    # The refused query subscribed to nothing; a subscribe message still works.
    await bad.send(json.dumps({"type": "subscribe", "pipeline_id": "run-z"}))
    assert (await recv_json(bad))["type"] == "subscribed"
    await server.publish(StepProgressEvent(pipeline_id="run-z", step_name="only"))
    assert (await next_event(bad))["step_name"] == "only"
    for ws in (by_query, by_message, bad):
        await ws.close()


async def test_subscribe_unsubscribe_and_ping_are_acknowledged(server: LiveServer) -> None:
    await server.publish(run_events("known")[0])
    await known(server, "known")
    ws = await connect(server, "/ws/first")
    await recv_json(ws)
    await ws.send(json.dumps({"type": "ping"}))
    assert await recv_json(ws) == {"type": "pong"}

    await ws.send(json.dumps({"type": "subscribe", "pipeline_id": "known"}))
    assert (await recv_json(ws))["type"] == "subscribed"
    snapshot = await recv_json(ws)
    assert (snapshot["type"], snapshot["pipeline"]["pipeline_id"]) == ("snapshot", "known")

    async with httpx.AsyncClient() as http:
        assert (await http.get(server.http("/api/ws/clients/known"))).json() == \
            {"pipeline_id": "known", "client_count": 1}
        assert (await http.get(server.http("/api/ws/pipelines"))).json() == \
            {"pipelines": ["first", "known"]}

        await ws.send(json.dumps({"type": "unsubscribe", "pipeline_id": "first"}))
        assert await recv_json(ws) == {"type": "unsubscribed", "pipeline_id": "first"}
        assert (await http.get(server.http("/api/ws/clients/first"))).json()["client_count"] == 0
        stats = (await http.get(server.http("/ws/metrics"))).json()
    assert stats["channels"] == ["known"]
    assert stats["clients_per_channel"] == {"known": 1}
    assert stats["connections"] == 1
    assert {"messages_sent", "messages_dropped", "connections_rejected",
            "slow_consumer_disconnects", "max_connections"} <= stats.keys()

    await server.publish(StepProgressEvent(pipeline_id="first", step_name="gone"),
                         StepProgressEvent(pipeline_id="known", step_name="kept"))
    assert (await next_event(ws))["step_name"] == "kept"
    await ws.close()


# --------------------------------------------------------------------------- resume
async def test_resume_with_since_has_no_gap_and_no_duplicate(server: LiveServer) -> None:
    stop = threading.Event()
    published = [0]
    acked = [0]  # the highest ``done`` the test has read so far
    transport = server.transport
    assert transport is not None

    async def publisher() -> int:
        # Publishes throughout, at most 500 events ahead of what the test has read.
        n = 0
        while not stop.is_set():
            n += 1
            await transport.publish(StepProgressEvent(pipeline_id="resume", step_name="s",
                                                      done=n))
            if n % 3 == 0:
                await transport.publish(StepProgressEvent(pipeline_id="other", step_name="s"))
            published[0] = n
            await asyncio.sleep(0)
            if n - acked[0] >= 500:
                await async_wait_until(lambda n=n: n - acked[0] < 500 or stop.is_set(),
                                       interval=0.001, message="the test to read on")
        return n

    # max_queue=None: a client that stops reading mid-stream must still see the close frame.
    first = await connect(server, "/ws/resume", max_queue=None)
    assert (await recv_json(first))["type"] == "subscribed"
    running = asyncio.ensure_future(server.acall(publisher))
    got_first: list[dict[str, Any]] = []
    while len(got_first) < 300:
        message = await recv_json(first)
        if message["type"] != "snapshot":
            got_first.append(message)
            acked[0] = message["done"]
    await first.close()
    last = got_first[-1]
    # Let events pile up while nobody listens.
    await async_wait_until(lambda: published[0] >= last["done"] + 200, message="a gap")

    second = await connect(server, f"/ws/resume?since={last['id']}")
    assert (await recv_json(second))["since"] == last["id"]
    got_second: list[dict[str, Any]] = []
    final: int | None = None
    while final is None or not got_second or got_second[-1]["done"] < final:
        message = await recv_json(second)
        assert message["type"] != "error", message
        if message["type"] == "snapshot":
            continue
        got_second.append(message)
        acked[0] = message["done"]
        if len(got_second) == 600:
            stop.set()
            final = await running
    await second.close()

    dones = [m["done"] for m in got_first + got_second]
    assert dones == list(range(dones[0], final + 1)), "gap or duplicate"
    assert dones[0] == 1
    assert got_second[0]["done"] == last["done"] + 1
    ids = [id_sort_key(m["id"]) for m in got_first + got_second]
    assert ids == sorted(set(ids))
    assert {m["pipeline_id"] for m in got_first + got_second} == {"resume"}


@with_options(maxlen=10)
async def test_history_truncated_for_old_or_foreign_ids(server: LiveServer) -> None:
    await server.publish(*(StepProgressEvent(pipeline_id="t", step_name="s", done=n)
                           for n in range(1, 31)))
    ids = [e.id for e in await server.retained()]
    assert len(ids) == 10
    assert ids[0] is not None
    epoch = ids[0].split("-")[0]

    async def resume(since: str) -> tuple[list[str], list[int]]:
        ws = await connect(server, f"/ws/t?since={since}")
        errors: list[str] = []
        dones: list[int] = []
        assert (await recv_json(ws))["type"] == "subscribed"
        while not dones or dones[-1] < 30:
            message = await recv_json(ws)
            if message["type"] == "error":
                assert not dones, "history_truncated must come before the replay"
                errors.append(message["code"])
            elif message["type"] == "StepProgressEvent":
                dones.append(message["done"])
        await ws.close()
        return errors, dones

    assert await resume(f"{epoch}-5") == (["history_truncated"], list(range(21, 31)))
    foreign = InMemoryTransport().epoch
    assert await resume(f"{foreign}-25") == (["history_truncated"], list(range(21, 31)))
    assert await resume(f"{epoch}-20") == ([], list(range(21, 31)))
    assert await resume(f"{epoch}-26") == ([], [27, 28, 29, 30])
    assert await resume("0-0") == ([], list(range(21, 31)))


@with_options(transport=False)
async def test_since_without_a_transport_is_live_only(server: LiveServer) -> None:
    ws = await connect(server, "/ws/run?since=1-1")
    assert (await recv_json(ws))["type"] == "subscribed"
    error = await recv_json(ws)
    assert (error["type"], error["code"]) == ("error", "history_truncated")
    await ws.close()


# --------------------------------------------------------------------------- REST
async def test_rest_routes(server: LiveServer) -> None:
    completed = run_events("run-1")  # built in order: start times grow
    failed = [*run_events("run-2")[:2],
              PipelineErrorEvent(pipeline_id="run-2", pipeline_name="etl", error="boom")]
    running = run_events("run-3")[0]
    await server.publish(*completed, *failed, running)
    await known(server, "run-1", "run-2", "run-3")
    async with httpx.AsyncClient() as http:
        runs = (await http.get(server.http("/api/pipelines"))).json()
        assert [r["pipeline_id"] for r in runs] == ["run-3", "run-2", "run-1"]
        assert [r["status"] for r in runs] == ["RUNNING", "FAILED", "COMPLETED"]
        limited = (await http.get(server.http("/api/pipelines?limit=1"))).json()
        assert [r["pipeline_id"] for r in limited] == ["run-3"]
        completed = (await http.get(server.http("/api/pipelines?status=completed"))).json()
        assert [r["pipeline_id"] for r in completed] == ["run-1"]
        assert (await http.get(server.http("/api/pipelines?status=bogus"))).status_code == 422
        one = await http.get(server.http("/api/pipelines/run-2"))
        assert one.status_code == 200
        assert (one.json()["status"], one.json()["error"]) == ("FAILED", "boom")
        assert (await http.get(server.http("/api/pipelines/nope"))).status_code == 404


async def test_router_without_app_manager_uses_the_default() -> None:
    app = FastAPI()
    app.include_router(router)
    assert get_fastapi_ws_manager() is get_fastapi_ws_manager()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as http:
        stats = (await http.get("/ws/metrics")).json()
        assert stats == get_fastapi_ws_manager().stats()
        assert (await http.get("/api/pipelines")).json() == []
        assert (await http.get("/api/pipelines/x")).status_code == 404


# --------------------------------------------------------------------------- bridge, shutdown
@with_options(transport=False)
async def test_single_process_bridge_forwards_hook_events(server: LiveServer) -> None:
    ws = await connect(server, "/ws/bridged")
    await recv_json(ws)
    hooks = HookManager()

    async def emit() -> None:
        assert server.manager is not None
        hook = setup_websocket_bridge(hooks, server.manager)
        assert hook in hooks.hooks
        for event in run_events("bridged"):
            hooks.emit_nowait(event)

    await server.acall(emit)
    received = [await next_event(ws) for _ in range(6)]
    assert [m["type"] for m in received] == [e.type for e in run_events("b")]  # type: ignore[attr-defined]
    ids = [id_sort_key(m["id"]) for m in received]
    assert ids == sorted(set(ids))  # local monotonic ids for id-less events
    await ws.close()
    await server.acall(lambda: hooks.close(timeout=5))


async def test_close_all_closes_everyone_1001_and_leaves_no_task(
        server: LiveServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="asyncio")
    clients = [await connect(server, path) for path in
               ["/ws/a", "/ws/*", "/ws/b?since=0-0", "/ws/c?event_types=StepStartEvent"]]
    for ws in clients:
        assert (await recv_json(ws))["type"] == "subscribed"
    manager = server.manager
    assert manager is not None
    await server.publish(*run_events("a"))

    await server.acall(lambda: manager.close_all(1001))
    for ws in clients:
        assert await wait_closed(ws) == 1001
        assert ws.close_reason == "server shutdown"

    def leftovers() -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks()
                if t.get_name().startswith("flowtrace-ws")]

    assert await server.query(leftovers) == []
    assert (await server.stats())["connections"] == 0
    gc.collect()
    assert not [r for r in caplog.records if "destroyed" in r.getMessage()]


async def test_manager_defaults() -> None:
    manager = FastAPIWebSocketManager()
    assert manager.metrics is not None
    assert manager.stats()["max_connections"] == 1000
    assert manager.get_channel_ids() == []
    assert manager.get_client_count("x") == 0
    await manager.close_all()
    with pytest.raises(ValueError):
        FastAPIWebSocketManager(max_connections=0)
