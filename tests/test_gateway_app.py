"""The gateway app over real HTTP: REST, /metrics, token, LOST sweep, rebuild from history.

Each test serves ``create_app`` with a real uvicorn on a free port, in the test's own
event loop, so events can be published into the app's transport directly.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from flowtrace.app import create_app
from flowtrace.events import (
    BaseEvent,
    Event,
    PipelineCompleteEvent,
    PipelineErrorEvent,
    PipelineStartEvent,
    StepCompleteEvent,
    StepErrorEvent,
    StepStartEvent,
)
from flowtrace.gateway import Gateway
from flowtrace.hooks import HookManager
from flowtrace.runs import RunStore
from flowtrace.transport.memory import InMemoryTransport
from flowtrace.transport.redis_stream import RedisStreamTransport
from tests.support.processes import RedisServer, free_port
from tests.support.waiting import async_wait_until

# Recent: replayed history counts silence from event times (see the LOST tests).
T0 = datetime.now(timezone.utc) - timedelta(minutes=1)
SPEC_METRICS = (
    "flowtrace_pipeline_runs_total", "flowtrace_pipeline_duration_seconds",
    "flowtrace_pipelines_in_progress", "flowtrace_step_runs_total",
    "flowtrace_step_duration_seconds", "flowtrace_step_queue_wait_seconds",
    "flowtrace_events_total", "flowtrace_events_dropped_total", "flowtrace_hook_errors_total",
    "flowtrace_ws_connections", "flowtrace_ws_connections_rejected_total",
    "flowtrace_ws_messages_sent_total", "flowtrace_ws_messages_dropped_total",
)


class InLoopServer(uvicorn.Server):
    """uvicorn in the test's event loop; signals stay with pytest."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Served:
    app: FastAPI
    base_url: str
    client: httpx.AsyncClient

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.client.get(self.base_url + path, **kwargs)

    async def run(self, pipeline_id: str, **kwargs: Any) -> dict[str, Any] | None:
        response = await self.get(f"/api/pipelines/{pipeline_id}", **kwargs)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def runs(self, query: str = "", **kwargs: Any) -> list[dict[str, Any]]:
        response = await self.get(f"/api/pipelines{query}", **kwargs)
        response.raise_for_status()
        body = response.json()
        assert isinstance(body, list), body
        return body

    async def status_of(self, pipeline_id: str) -> str | None:
        run = await self.run(pipeline_id)
        return None if run is None else str(run["status"])


@contextlib.asynccontextmanager
async def serve(app: FastAPI) -> AsyncIterator[Served]:
    port = free_port()
    server = InLoopServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                         lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        await async_wait_until(lambda: server.started or task.done(), message="uvicorn start")
        assert not task.done(), "uvicorn failed to start"
        async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
            yield Served(app, f"http://127.0.0.1:{port}", client)
    finally:
        server.should_exit = True
        await task


@pytest.fixture
async def transport() -> AsyncIterator[InMemoryTransport]:
    memory = InMemoryTransport()
    yield memory
    await memory.close()


def run_events(pipeline_id: str, t: float, outcome: str = "completed",
               name: str = "etl", base: datetime | None = None) -> list[BaseEvent]:
    """A one-step run that starts at ``T0 + t`` and ends with ``outcome`` (or keeps running)."""
    common: dict[str, Any] = {"pipeline_id": pipeline_id, "pipeline_name": name,
                              "trace_id": "cd" * 16}

    def at(seconds: float) -> datetime:
        return (base or T0) + timedelta(seconds=seconds)

    events: list[BaseEvent] = [
        PipelineStartEvent(**common, timestamp=at(t), total_steps=1, steps=["extract"]),
        StepStartEvent(**common, timestamp=at(t + 0.1), step_name="extract", task_id="t",
                       queue_wait_ms=3.0),
    ]
    if outcome == "completed":
        events += [
            StepCompleteEvent(**common, timestamp=at(t + 0.2), step_name="extract", task_id="t",
                              duration_ms=100.0),
            PipelineCompleteEvent(**common, timestamp=at(t + 0.3), duration_ms=300.0),
        ]
    elif outcome == "failed":
        events += [
            StepErrorEvent(**common, timestamp=at(t + 0.2), step_name="extract", task_id="t",
                           error="ValueError: bad", error_type="ValueError", duration_ms=50.0),
            PipelineErrorEvent(**common, timestamp=at(t + 0.3), error="ValueError: bad",
                               error_type="ValueError", failed_step="extract",
                               failed_step_index=0, duration_ms=300.0),
        ]
    return events


async def publish(transport: InMemoryTransport | RedisStreamTransport,
                  events: list[BaseEvent]) -> None:
    for event in events:
        await transport.publish(event)


async def test_rest_lists_runs_newest_first_with_limit_and_status(
        transport: InMemoryTransport) -> None:
    async with serve(create_app(transport)) as served:
        outcomes = ["completed", "failed", "running", "completed", "failed"]
        for i, outcome in enumerate(outcomes):
            await publish(transport, run_events(f"run-{i}", t=float(i), outcome=outcome))
        await async_wait_until(lambda: served.status_of("run-4"), message="run-4 known")
        await async_wait_until(lambda: _equals(served.status_of("run-4"), "FAILED"))

        runs = await served.runs()
        assert [r["pipeline_id"] for r in runs] == [f"run-{i}" for i in (4, 3, 2, 1, 0)]
        assert [r["pipeline_id"] for r in await served.runs("?limit=2")] == ["run-4", "run-3"]
        failed = await served.runs("?status=FAILED")
        assert [r["pipeline_id"] for r in failed] == ["run-4", "run-1"]
        assert [r["pipeline_id"] for r in await served.runs("?status=RUNNING")] == ["run-2"]

        run = await served.run("run-1")
        assert run is not None
        assert (run["status"], run["error"], run["pipeline_name"], run["total_steps"]) == (
            "FAILED", "ValueError: bad", "etl", 1)
        assert run["steps"][0]["status"] == "FAILED"
        assert run["trace_id"] == "cd" * 16
        assert (await served.get("/api/pipelines/never-seen")).status_code == 404


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)


async def test_health_config_page_and_metrics(transport: InMemoryTransport,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWTRACE_TRACE_URL", raising=False)
    async with serve(create_app(transport)) as served:
        health = await served.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        config = (await served.get("/api/config")).json()
        assert config == {"trace_url": "http://localhost:16686/trace/{trace_id}"}
        page = await served.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")

        await publish(transport, run_events("m-1", 0.0) + run_events("m-2", 1.0, "failed"))
        await async_wait_until(lambda: _equals(served.status_of("m-2"), "FAILED"))
        response = await served.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        declared = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
        for name in SPEC_METRICS:  # counters are declared with or without _total by version
            assert {name, name.removesuffix("_total")} & declared, name
        samples = dict(_samples(text))
        assert samples['flowtrace_pipeline_runs_total{pipeline="etl",status="completed"}'] == 1
        assert samples['flowtrace_pipeline_runs_total{pipeline="etl",status="failed"}'] == 1
        assert samples['flowtrace_pipelines_in_progress{pipeline="etl"}'] == 0
        assert samples[
            'flowtrace_step_runs_total{pipeline="etl",status="completed",step="extract"}'] == 1
        assert samples['flowtrace_events_total{type="PipelineStartEvent"}'] == 2
        wait_count = 'flowtrace_step_queue_wait_seconds_count{pipeline="etl",step="extract"}'
        assert samples[wait_count] == 2


async def test_trace_url_comes_from_the_argument_or_the_environment(
        transport: InMemoryTransport, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWTRACE_TRACE_URL", "https://tempo.example/t/{trace_id}")
    async with serve(create_app(transport)) as served:
        assert (await served.get("/api/config")).json() == {
            "trace_url": "https://tempo.example/t/{trace_id}"}
    async with serve(create_app(transport, trace_url="https://j/{trace_id}")) as served:
        assert (await served.get("/api/config")).json() == {"trace_url": "https://j/{trace_id}"}


def _samples(text: str) -> Iterator[tuple[str, float]]:
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            yield name, float(value)


async def test_token_protects_the_api_only(transport: InMemoryTransport) -> None:
    async with serve(create_app(transport, token="s3cret")) as served:
        for path in ("/api/pipelines", "/api/pipelines/x", "/api/config", "/api/ws/pipelines"):
            response = await served.get(path)
            assert response.status_code == 401, path
        assert (await served.get("/api/pipelines",
                                 headers={"Authorization": "Bearer wrong"})).status_code == 401
        assert (await served.get("/api/pipelines?token=wrong")).status_code == 401
        assert (await served.get("/api/pipelines",
                                 headers={"Authorization": "Bearer s3cret"})).status_code == 200
        assert (await served.get("/api/pipelines?token=s3cret")).status_code == 200
        assert (await served.get("/api/config?token=s3cret")).status_code == 200
        for path in ("/healthz", "/metrics", "/"):
            assert (await served.get(path)).status_code == 200, path


async def test_a_silent_run_is_declared_lost_once(transport: InMemoryTransport) -> None:
    app = create_app(transport, stale_after=0.3)
    async with serve(app) as served:
        await publish(transport, run_events("quiet", 0.0, outcome="running"))
        await async_wait_until(lambda: _equals(served.status_of("quiet"), "LOST"), timeout=30)
        run = await served.run("quiet")
        assert run is not None
        assert run["error"].startswith("no event for ")
        # Another sweep or a late event changes nothing.
        await publish(transport, run_events("quiet", 5.0)[2:])
        await publish(transport, run_events("marker", 6.0))
        await async_wait_until(lambda: _equals(served.status_of("marker"), "COMPLETED"))
        assert await served.status_of("quiet") == "LOST"
        samples = dict(_samples((await served.get("/metrics")).text))
        assert samples['flowtrace_pipeline_runs_total{pipeline="etl",status="lost"}'] == 1
        assert samples['flowtrace_pipeline_runs_total{pipeline="etl",status="completed"}'] == 1
        assert samples['flowtrace_pipelines_in_progress{pipeline="etl"}'] == 0
        lost = [e async for e in transport.replay("0-0") if isinstance(e, PipelineErrorEvent)]
        assert [(e.pipeline_id, e.status, e.error_type) for e in lost] == [
            ("quiet", "LOST", "RunLost")]


class Recorder:
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def on_event(self, event: BaseEvent) -> None:
        self.seen.append(f"{event.pipeline_id}:{getattr(event, 'type', '')}")


class Exploding:
    def on_pipeline_start(self, event: BaseEvent) -> None:
        raise RuntimeError("hook bug")


async def test_hooks_see_every_consumed_event_and_cannot_break_the_gateway(
        transport: InMemoryTransport) -> None:
    hooks = HookManager()
    recorder = Recorder()
    hooks.add_hook(Exploding())
    hooks.add_hook(recorder)
    async with serve(create_app(transport, hooks=hooks)) as served:
        await publish(transport, run_events("h-1", 0.0) + run_events("h-2", 1.0))
        await async_wait_until(lambda: len(recorder.seen) == 8, message="8 events hooked")
        assert recorder.seen[:4] == ["h-1:PipelineStartEvent", "h-1:StepStartEvent",
                                     "h-1:StepCompleteEvent", "h-1:PipelineCompleteEvent"]
        assert await served.status_of("h-2") == "COMPLETED"


async def test_a_late_gateway_rebuilds_runs_from_redis_history(redis_server: RedisServer) -> None:
    publisher = RedisStreamTransport(redis_server.url)
    try:
        await publish(publisher, run_events("old-ok", 0.0) + run_events("old-bad", 1.0, "failed")
                      + run_events("old-running", 2.0, "running"))
        assert await publisher.flush(timeout=10)
        gateway_transport = RedisStreamTransport(redis_server.url)
        try:
            async with serve(create_app(gateway_transport)) as served:
                # Rebuilt during startup: known before any new event arrives.
                assert await served.status_of("old-ok") == "COMPLETED"
                assert await served.status_of("old-bad") == "FAILED"
                assert await served.status_of("old-running") == "RUNNING"
                assert [r["pipeline_id"] for r in await served.runs()] == [
                    "old-running", "old-bad", "old-ok"]
                # The gauge follows the rebuilt runs; counters count live events only, so a
                # restart over a trimmed stream never restarts them lower than before
                # (rate() would read that as a burst of the whole retained history).
                samples = dict(_samples((await served.get("/metrics")).text))
                assert samples['flowtrace_pipelines_in_progress{pipeline="etl"}'] == 1
                assert samples['flowtrace_pipeline_runs_total{pipeline="etl",status="failed"}'] == 0
                assert samples['flowtrace_events_total{type="PipelineStartEvent"}'] == 0
                assert samples["flowtrace_transport_up"] == 1

                # Then live, from where the history ended: no gap, no duplicate.
                await publish(publisher, run_events("old-running", 2.0)[2:]
                              + run_events("new", 3.0))
                assert await publisher.flush(timeout=10)
                await async_wait_until(lambda: _equals(served.status_of("new"), "COMPLETED"))
                assert await served.status_of("old-running") == "COMPLETED"
                samples = dict(_samples((await served.get("/metrics")).text))
                assert samples[
                    'flowtrace_pipeline_runs_total{pipeline="etl",status="completed"}'] == 2
                assert samples['flowtrace_events_total{type="PipelineStartEvent"}'] == 1
                assert samples['flowtrace_pipelines_in_progress{pipeline="etl"}'] == 0
                assert samples['flowtrace_pipelines_in_progress{pipeline="etl"}'] == 0
        finally:
            await gateway_transport.close()
    finally:
        await publisher.close()


async def test_a_late_gateway_declares_runs_silent_in_history_lost(
        redis_server: RedisServer) -> None:
    publisher = RedisStreamTransport(redis_server.url)
    gateway_transport = RedisStreamTransport(redis_server.url)
    long_ago = datetime.now(timezone.utc) - timedelta(hours=2)
    try:
        await publish(publisher, run_events("abandoned", 0.0, "running", base=long_ago)
                      + run_events("recent", 0.0, "running"))
        assert await publisher.flush(timeout=10)
        async with serve(create_app(gateway_transport, stale_after=600)) as served:
            await async_wait_until(lambda: _equals(served.status_of("abandoned"), "LOST"),
                                   timeout=30, message="abandoned run declared LOST")
            assert await served.status_of("recent") == "RUNNING"
    finally:
        await gateway_transport.close()
        await publisher.close()


class FlakyTransport(InMemoryTransport):
    """An in-memory transport whose first ``failures`` subscriptions break mid-stream."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.subscriptions: list[str | None] = []

    def subscribe(self, since: str | None = None) -> AsyncIterator[Event]:
        self.subscriptions.append(since)
        inner = super().subscribe(since)
        if len(self.subscriptions) > self.failures:
            return inner
        return self._break_after_one(inner)

    async def _break_after_one(self, inner: AsyncIterator[Event]) -> AsyncIterator[Event]:
        async for event in inner:
            yield event
            raise ConnectionError("transport hiccup")


async def test_gateway_survives_a_failing_subscription_and_resumes_from_last_id() -> None:
    transport = FlakyTransport(failures=2)
    store = RunStore()
    gateway = Gateway(transport, store=store, sweep_interval=60)
    await gateway.start()
    try:
        events = run_events("flaky", 0.0)
        await publish(transport, events)
        await async_wait_until(lambda: (run := store.get("flaky")) is not None
                               and run.status == "COMPLETED", message="run completed")
        assert gateway.events_consumed == len(events)  # nothing lost, nothing twice
        assert len(transport.subscriptions) == 3
        assert transport.subscriptions[1] is not None
        assert transport.subscriptions[2] != transport.subscriptions[1]
    finally:
        await gateway.stop()
        await transport.close()
    assert not gateway.running


async def test_an_apps_own_lifespan_runs_inside_the_gateways(
        transport: InMemoryTransport) -> None:
    """``create_app(lifespan=...)``: the application's start-up (its broker, say) runs
    after the gateway started, its shutdown before the gateway stops, and its state
    reaches requests."""
    seen: list[str] = []

    @contextlib.asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        seen.append(f"start, gateway running: {app.state.flowtrace_gateway.running}")
        yield {"greeting": "hello"}
        seen.append(f"stop, gateway running: {app.state.flowtrace_gateway.running}")

    app = create_app(transport, lifespan=own)

    @app.get("/greeting")
    async def greeting(request: Request) -> str:
        return str(request.state.greeting)

    async with serve(app) as served:
        assert (await served.get("/greeting")).json() == "hello"
        await publish(transport, run_events("own-1", t=0.0))
        await async_wait_until(lambda: _equals(served.status_of("own-1"), "COMPLETED"))
    assert seen == ["start, gateway running: True", "stop, gateway running: True"]
