"""``/ws/{pipeline_id}``: handshake checks, then one session per connection.

Order on connect (SPEC §6): Origin before accept (a close before accept is an
HTTP 403), then the token (accepted, then closed 1008, so that browsers see a
close code), then the connection limit (accepted, then closed 1013).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Coroutine
from typing import Any

from starlette.requests import HTTPConnection
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from flowtrace.events import BaseEvent
from flowtrace.metrics import REJECT_AUTH, REJECT_LIMIT, REJECT_ORIGIN
from flowtrace.transport.base import Transport
from flowtrace.websocket.manager import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_MESSAGE_TOO_BIG,
    CLOSE_NORMAL,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    FastAPIWebSocketManager,
    Subscription,
    WebSocketClient,
    get_fastapi_ws_manager,
    normalize_origin,
)
from flowtrace.websocket.protocol import (
    ALL,
    PONG_MESSAGE,
    Ping,
    ProtocolError,
    Subscribe,
    Unsubscribe,
    error_message,
    parse_client_frame,
    parse_event_types,
    parse_since,
    snapshot_message,
    subscribed_message,
    unsubscribed_message,
    validate_pipeline_id,
)

logger = logging.getLogger("flowtrace.websocket")

BEARER_SUBPROTOCOL = "bearer"
_MAX_SEND_WRAPPERS = 16
"""How many callables :func:`_abort_connection` looks through for the server's transport."""


def manager_for(connection: HTTPConnection) -> FastAPIWebSocketManager:
    """The app's manager (``app.state.flowtrace_manager``), else the process default."""
    try:
        app = connection.app
    except KeyError:  # a bare ASGI scope without "app"
        return get_fastapi_ws_manager()
    manager = getattr(getattr(app, "state", None), "flowtrace_manager", None)
    if isinstance(manager, FastAPIWebSocketManager):
        return manager
    return get_fastapi_ws_manager()


def origin_allowed(websocket: WebSocket, allowed: frozenset[str] | None) -> bool:
    """No list, a ``*`` entry or no Origin header (not a browser) pass; else it must match.

    The gateway's own origin too (SPEC §6: any Origin not in the list is refused), so the
    list names it for the live page to use its WebSocket.
    """
    if allowed is None or "*" in allowed:
        return True
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    return normalize_origin(origin) in allowed


def token_matches(supplied: str | None, expected: str) -> bool:
    if supplied is None:
        return False
    return hmac.compare_digest(supplied.encode("utf-8"), expected.encode("utf-8"))


def _subprotocol_token(subprotocols: list[str]) -> str | None:
    """``Sec-WebSocket-Protocol: bearer, <token>`` → ``<token>``."""
    for index, name in enumerate(subprotocols[:-1]):
        if name == BEARER_SUBPROTOCOL:
            return subprotocols[index + 1]
    return None


async def fastapi_websocket_endpoint(websocket: WebSocket, pipeline_id: str,
                                     manager: FastAPIWebSocketManager | None = None) -> None:
    """Serve one WebSocket connection subscribed to ``pipeline_id`` (``"*"`` = all runs)."""
    if manager is None:
        manager = manager_for(websocket)

    if not origin_allowed(websocket, manager.allowed_origins):
        manager.count_rejected(REJECT_ORIGIN)
        await websocket.close(code=CLOSE_POLICY_VIOLATION)  # before accept: HTTP 403
        return

    subprotocols = [str(p) for p in websocket.scope.get("subprotocols") or ()]
    subprotocol = BEARER_SUBPROTOCOL if BEARER_SUBPROTOCOL in subprotocols else None
    if manager.token is not None:
        supplied = websocket.query_params.get("token") or _subprotocol_token(subprotocols)
        if not token_matches(supplied, manager.token):
            manager.count_rejected(REJECT_AUTH)
            await _accept_and_close(websocket, subprotocol, CLOSE_POLICY_VIOLATION,
                                    "unauthorized")
            return

    client = manager.register(websocket)
    if client is None:
        manager.count_rejected(REJECT_LIMIT)
        await _accept_and_close(websocket, subprotocol, CLOSE_TRY_AGAIN_LATER,
                                "too many connections")
        return
    try:
        await websocket.accept(subprotocol=subprotocol)
    except BaseException:
        manager.unregister(client)
        client.finished.set()
        raise
    await _Session(manager, client).run(pipeline_id)


def _abort_connection(websocket: WebSocket) -> bool:
    """Drop ``websocket``'s TCP connection at once, with whatever is still unsent.

    A graceful close waits until the peer has read what the server buffered: from a peer
    that stopped reading, forever, holding the socket and making the server's shutdown
    wait for it. ASGI has no abort, so this looks for the server's transport behind
    ``send`` (uvicorn's ``send`` is a method of its protocol, which holds the transport;
    Starlette wraps it in closures). False where there is none to find.
    """
    pending: list[object] = [getattr(websocket, "_send", None)]
    for _ in range(_MAX_SEND_WRAPPERS):
        if not pending:
            break
        candidate = pending.pop(0)
        transport = getattr(getattr(candidate, "__self__", None), "transport", None)
        abort = getattr(transport, "abort", None)  # asyncio's or uvloop's transport
        if callable(abort):
            abort()
            return True
        for cell in getattr(candidate, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                if callable(cell.cell_contents):
                    pending.append(cell.cell_contents)
    return False


async def _accept_and_close(websocket: WebSocket, subprotocol: str | None, code: int,
                            reason: str) -> None:
    with contextlib.suppress(OSError, RuntimeError, WebSocketDisconnect):
        await websocket.accept(subprotocol=subprotocol)
        await websocket.close(code=code, reason=reason)


class _Session:
    """One accepted connection: a reader task (this module) and a writer task (manager)."""

    def __init__(self, manager: FastAPIWebSocketManager, client: WebSocketClient) -> None:
        self.manager = manager
        self.client = client
        self.websocket = client.websocket
        self._ahead: asyncio.Future[Message] | None = None
        """A frame read while a replay ran (to see the peer leave): the reader's next one."""

    async def run(self, pipeline_id: str) -> None:
        manager, client = self.manager, self.client
        writer = manager.start_writer(client)
        reader = asyncio.create_task(self._read(pipeline_id), name="flowtrace-ws-reader")
        client.reader = reader
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done():
                # The peer left, or the reader asked for a close: let the writer send it.
                failed = not reader.cancelled() and reader.exception() is not None
                manager.request_close(client, CLOSE_INTERNAL_ERROR if failed else CLOSE_NORMAL)
                await asyncio.wait({writer}, timeout=manager.close_timeout)
        finally:
            manager.unregister(client)
            for task in (reader, writer):
                task.cancel()
            if self._ahead is not None:
                self._ahead.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            if writer.cancelled():
                # Given up on (a peer that stopped reading): its close was never written.
                _abort_connection(self.websocket)
            for task in (reader, writer):
                if not task.cancelled() and task.exception() is not None:
                    logger.error("WebSocket %s task failed", task.get_name(),
                                 exc_info=task.exception())
            client.finished.set()

    # ------------------------------------------------------------------ reading
    async def _read(self, pipeline_id: str) -> None:
        """Subscribe to the path's channel, then answer client frames until the end."""
        await self._subscribe_from_query(pipeline_id)
        manager, client = self.manager, self.client
        limit = manager.max_message_bytes
        while not client.closing:
            message = await self._receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is not None:
                if _too_big(text, limit):
                    manager.request_close(client, CLOSE_MESSAGE_TOO_BIG, "message too big")
                    return
                try:
                    parsed = parse_client_frame(text)
                except ProtocolError as exc:
                    self._bad_frame(exc)
                    continue
                if isinstance(parsed, Ping):
                    manager.send_nowait(client, PONG_MESSAGE)
                elif isinstance(parsed, Unsubscribe):
                    manager.unsubscribe(client, parsed.pipeline_id)
                    manager.send_nowait(client, unsubscribed_message(parsed.pipeline_id))
                else:
                    await self._subscribe(parsed)
                continue
            data = message.get("bytes")
            if data is not None and len(data) > limit:
                manager.request_close(client, CLOSE_MESSAGE_TOO_BIG, "message too big")
                return
            self._bad_frame(ProtocolError("invalid_message", "binary frames are not supported; "
                                                             "send JSON text frames"))

    async def _receive(self) -> Message:
        ahead, self._ahead = self._ahead, None
        return await (ahead if ahead is not None else self.websocket.receive())

    async def _unless_peer_left(self, replay: Coroutine[Any, Any, None]) -> None:
        """``replay``, cancelled when the peer leaves meanwhile.

        A replay may read a whole stream and send nothing (no event of the run): only a read
        tells that the peer is gone, and the reader is busy replaying. The frame read here,
        whatever it is, is the reader's next one.
        """
        task = asyncio.ensure_future(replay)
        try:
            if self._ahead is None:
                self._ahead = asyncio.ensure_future(self.websocket.receive())
            either: set[asyncio.Future[Any]] = {task, self._ahead}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and _peer_left(self._ahead):
                return
            await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _bad_frame(self, error: ProtocolError) -> None:
        client = self.client
        client.bad_frames += 1
        self.manager.send_nowait(client, error.to_message())
        if client.bad_frames >= self.manager.max_bad_frames:
            self.manager.request_close(client, CLOSE_POLICY_VIOLATION, "too many bad frames")

    async def _subscribe_from_query(self, pipeline_id: str) -> None:
        params = self.websocket.query_params
        try:
            request = Subscribe(
                pipeline_id=validate_pipeline_id(pipeline_id),
                event_types=parse_event_types(params.get("event_types")),
                since=parse_since(params.get("since") or None),
            )
        except ProtocolError as exc:
            # Not a frame: reported, not counted; the client may still subscribe by message.
            self.manager.send_nowait(self.client, exc.to_message())
            return
        await self._subscribe(request)

    async def _subscribe(self, request: Subscribe) -> None:
        """``subscribed``, a ``snapshot`` when the run is known, the replay, then live."""
        manager, client = self.manager, self.client
        channel = request.pipeline_id
        if channel not in client.subscriptions and \
                len(client.subscriptions) >= manager.max_subscriptions:
            manager.send_nowait(client, error_message(
                "too_many_subscriptions",
                f"at most {manager.max_subscriptions} subscriptions per connection"))
            return
        manager.send_nowait(client, subscribed_message(channel, request.event_types,
                                                       request.since))
        if channel != ALL and manager.store is not None:
            state = manager.store.get(channel)
            if state is not None:
                manager.send_nowait(client, snapshot_message(state.model_dump(mode="json")))
        # No await since the snapshot: the live subscription starts exactly after it.
        if request.since is None:
            manager.subscribe(client, channel, request.event_types)
            return
        sub = manager.subscribe(client, channel, request.event_types, resuming=True)
        try:
            await self._unless_peer_left(self._resume(request, sub))
        finally:
            if sub.held is not None:  # the replay failed, or was given up: the peer left
                manager.finish_resume(client, sub, None)

    async def _resume(self, request: Subscribe, sub: Subscription) -> None:
        """The replay, then live, with no await in between: live events held meanwhile may
        be let go of (to be read again) until the replay has handed over."""
        self.manager.finish_resume(self.client, sub, await self._replay(request, sub))

    async def _replay(self, request: Subscribe, sub: Subscription) -> str | None:
        """Send retained events after ``since``; the id of the last event read, if any.

        Live events wait in ``sub.held`` meanwhile. When too many arrive the manager lets
        go of them (``sub.reread``) and the replay reads on, from where it stopped to the
        transport's end then, until a pass ends with nothing let go: it catches up by
        reading again rather than holding (a client reading faster than events arrive
        converges; memory stays bounded).
        """
        manager, client = self.manager, self.client
        since = request.since
        assert since is not None
        transport = manager.transport
        if transport is None:
            manager.send_nowait(client, error_message(
                "history_truncated", "this server keeps no event history; live events only"))
            return None
        if await _history_truncated(transport, since):
            manager.send_nowait(client, error_message(
                "history_truncated",
                f"events after {since} are no longer all retained; replaying what is kept"))
        last: str | None = None
        while True:
            sub.reread = False
            last, complete = await self._replay_pass(transport, request, last or since, last)
            if not complete or not sub.reread or not manager.resuming(client, sub):
                return last
            if await _history_truncated(transport, last or since):
                manager.send_nowait(client, error_message(
                    "history_truncated",
                    f"events after {last or since} were trimmed while this client caught up"))

    async def _replay_pass(self, transport: Transport, request: Subscribe, start: str,
                           last: str | None) -> tuple[str | None, bool]:
        """One replay from ``start`` to the transport's end; (last id read, completed)."""
        manager, client = self.manager, self.client
        channel, types = request.pipeline_id, request.event_types
        try:
            async for event in transport.replay(start, None if channel == ALL else channel):
                last = event.id
                if not _matches(event, channel, types):
                    continue
                if not await manager.send_when_ready(client, event.model_dump_json()):
                    return last, False
        except Exception:
            logger.warning("replay from %s failed", start, exc_info=True)
            return last, False
        return last, True


async def _history_truncated(transport: Transport, since: str) -> bool:
    try:
        return await transport.is_history_truncated(since)
    except Exception:  # a transport that cannot tell: say so rather than promise
        logger.warning("is_history_truncated failed", exc_info=True)
        return True


def _peer_left(receive: asyncio.Future[Message]) -> bool:
    """A finished read that saw the peer go (or failed: the connection is gone)."""
    if not receive.done():
        return False
    if receive.cancelled() or receive.exception() is not None:
        return True
    return bool(receive.result()["type"] == "websocket.disconnect")


def _matches(event: BaseEvent, channel: str, types: frozenset[str] | None) -> bool:
    if channel not in (ALL, event.pipeline_id):
        return False
    return types is None or str(getattr(event, "type", "")) in types


def _too_big(text: str, limit: int) -> bool:
    """UTF-8 size above ``limit``, without encoding when the length alone decides."""
    if len(text) > limit:
        return True
    if len(text) * 4 <= limit:
        return False
    return len(text.encode("utf-8")) > limit


__all__ = ["BEARER_SUBPROTOCOL", "fastapi_websocket_endpoint", "manager_for", "origin_allowed",
           "token_matches"]
