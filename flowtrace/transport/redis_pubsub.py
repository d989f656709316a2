"""Redis pub/sub transport (seed compatibility): at-most-once, no replay.

Events published while a subscriber is disconnected are lost for it; ``since``
is ignored. Publishing is buffered and shipped in the background exactly like
the stream transport. Ids are a counter of this transport object, so they only
grow, also across resubscriptions; they mean nothing to another process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import redis
from redis.asyncio import Redis

from flowtrace.events import Event
from flowtrace.transport import _sender
from flowtrace.transport._sender import (
    Backoff,
    Outage,
    SenderBackedTransport,
    check_cancelled,
)
from flowtrace.transport.base import FROM_BEGINNING

_POLL_S = 1.0
_SOCKET_TIMEOUT_S = 5.0


def _asyncio_client(client: object) -> tuple[Redis, bool]:
    """The asyncio client to use for ``client``, and whether the transport made it.

    Awaiting a synchronous client's calls fails on every publish ("object int can't be
    used in 'await' expression"), which looked like an outage that never ends.
    """
    if isinstance(client, Redis):
        return client, False
    if isinstance(client, str):
        return _sender.make_client(client, _SOCKET_TIMEOUT_S), True
    if isinstance(client, redis.Redis):  # its server, database and credentials
        settings = client.connection_pool.connection_kwargs
        where: dict[str, Any] = (
            {"unix_socket_path": settings["path"]} if "path" in settings else
            {"host": settings.get("host", "localhost"), "port": settings.get("port", 6379),
             "ssl": issubclass(client.connection_pool.connection_class, redis.SSLConnection)})
        return Redis(db=settings.get("db", 0), username=settings.get("username"),
                     password=settings.get("password"), socket_timeout=_SOCKET_TIMEOUT_S,
                     socket_connect_timeout=_SOCKET_TIMEOUT_S, **where), True
    raise TypeError(f"RedisPubSubTransport needs a redis.asyncio.Redis (or a redis.Redis, or "
                    f"a redis:// URL), got {type(client).__name__}")
_CLOSE_WAIT_S = 2.0


class RedisPubSubTransport(SenderBackedTransport):
    """Events on one Redis pub/sub channel.

    ``redis_client`` is a ``redis.asyncio.Redis``, which the caller owns (it is not
    closed here); a synchronous ``redis.Redis`` (as in the reference design) or a URL
    stands for the same server, reached through an asyncio client of the transport's
    own. ``linger_ms`` as on :class:`~flowtrace.transport.redis_stream.RedisStreamTransport`.
    """

    def __init__(self, redis_client: Redis | redis.Redis | str,
                 channel: str = "flowtrace:events", *, buffer_size: int = 10_000,
                 batch_size: int = 500, linger_ms: float = _sender.LINGER_MS) -> None:
        super().__init__()
        self.channel = channel
        client, self._owns_client = _asyncio_client(redis_client)
        self._start_sender(client, f"flowtrace publisher ({channel})", buffer_size,
                           batch_size, linger_ms)
        self._seq = 0
        self._closed = False

    def publish_prefix(self) -> _sender.Command:
        return ("PUBLISH", self.channel)

    async def close(self) -> None:
        """Ship what is buffered (≤ 2 s) and stop; subscribers end within a second."""
        self._closed = True
        await self._sender.close(_CLOSE_WAIT_S)
        if self._owns_client:
            await self._client.aclose()

    def subscribe(self, since: str | None = None) -> AsyncIterator[Event]:
        """Events published once the iterator is subscribed (on its first ``anext``).

        ``since`` is ignored: pub/sub keeps nothing to replay.
        """
        return self._follow()

    def replay(self, since: str, pipeline_id: str | None = None) -> AsyncIterator[Event]:
        """Nothing: pub/sub retains no history."""
        return _nothing()

    async def _follow(self) -> AsyncIterator[Event]:
        outage = Outage(f"flowtrace subscriber ({self.channel})")
        backoff = Backoff()
        while not self._closed:
            try:
                async with self._client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self.channel)
                    check_cancelled()
                    outage.ok()
                    backoff.reset()
                    while not self._closed:
                        message = await pubsub.get_message(timeout=_POLL_S)
                        check_cancelled()
                        if message is None or message.get("type") != "message":
                            continue
                        event = _sender.decode_event(message.get("data"), self._count_drop,
                                                     f"channel {self.channel}")
                        if event is not None:
                            self._seq += 1
                            yield event.model_copy(update={"id": str(self._seq)})
            except Exception as exc:  # noqa: BLE001 - outage: resubscribe after a delay
                check_cancelled()
                outage.failed(exc)
                await backoff.sleep()

    def history_is_truncated(self, since: str) -> bool:
        """True unless ``since`` is ``FROM_BEGINNING``: pub/sub retains nothing to resume from."""
        return since != FROM_BEGINNING


async def _nothing() -> AsyncIterator[Event]:
    return
    yield  # an async generator that yields nothing
