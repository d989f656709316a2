"""The ceiling for WebSocket fan-out: a minimal raw Starlette broadcaster.

What any broadcaster must do and nothing more: one endpoint (``/ws``), a bounded
per-client queue (a client that falls behind loses messages, nobody else waits),
and one writer task per client. No subscriptions, filters, ids, run store,
metrics, resume or limits: the fan-out benchmark runs flowtrace's gateway against
this under the same uvicorn, on the same port setup, in the same run.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect


class _Client:
    __slots__ = ("queue", "wakeup", "websocket")

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.queue: deque[str] = deque()
        self.wakeup = asyncio.Event()


class RawBroadcaster:
    """``publish(text)`` appends to every client's bounded queue; one writer per client."""

    def __init__(self, queue_size: int = 1000) -> None:
        self.queue_size = queue_size
        self.clients: set[_Client] = set()
        self.sent = 0
        self.dropped = 0

    @property
    def connection_count(self) -> int:
        return len(self.clients)

    def publish(self, text: str) -> None:
        for client in self.clients:
            if len(client.queue) >= self.queue_size:
                self.dropped += 1
                continue
            client.queue.append(text)
            client.wakeup.set()

    async def endpoint(self, websocket: WebSocket) -> None:
        await websocket.accept()
        client = _Client(websocket)
        self.clients.add(client)
        writer = asyncio.create_task(self._write(client))
        try:
            while True:  # read (and ignore) until the peer leaves
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
        except WebSocketDisconnect:
            pass
        finally:
            self.clients.discard(client)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    async def _write(self, client: _Client) -> None:
        queue, websocket = client.queue, client.websocket
        with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
            while True:
                while not queue:
                    client.wakeup.clear()
                    await client.wakeup.wait()
                await websocket.send_text(queue.popleft())
                self.sent += 1


def create_raw_app(queue_size: int = 1000) -> tuple[Starlette, RawBroadcaster]:
    broadcaster = RawBroadcaster(queue_size)
    app = Starlette(routes=[WebSocketRoute("/ws", broadcaster.endpoint)])
    return app, broadcaster
