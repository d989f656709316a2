"""``flowtrace serve`` subprocesses and real WebSocket clients for gateway fleet tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from flowtrace.events import EVENT_TYPES, TERMINAL_TYPES, BaseEvent, parse_event
from flowtrace.transport.base import FROM_BEGINNING
from flowtrace.transport.redis_stream import RedisStreamTransport
from tests.support.processes import REPO_ROOT, free_port, kill_process, test_env
from tests.support.waiting import async_wait_until, wait_until


class GatewayProcess:
    """One ``python -m flowtrace.cli serve --redis-url URL --port P ...`` subprocess."""

    def __init__(self, redis_url: str, *args: str) -> None:
        self.port = free_port()
        with tempfile.NamedTemporaryFile(prefix="flowtrace-serve-", suffix=".log",
                                         delete=False) as log:
            self.log = Path(log.name)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "flowtrace.cli", "serve", "--redis-url", redis_url,
                 "--port", str(self.port), *args],
                cwd=REPO_ROOT, env=test_env(), stdout=log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"gateway exited early:\n{self.output()}"
        try:
            return httpx.get(self.url + "/healthz", timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout: float = 30) -> None:
        wait_until(self.healthy, timeout=timeout, message=f"gateway :{self.port} /healthz")

    def stop(self) -> None:
        kill_process(self.proc)
        self.log.unlink(missing_ok=True)

    async def get(self, path: str) -> httpx.Response:
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            return await client.get(self.url + path)

    async def run_state(self, pipeline_id: str) -> dict[str, Any] | None:
        response = await self.get(f"/api/pipelines/{pipeline_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    async def metric(self, name: str, **labels: str) -> float | None:
        """One sample of ``/metrics`` (e.g. ``flowtrace_pipeline_runs_total``), None if absent."""
        response = await self.get("/metrics")
        response.raise_for_status()
        return metric_value(response.text, name, **labels)


def metric_value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


@contextmanager
def serve_gateways(redis_url: str, count: int = 1, *args: str) -> Iterator[list[GatewayProcess]]:
    """``count`` gateways on one Redis, started together, stopped (SIGTERM) on exit."""
    gateways: list[GatewayProcess] = []
    try:
        for _ in range(count):
            gateways.append(GatewayProcess(redis_url, *args))
        for gateway in gateways:
            gateway.wait_healthy()
        yield gateways
    finally:
        for gateway in gateways:
            gateway.stop()


class WsFeed:
    """A real ``websockets`` client whose frames a background task collects."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.events: list[BaseEvent] = []
        self.ended = False
        self.close_error: ConnectionClosed | None = None
        self._task: asyncio.Task[None] | None = None

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str) -> AsyncIterator[WsFeed]:
        async with connect(url, open_timeout=15, proxy=None, max_size=None) as ws:
            feed = cls(ws)
            feed._task = asyncio.create_task(feed._read())
            try:
                await feed.wait(lambda: feed.frames_of("subscribed"), "subscribed")
                yield feed
            finally:
                feed._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feed._task

    async def _read(self) -> None:
        try:
            async for text in self.ws:
                frame = json.loads(text)
                self.frames.append(frame)
                if frame.get("type") in EVENT_TYPES:
                    self.events.append(parse_event(frame))
        except ConnectionClosed as exc:
            self.close_error = exc
        self.ended = True

    def frames_of(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]

    def of(self, pipeline_id: str) -> list[BaseEvent]:
        return [e for e in self.events if e.pipeline_id == pipeline_id]

    def has_id(self, event_id: str) -> bool:
        return any(e.id == event_id for e in self.events)

    async def wait(self, condition: Callable[[], object], what: str,
                   timeout: float = 60) -> None:
        def check() -> object:
            assert not self.ended, f"WebSocket closed while waiting for {what}: " \
                                   f"{self.close_error!r} ({self.ws.close_code})"
            return condition()

        await async_wait_until(check, timeout=timeout, interval=0.05, message=what)

    async def wait_terminal(self, pipeline_id: str, timeout: float = 60) -> list[BaseEvent]:
        await self.wait(lambda: any(e.type in TERMINAL_TYPES  # type: ignore[attr-defined]
                                    for e in self.of(pipeline_id)),
                        f"terminal event of {pipeline_id}", timeout)
        return self.of(pipeline_id)

    async def send(self, frame: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(frame))

    async def ping(self) -> None:
        """A protocol-level round trip: proves the connection is alive and served."""
        before = len(self.frames_of("pong"))
        await self.send({"type": "ping"})
        await self.wait(lambda: len(self.frames_of("pong")) > before, "pong", timeout=15)


async def publish_to_stream(url: str, events: list[BaseEvent]) -> None:
    """Publish ``events`` as a worker would, and wait until Redis has them."""
    publisher = RedisStreamTransport(url)
    try:
        for event in events:
            await publisher.publish(event)
        assert await publisher.flush(timeout=10)
    finally:
        await publisher.close()


async def stream_events(url: str, since: str = FROM_BEGINNING) -> list[BaseEvent]:
    """The Redis stream's own content (every retained event after ``since``)."""
    transport = RedisStreamTransport(url)
    try:
        return [event async for event in transport.replay(since)]
    finally:
        await transport.close()


def dumps(events: list[BaseEvent]) -> list[dict[str, Any]]:
    """Events as comparable dicts (ids, types, every field)."""
    return [e.model_dump(mode="json") for e in events]
