"""Fan-out of events to WebSocket clients (SPEC §6).

Design in one paragraph: :meth:`FastAPIWebSocketManager.broadcast` never touches a
socket. It serializes each event once and appends the text to the bounded outbox
of every interested client; one writer task per client drains its outbox with
``send_text``. A client whose outbox is full is a slow consumer: its pending
messages are discarded and it is closed with 4008, so nobody else ever waits for
it. Every close after the handshake goes through the writer, so a close code
always follows the messages that were queued before it (an ``error`` before 1008).

A resume (``since``) replays from the transport while live events keep arriving: those
wait in a bounded list, and when it overflows they are let go and the replay reads on
to the transport's new end, which retains them too. So a resume costs bounded memory
whatever its length, and only a client that stops reading is closed 4008.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from pydantic import BaseModel
from starlette.websockets import WebSocket, WebSocketDisconnect

from flowtrace.events import BaseEvent
from flowtrace.metrics import (
    WS_DROP_CLOSED,
    WS_DROP_SHUTDOWN,
    WS_DROP_SLOW_CONSUMER,
    GatewayMetrics,
)
from flowtrace.transport.base import Transport, id_sort_key
from flowtrace.websocket.protocol import ALL

logger = logging.getLogger("flowtrace.websocket")

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY_VIOLATION = 1008
CLOSE_MESSAGE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_SLOW_CONSUMER = 4008
STALLED_CLIENT_TIMEOUT = 60.0
"""Seconds after a 4008 before a client that still does not read is dropped outright."""
RESUME_STALL_TIMEOUT = 5.0
"""Seconds a resuming client's socket may take nothing, while live events overflow, before
it is a slow consumer (live clients are one as soon as their outbox is full)."""

_SENT_FLUSH_EVERY = 256
"""Writers add to the sent counters in batches (and whenever their outbox empties)."""

_SEND_ERRORS = (WebSocketDisconnect, OSError, RuntimeError)
"""What sending on a socket the peer already left raises (Starlette/uvicorn)."""


class RunStoreLike(Protocol):
    """What the manager needs from :class:`flowtrace.runs.RunStore`."""

    def get(self, pipeline_id: str) -> BaseModel | None: ...

    def list(self, limit: int | None = ..., status: str | None = ...) -> Sequence[BaseModel]: ...


class Subscription:
    """One channel a client listens to, with its event-type filter.

    While resuming (``held`` is a list) live events are parked in ``held`` until the
    replay is done; afterwards ``floor`` (the last replayed id) drops live events the
    replay already delivered, which happens when the gateway lags the transport.
    ``held`` is bounded: on overflow it is emptied and ``reread`` set, telling the
    replay to read on from the transport. ``progress``/``progress_at``: the client's
    ``delivered`` count when last seen moving, to tell a stalled client from a busy one.
    """

    __slots__ = ("event_types", "floor", "held", "pipeline_id", "progress", "progress_at",
                 "reread")

    def __init__(self, pipeline_id: str, event_types: frozenset[str] | None,
                 resuming: bool = False) -> None:
        self.pipeline_id = pipeline_id
        self.event_types = event_types
        self.held: list[tuple[tuple[int, int] | None, str]] | None = [] if resuming else None
        self.floor: tuple[int, int] | None = None
        self.reread = False
        self.progress = 0
        self.progress_at = 0.0

    def accepts(self, event_type: str) -> bool:
        return self.event_types is None or event_type in self.event_types


_SEND_NOW = Subscription("", None)
"""Sentinel verdict of :meth:`FastAPIWebSocketManager._route` (cheaper than a tuple)."""


class WebSocketClient:
    """Server-side state of one connection: subscriptions, outbox, tasks."""

    __slots__ = (
        "bad_frames", "close_request", "delivered", "finished", "outbox", "reader", "space",
        "subscriptions", "wakeup", "want_space", "websocket", "writer",
    )

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.subscriptions: dict[str, Subscription] = {}
        self.outbox: deque[str] = deque()
        self.wakeup = asyncio.Event()
        self.space = asyncio.Event()
        self.want_space = False
        self.close_request: tuple[int, str] | None = None
        self.writer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()
        self.bad_frames = 0
        self.delivered = 0  # messages written to the socket

    @property
    def closing(self) -> bool:
        return self.close_request is not None


class FastAPIWebSocketManager:
    """Clients, channels (pipeline id → clients; ``"*"`` = every run) and fan-out.

    ``transport`` (for resume with ``since``) and ``store`` (for snapshots and REST)
    are optional: without them the manager is the single-process bridge of the
    reference design, fed by :func:`flowtrace.websocket.setup_websocket_bridge`.
    """

    def __init__(
        self,
        *,
        transport: Transport | None = None,
        store: RunStoreLike | None = None,
        metrics: GatewayMetrics | None = None,
        max_connections: int = 1000,
        send_queue_size: int = 1000,
        max_message_bytes: int = 4096,
        max_subscriptions: int = 100,
        max_bad_frames: int = 10,
        token: str | None = None,
        allowed_origins: Iterable[str] | None = None,
        close_timeout: float = 5.0,
        resume_stall_timeout: float = RESUME_STALL_TIMEOUT,
        stalled_client_timeout: float = STALLED_CLIENT_TIMEOUT,
    ) -> None:
        if min(max_connections, send_queue_size, max_message_bytes, max_subscriptions,
               max_bad_frames) < 1:
            raise ValueError("limits must be positive")
        self.transport = transport
        self.store = store
        self.metrics = metrics if metrics is not None else GatewayMetrics()
        self.max_connections = max_connections
        self.send_queue_size = send_queue_size
        self.max_message_bytes = max_message_bytes
        self.max_subscriptions = max_subscriptions
        self.max_bad_frames = max_bad_frames
        self.token = token or None
        self.allowed_origins: frozenset[str] | None = (
            None if allowed_origins is None
            else frozenset(normalize_origin(origin) for origin in allowed_origins)
        )
        self.close_timeout = close_timeout
        self.resume_stall_timeout = resume_stall_timeout
        self.stalled_client_timeout = stalled_client_timeout
        # A replay fills the outbox up to half; live events held meanwhile get the rest, so
        # that going live never overfills the outbox of a client that kept up.
        self.replay_limit = max(1, send_queue_size // 2)
        self.held_limit = send_queue_size - self.replay_limit
        self._clients: set[WebSocketClient] = set()
        self._channels: dict[str, set[WebSocketClient]] = {}
        self._messages_sent = 0
        self._dropped: dict[str, int] = {}
        self._rejected: dict[str, int] = {}
        self._slow_consumer_disconnects = 0
        self._resume_rereads = 0
        self._local_epoch = time.time_ns() // 1_000_000
        self._local_seq = itertools.count(1)

    # ------------------------------------------------------------------ queries
    def get_channel_ids(self) -> list[str]:
        """Channels (pipeline ids, or ``"*"``) with at least one subscriber."""
        return sorted(self._channels)

    def get_client_count(self, pipeline_id: str) -> int:
        """Clients subscribed to exactly this channel (``"*"`` subscribers not included)."""
        return len(self._channels.get(pipeline_id, ()))

    @property
    def connection_count(self) -> int:
        return len(self._clients)

    @property
    def clients(self) -> list[WebSocketClient]:
        """The connected clients (a copy)."""
        return list(self._clients)

    def stats(self) -> dict[str, Any]:
        """The ``GET /ws/metrics`` document."""
        return {
            "connections": len(self._clients),
            "max_connections": self.max_connections,
            "channels": self.get_channel_ids(),
            "clients_per_channel": {ch: len(c) for ch, c in sorted(self._channels.items())},
            "messages_sent": self._messages_sent,
            "messages_dropped": sum(self._dropped.values()),
            "messages_dropped_by_reason": dict(self._dropped),
            "connections_rejected": sum(self._rejected.values()),
            "connections_rejected_by_reason": dict(self._rejected),
            "slow_consumer_disconnects": self._slow_consumer_disconnects,
            "resume_rereads": self._resume_rereads,
        }

    # ------------------------------------------------------------------ fan-out
    async def broadcast(self, event: BaseEvent) -> None:
        """Queue ``event`` for every interested client. Never waits on a socket."""
        self.broadcast_nowait(event)

    def broadcast_nowait(self, event: BaseEvent) -> int:
        """Synchronous :meth:`broadcast`; returns how many clients it was queued for."""
        pipeline_id = event.pipeline_id
        direct = self._channels.get(pipeline_id)
        wildcard = self._channels.get(ALL) if pipeline_id != ALL else None
        if not direct and not wildcard:
            return 0
        # The transport's id, if any, orders the event against replays; an event without
        # one (single-process bridge, gateway-made) was never replayed and gets a local id.
        event_key = _sort_key(event.id)
        if event.id is None:
            event = event.model_copy(update={"id": f"{self._local_epoch}-{next(self._local_seq)}"})
        event_type = str(getattr(event, "type", type(event).__name__))
        text: str | None = None
        queued = 0
        slow: list[WebSocketClient] = []
        overflowing: list[tuple[WebSocketClient, Subscription]] | None = None
        for clients in (direct, wildcard):
            if not clients:
                continue
            for client in clients:
                if clients is wildcard and direct and client in direct:
                    continue  # already handled with its direct subscription
                verdict = self._route(client, pipeline_id, event_type, event_key)
                if verdict is None:
                    continue
                if text is None:
                    text = event.model_dump_json()
                if verdict is _SEND_NOW:
                    if len(client.outbox) >= self.send_queue_size:
                        slow.append(client)
                        continue
                    client.outbox.append(text)
                    client.wakeup.set()
                else:
                    held = verdict.held
                    if held is None:  # pragma: no cover - _route only parks in resuming subs
                        continue
                    held.append((event_key, text))
                    if len(held) > self.held_limit:
                        if overflowing is None:
                            overflowing = []
                        overflowing.append((client, verdict))
                queued += 1
        for client in slow:
            self._disconnect_slow_consumer(client)
        if overflowing is not None:
            for client, sub in overflowing:
                self._release_held(client, sub)
        return queued

    @staticmethod
    def _route(client: WebSocketClient, pipeline_id: str, event_type: str,
               event_key: tuple[int, int] | None) -> Subscription | None:
        """``_SEND_NOW``: queue it; another Subscription: park it there; None: not wanted."""
        hold: Subscription | None = None
        subscriptions = client.subscriptions
        for sub in (subscriptions.get(pipeline_id), subscriptions.get(ALL)):
            if sub is None or not sub.accepts(event_type):
                continue
            if sub.held is not None:
                hold = hold or sub
                continue
            if sub.floor is not None and event_key is not None:
                if event_key <= sub.floor:
                    continue  # the replay already sent it
                sub.floor = None  # ids only grow: no later event can be a replayed one
            return _SEND_NOW
        return hold

    def _release_held(self, client: WebSocketClient, sub: Subscription) -> None:
        """Too many live events arrived during ``sub``'s replay: let go of them.

        The replay reads them again from the transport, which retains every event the
        gateway consumed (ids from the transport). A client whose socket has taken
        nothing for ``resume_stall_timeout`` while it has messages waiting is closed 4008.
        """
        held = sub.held
        if held is None or client.closing:
            return
        now = time.monotonic()
        if client.delivered != sub.progress or not client.outbox:
            sub.progress, sub.progress_at = client.delivered, now
        elif now - sub.progress_at >= self.resume_stall_timeout:
            self._disconnect_slow_consumer(client, unqueued=0)
            return
        if any(event_key is None for event_key, _ in held):
            # Not from the transport (a bridge's event): it could not be read again.
            self._disconnect_slow_consumer(client, unqueued=0)
            return
        held.clear()
        sub.reread = True
        self._resume_rereads += 1

    def _disconnect_slow_consumer(self, client: WebSocketClient, unqueued: int = 1) -> None:
        """Close ``client`` 4008; ``unqueued``: messages for it that were never queued."""
        if client.closing:
            return
        self._slow_consumer_disconnects += 1
        # The message that did not fit, what is parked for resumes, then the outbox.
        parked = sum(len(sub.held) for sub in client.subscriptions.values() if sub.held)
        self._count_dropped(WS_DROP_SLOW_CONSUMER, unqueued + parked)
        logger.info("closing slow WebSocket consumer (%d messages dropped)",
                    unqueued + parked + len(client.outbox))
        self.request_close(client, CLOSE_SLOW_CONSUMER, "slow consumer", discard=True,
                           drop_reason=WS_DROP_SLOW_CONSUMER)
        # A peer that never reads again blocks its writer in send(), so the 4008 can never
        # be written and the connection would hold its slot forever: give up on it after a
        # while (long enough for a slow reader that drains later to still get its 4008).
        asyncio.get_running_loop().call_later(self.stalled_client_timeout, self._abandon, client)

    @staticmethod
    def _abandon(client: WebSocketClient) -> None:
        """Stop the client's tasks; its session then drops the connection."""
        if client.finished.is_set():
            return
        for task in (client.writer, client.reader):
            if task is not None and not task.done():
                task.cancel()

    def _count_dropped(self, reason: str, count: int) -> None:
        if count <= 0:
            return
        self._dropped[reason] = self._dropped.get(reason, 0) + count
        self.metrics.ws_messages_dropped(reason, count)

    # ------------------------------------------------------------------ clients
    def register(self, websocket: WebSocket) -> WebSocketClient | None:
        """A new client, or None when ``max_connections`` are already open."""
        if len(self._clients) >= self.max_connections:
            return None
        client = WebSocketClient(websocket)
        self._clients.add(client)
        self.metrics.ws_connected()
        return client

    def unregister(self, client: WebSocketClient) -> None:
        """Forget ``client`` (idempotent); its tasks are the caller's to stop."""
        self._drop_subscriptions(client)
        if client in self._clients:
            self._clients.discard(client)
            self.metrics.ws_disconnected()

    def count_rejected(self, reason: str) -> None:
        """A refused connection; ``reason`` is limit, auth or origin."""
        self._rejected[reason] = self._rejected.get(reason, 0) + 1
        self.metrics.ws_connection_rejected(reason)

    def subscribe(self, client: WebSocketClient, pipeline_id: str,
                  event_types: frozenset[str] | None, resuming: bool = False) -> Subscription:
        """Add or replace ``client``'s subscription to ``pipeline_id``."""
        sub = Subscription(pipeline_id, event_types, resuming)
        if resuming:
            sub.progress, sub.progress_at = client.delivered, time.monotonic()
        if client.closing:
            return sub  # detached: a closing client receives nothing more
        client.subscriptions[pipeline_id] = sub
        self._channels.setdefault(pipeline_id, set()).add(client)
        return sub

    def unsubscribe(self, client: WebSocketClient, pipeline_id: str) -> bool:
        if client.subscriptions.pop(pipeline_id, None) is None:
            return False
        self._leave_channel(client, pipeline_id)
        return True

    def finish_resume(self, client: WebSocketClient, sub: Subscription,
                      last_replayed: str | None) -> None:
        """Go live after a replay that ended at ``last_replayed``, without gap or duplicate."""
        held, sub.held = sub.held or [], None
        floor = _sort_key(last_replayed)
        if client.subscriptions.get(sub.pipeline_id) is not sub or client.closing:
            return  # unsubscribed or replaced meanwhile
        for event_key, text in held:
            if floor is not None and event_key is not None:
                if event_key <= floor:
                    continue
                floor = None
            if not self.send_nowait(client, text):
                return
        sub.floor = floor

    def _drop_subscriptions(self, client: WebSocketClient) -> None:
        for pipeline_id in list(client.subscriptions):
            self._leave_channel(client, pipeline_id)
        client.subscriptions.clear()

    def _leave_channel(self, client: WebSocketClient, pipeline_id: str) -> None:
        members = self._channels.get(pipeline_id)
        if members is not None:
            members.discard(client)
            if not members:
                del self._channels[pipeline_id]

    # ------------------------------------------------------------------ sending
    def send_nowait(self, client: WebSocketClient, text: str) -> bool:
        """Queue one message for ``client``; a full outbox makes it a slow consumer."""
        if client.closing:
            return False
        if len(client.outbox) >= self.send_queue_size:
            self._disconnect_slow_consumer(client)
            return False
        client.outbox.append(text)
        client.wakeup.set()
        return True

    def resuming(self, client: WebSocketClient, sub: Subscription) -> bool:
        """``sub`` is still ``client``'s subscription and still waits for its replay."""
        return (not client.closing and sub.held is not None
                and client.subscriptions.get(sub.pipeline_id) is sub)

    async def send_when_ready(self, client: WebSocketClient, text: str) -> bool:
        """Queue one replayed message, waiting while the outbox holds ``replay_limit``.

        Replay leaves the rest of the outbox to the live events held meanwhile, so a
        resume never turns a healthy client into a "slow consumer". False once the
        client is closing.
        """
        limit = self.replay_limit
        while len(client.outbox) >= limit:
            if client.closing:
                return False
            client.space.clear()
            client.want_space = True
            await client.space.wait()
        if client.closing:
            return False
        client.outbox.append(text)
        client.wakeup.set()
        return True

    def request_close(self, client: WebSocketClient, code: int, reason: str = "",
                      discard: bool = False, drop_reason: str | None = None) -> None:
        """Close ``client`` after its queued messages (or at once with ``discard``).

        The client stops receiving broadcasts immediately. The first close code wins.
        Discarded messages are counted as dropped (``drop_reason``, default by code).
        """
        if discard and client.outbox:
            if drop_reason is None:
                drop_reason = WS_DROP_SHUTDOWN if code == CLOSE_GOING_AWAY else WS_DROP_CLOSED
            self._count_dropped(drop_reason, len(client.outbox))
            client.outbox.clear()
        if client.close_request is None:
            client.close_request = (code, reason)
        self._drop_subscriptions(client)
        client.wakeup.set()
        client.space.set()

    def start_writer(self, client: WebSocketClient) -> asyncio.Task[None]:
        client.writer = asyncio.create_task(self._write_loop(client),
                                            name="flowtrace-ws-writer")
        return client.writer

    async def _write_loop(self, client: WebSocketClient) -> None:
        """Drain ``client.outbox`` to the socket, then send the requested close."""
        websocket, outbox = client.websocket, client.outbox
        sent = 0
        try:
            while True:
                if not outbox:
                    if sent:
                        self._count_sent(sent)
                        sent = 0
                    if client.close_request is not None:
                        break
                    client.wakeup.clear()
                    await client.wakeup.wait()
                    continue
                text = outbox.popleft()
                if client.want_space:
                    client.want_space = False
                    client.space.set()
                await websocket.send_text(text)
                client.delivered += 1
                sent += 1
                if sent >= _SENT_FLUSH_EVERY:
                    self._count_sent(sent)
                    sent = 0
            code, reason = client.close_request
            with contextlib.suppress(*_SEND_ERRORS):
                await websocket.close(code=code, reason=reason)
        except _SEND_ERRORS as exc:
            # The peer is gone; make sure nothing else is queued for it.
            logger.debug("WebSocket send failed: %r", exc)
            if client.close_request is None:
                client.close_request = (CLOSE_GOING_AWAY, "")
            self._drop_subscriptions(client)
            client.outbox.clear()
            client.space.set()
        finally:
            if sent:
                self._count_sent(sent)

    def _count_sent(self, count: int) -> None:
        self._messages_sent += count
        self.metrics.ws_messages_sent(count)

    # ------------------------------------------------------------------ shutdown
    async def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutdown",
                        timeout: float | None = None) -> None:
        """Close every client with ``code`` and wait until their tasks have ended.

        A client whose close cannot be written (it stopped reading) is given up on
        after ``timeout`` (default ``close_timeout``): its tasks are cancelled and its
        session drops the connection, so that the server does not wait for it either.
        """
        clients = list(self._clients)
        if not clients:
            return
        for client in clients:
            self.request_close(client, code, reason, discard=True)
        wait = self.close_timeout if timeout is None else timeout
        waiters = [asyncio.ensure_future(client.finished.wait()) for client in clients]
        try:
            _, pending = await asyncio.wait(waiters, timeout=wait)
            if pending:
                # Stuck (a peer that stopped reading blocks its writer): cancel their tasks.
                tasks = [task for client in clients if not client.finished.is_set()
                         for task in (client.writer, client.reader)
                         if task is not None and not task.done()]
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.wait(tasks)
                await asyncio.wait(pending, timeout=1.0)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)


def _sort_key(event_id: str | None) -> tuple[int, int] | None:
    """``id_sort_key`` that answers None for a missing or unparsable id."""
    if event_id is None:
        return None
    try:
        return id_sort_key(event_id)
    except ValueError:
        return None


def normalize_origin(origin: str) -> str:
    """``https://Example.com/`` and ``https://example.com`` are the same origin."""
    return origin.strip().rstrip("/").lower()


_default_manager: FastAPIWebSocketManager | None = None


def get_fastapi_ws_manager() -> FastAPIWebSocketManager:
    """The process-default manager (created on first use, default limits)."""
    global _default_manager
    if _default_manager is None:
        _default_manager = FastAPIWebSocketManager()
    return _default_manager


__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TRY_AGAIN_LATER",
    "FastAPIWebSocketManager",
    "RunStoreLike",
    "Subscription",
    "WebSocketClient",
    "get_fastapi_ws_manager",
    "normalize_origin",
]
