"""A real uvicorn serving flowtrace's WebSocket router, on its own thread and event loop.

Tests talk to it over TCP with real ``websockets`` clients and reach into its loop
(``server.call``) only to publish events or read the manager's state. The app is
built here (``FastAPI()`` + ``router`` + a manager on ``app.state``) so that these
tests do not depend on ``create_app``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import uvicorn
import websockets
from fastapi import FastAPI
from websockets.asyncio.client import ClientConnection

from flowtrace.events import BaseEvent
from flowtrace.runs import RunStore
from flowtrace.transport.base import FROM_BEGINNING
from flowtrace.transport.memory import InMemoryTransport
from flowtrace.websocket import FastAPIWebSocketManager, router
from tests.support.processes import free_port
from tests.support.waiting import wait_until

T = TypeVar("T")


class LiveServer:
    """``with LiveServer(max_connections=5) as server: ...`` — stopped on exit.

    ``transport=True`` gives the manager an :class:`InMemoryTransport` (``maxlen``
    events) and runs a pump that, like the gateway, folds every event into a
    :class:`RunStore` and then broadcasts it.
    """

    def __init__(self, *, transport: bool = True, maxlen: int = 10_000,
                 **manager_options: Any) -> None:
        self.port = free_port()
        self.with_transport = transport
        self.maxlen = maxlen
        self.manager_options = manager_options
        self.loop: asyncio.AbstractEventLoop | None = None
        self.transport: InMemoryTransport | None = None
        self.store = RunStore()
        self.manager: FastAPIWebSocketManager | None = None
        self.app: FastAPI | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._pump: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> LiveServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,),
                                        name=f"uvicorn-{self.port}", daemon=True)
        self._thread.start()
        ready.wait(20)
        wait_until(lambda: self._failure or (self._server is not None and self._server.started),
                   timeout=20, message="uvicorn to start")
        if self._failure is not None:
            raise RuntimeError("server failed to start") from self._failure

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._build())
            ready.set()
            assert self._server is not None
            loop.run_until_complete(self._server.serve())
        except BaseException as exc:  # reported to start()/stop()
            self._failure = exc
            ready.set()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _build(self) -> None:
        if self.with_transport:
            self.transport = InMemoryTransport(maxlen=self.maxlen)
        self.manager = FastAPIWebSocketManager(transport=self.transport, store=self.store,
                                               **self.manager_options)

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            if self.transport is not None:
                self._pump = asyncio.create_task(self._pump_events())
            yield
            if self._pump is not None:
                self._pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pump

        app = FastAPI(lifespan=lifespan)
        app.state.flowtrace_manager = self.manager
        app.include_router(router)
        self.app = app
        # No keepalive pings: a client that deliberately stops reading (slow consumer)
        # must see flowtrace's close code, not a keepalive timeout, however slow the CI.
        # ws_max_size above the 1 MB test frames: the 1009 must come from flowtrace.
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                ws_max_size=64 * 1024 * 1024, ws_ping_interval=None,
                                lifespan="on", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)

    async def _pump_events(self) -> None:
        assert self.transport is not None and self.manager is not None
        async for event in self.transport.subscribe():
            self.store.apply(event)
            await self.manager.broadcast(event)

    def stop(self) -> None:
        if self._server is not None and self.loop is not None and self.loop.is_running():
            # Close clients with 1001 first, as `flowtrace serve` does (uvicorn would send 1012).
            with contextlib.suppress(Exception):
                self.call(lambda: self.manager.close_all() if self.manager else _noop(),
                          timeout=15)
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
            assert not self._thread.is_alive(), "uvicorn thread did not stop"
            self._thread = None

    # ----------------------------------------------------------------- helpers
    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def http(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def call(self, func: Callable[[], Coroutine[Any, Any, T]], timeout: float = 60) -> T:
        """Run ``func()`` on the server's loop and return its result."""
        assert self.loop is not None
        future: Future[T] = asyncio.run_coroutine_threadsafe(func(), self.loop)
        return future.result(timeout)

    async def acall(self, func: Callable[[], Coroutine[Any, Any, T]],
                    timeout: float = 60) -> T:
        """``call`` from a test's own event loop (without blocking it)."""
        assert self.loop is not None
        future = asyncio.run_coroutine_threadsafe(func(), self.loop)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    async def query(self, func: Callable[[], T], timeout: float = 60) -> T:
        """Evaluate ``func()`` on the server's loop (to read its state safely)."""
        async def go() -> T:
            return func()
        return await self.acall(go, timeout)

    async def publish(self, *events: BaseEvent) -> None:
        """Publish through the transport (pump → store → broadcast)."""
        async def go() -> None:
            assert self.transport is not None
            for event in events:
                await self.transport.publish(event)
        await self.acall(go)

    async def retained(self) -> list[BaseEvent]:
        """Every event the transport keeps, oldest first (ids set)."""
        async def go() -> list[BaseEvent]:
            assert self.transport is not None
            return [event async for event in self.transport.replay(FROM_BEGINNING)]
        return await self.acall(go)

    async def stats(self) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            assert self.manager is not None
            return self.manager.stats()
        return await self.acall(go)


async def _noop() -> None:
    return None


def small_buffer_socket(port: int) -> socket.socket:
    """A client socket with a tiny receive buffer, so the server's writes back up fast
    (over loopback the kernel would otherwise buffer megabytes for a client that never reads)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def connect(server: LiveServer, path: str, *, sock: socket.socket | None = None,
                  **kwargs: Any) -> ClientConnection:
    """A plain client: no compression, no proxy, no keepalive pings."""
    kwargs.setdefault("compression", None)
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("open_timeout", 10)
    return await websockets.connect(server.url(path), sock=sock, **kwargs)


async def recv_json(ws: ClientConnection, timeout: float = 10) -> Any:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    return json.loads(raw)


async def wait_closed(ws: ClientConnection, timeout: float = 10) -> int | None:
    """Read (and discard) until the server closes; the close code."""
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return ws.close_code
