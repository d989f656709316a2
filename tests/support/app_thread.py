"""Serve an ASGI app (e.g. ``flowtrace.app.create_app(...)``) with a real uvicorn on a
free port, on its own thread and event loop, so that synchronous tests and external
processes (a real Prometheus) can reach it over TCP.

``server.call(coroutine_function, *args)`` runs a coroutine on the server's loop, for
objects that must be used from that loop only (``InMemoryTransport.publish``).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvicorn

from tests.support.processes import free_port
from tests.support.waiting import wait_until

T = TypeVar("T")


class AppServer:
    """``with AppServer(app) as server: httpx.get(server.url + "/metrics")``."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        self.app = app
        self.host = host
        self.port = free_port()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server = uvicorn.Server(uvicorn.Config(
            app, host=host, port=self.port, log_level="warning", lifespan="on"))
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> AppServer:
        self._thread = threading.Thread(target=self._run, name=f"uvicorn-{self.port}",
                                        daemon=True)
        self._thread.start()
        wait_until(lambda: self._failure is not None or self.server.started, timeout=20,
                   message="uvicorn to start")
        if self._failure is not None:
            raise RuntimeError("the app server failed to start") from self._failure
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self.loop = loop
        try:
            loop.run_until_complete(self.server.serve())
        except BaseException as exc:
            self._failure = exc
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, function: Callable[..., Coroutine[Any, Any, T]], *args: Any,
             timeout: float = 30.0) -> T:
        """Run ``function(*args)`` on the server's event loop and return its result."""
        if self.loop is None:
            raise RuntimeError("the app server is not running")
        future = asyncio.run_coroutine_threadsafe(function(*args), self.loop)
        return future.result(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(10)
            self._thread = None

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


__all__ = ["AppServer"]
