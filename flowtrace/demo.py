"""``flowtrace demo``: example pipelines, the gateway and the live page in one process.

The pipelines come from :mod:`flowtrace.demo_pipelines` (a taskiq ``InMemoryBroker``,
which runs every task in this process). They are instrumented with
``flowtrace.instrument`` (in-memory transport), served by ``create_app`` and kicked
continuously by a background task, a few runs per second with a bounded number in
flight. Serving goes through :func:`flowtrace.cli.serve_app`, so Ctrl-C and SIGTERM
close every WebSocket client with 1001 before uvicorn stops.

Demo only: ``POST /api/demo/drop-connections`` closes every WebSocket with 1012
(``?hold=true`` also refuses new ones until ``POST /api/demo/accept-connections``), so
that the page's fallback to polling and its resume can be seen and tested.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

import flowtrace
from flowtrace import demo_pipelines
from flowtrace.app import create_app
from flowtrace.events import BaseEvent
from flowtrace.transport.memory import InMemoryTransport

logger = logging.getLogger("flowtrace.demo")

CLOSE_SERVICE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013


class InFlight:
    """A flowtrace hook that counts the demo's runs in flight, to bound them.

    A run is in flight from its kick until its PipelineComplete/PipelineError event.
    A run never seen to end (it should not happen) stops counting after ``expire_after``.
    """

    def __init__(self, limit: int, expire_after: float = 120.0) -> None:
        self.limit = limit
        self.expire_after = expire_after
        self._running: dict[str, float] = {}
        self._ended_early: OrderedDict[str, None] = OrderedDict()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._running)

    def started(self, pipeline_id: str) -> None:
        if pipeline_id in self._ended_early:  # its end was seen before its kick returned
            del self._ended_early[pipeline_id]
            return
        self._running[pipeline_id] = time.monotonic()

    async def on_pipeline_complete(self, event: BaseEvent) -> None:
        self._ended(event.pipeline_id)

    async def on_pipeline_error(self, event: BaseEvent) -> None:
        self._ended(event.pipeline_id)

    def _ended(self, pipeline_id: str) -> None:
        if self._running.pop(pipeline_id, None) is None:
            self._ended_early[pipeline_id] = None
            while len(self._ended_early) > 1000:
                self._ended_early.popitem(last=False)
        self._changed.set()

    async def wait_below(self, count: int, timeout: float | None = None) -> bool:
        """Wait until fewer than ``count`` runs are in flight; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._expire()
            if len(self._running) < count:
                return True
            left = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if left <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    def _expire(self) -> None:
        oldest = time.monotonic() - self.expire_after
        for pipeline_id, kicked in list(self._running.items()):
            if kicked < oldest:
                del self._running[pipeline_id]


async def kick_forever(pipelines: ModuleType, in_flight: InFlight,
                       interval: tuple[float, float] = (0.15, 0.45),
                       rng: random.Random | None = None) -> None:
    """Kick the example pipelines round after round until cancelled."""
    rng = rng or random.Random()
    while True:
        for kick in pipelines.next_round(rng):
            await in_flight.wait_below(in_flight.limit)
            try:
                task = await kick()
            except Exception:
                logger.exception("flowtrace demo: kicking a run failed")
            else:
                in_flight.started(str(task.task_id))
            await asyncio.sleep(rng.uniform(*interval))


class Gate:
    """Whether the demo currently refuses new WebSocket connections."""

    holding = False


class SocketGate:
    """Pure ASGI middleware: while the gate is holding, WebSocket handshakes get a 403."""

    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and self.gate.holding:
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": CLOSE_TRY_AGAIN_LATER})
            return
        await self.app(scope, receive, send)


def create_demo_app(*, max_in_flight: int = 24,
                    interval: tuple[float, float] = (0.15, 0.45)) -> FastAPI:
    """The gateway app over the instrumented example broker, kicking runs while it serves."""
    broker = demo_pipelines.broker
    in_flight = InFlight(max_in_flight)
    # Always in memory (SPEC §7), even with FLOWTRACE_REDIS_URL set: the demo's runs must
    # never reach a real fleet's stream.
    middleware = flowtrace.instrument(broker, hooks=[in_flight], service_name="flowtrace-demo",
                                      transport=InMemoryTransport())
    app = create_app(transport=middleware.transport)
    manager = app.state.flowtrace_manager
    gate = Gate()
    app.add_middleware(SocketGate, gate=gate)

    @app.post("/api/demo/drop-connections", tags=["demo"])
    async def drop_connections(hold: bool = False) -> dict[str, Any]:
        """Close every WebSocket with 1012; with ``hold`` refuse new ones until accepted."""
        gate.holding = hold
        dropped = manager.connection_count
        await manager.close_all(CLOSE_SERVICE_RESTART, "dropped by the demo")
        return {"dropped": dropped, "holding": hold}

    @app.post("/api/demo/accept-connections", tags=["demo"])
    async def accept_connections() -> dict[str, Any]:
        gate.holding = False
        return {"holding": False}

    gateway_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(inner: FastAPI) -> AsyncIterator[None]:
        async with gateway_lifespan(inner):
            await broker.startup()
            print_otlp_endpoint()
            kicker = asyncio.create_task(kick_forever(demo_pipelines, in_flight, interval),
                                         name="flowtrace-demo-kicker")
            try:
                yield
            finally:
                kicker.cancel()
                await asyncio.gather(kicker, return_exceptions=True)
                await in_flight.wait_below(1, timeout=5.0)  # let runs in flight finish
        # After the gateway stopped: flushes hooks, spans and closes the transport.
        await broker.shutdown()

    app.router.lifespan_context = lifespan
    return app


def print_otlp_endpoint() -> None:
    endpoint = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    if endpoint:
        protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                    or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
        print(f"flowtrace demo: traces go to OTLP {endpoint} ({protocol})", flush=True)
    else:
        print("flowtrace demo: set OTEL_EXPORTER_OTLP_ENDPOINT to export traces", flush=True)


async def serve_demo(host: str = "127.0.0.1", port: int = 8000) -> None:
    from flowtrace.cli import serve_app

    await serve_app(create_demo_app(), host, port, banner="flowtrace demo")
    print("flowtrace demo stopped", flush=True)


def run_demo(host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the demo until Ctrl-C or SIGTERM (blocking)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # One log line per task, and a traceback per failure the demo makes on purpose, would
    # drown the URLs: the live page shows every run and error.
    logging.getLogger("taskiq").setLevel(logging.CRITICAL)
    asyncio.run(serve_demo(host, port))


__all__ = ["InFlight", "create_demo_app", "kick_forever", "run_demo", "serve_demo"]
