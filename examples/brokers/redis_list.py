"""taskiq-redis ``ListQueueBroker`` + Redis results, made to survive idle periods.

    taskiq worker examples.brokers.redis_list:broker --workers 2

Prefer ``redis_stream`` (``RedisStreamBroker``): a list has no acknowledgement, so a
message popped by a worker that then dies is gone (the run never ends; the gateway
declares it ``LOST`` after ``stale_after``).

The trap with redis-py 8 and taskiq-redis 1.2.4: ``ListQueueBroker.listen`` blocks in
``BRPOP queue 0`` (forever) and only survives the builtin ``ConnectionError``. With
redis-py 8's default 5 s ``socket_timeout`` every worker idle for 5 s dies of
``redis.exceptions.TimeoutError`` (taskiq restarts it, and again 5 s later). With
``socket_timeout=None`` it lives, but on asyncio's default event loop an idle worker
sleeps through SIGTERM: taskiq's handler only sets an ``asyncio.Event``, and nothing
wakes the loop from its endless read (uvloop, which taskiq uses when it is installed,
does wake up). :class:`PollingListQueueBroker` asks Redis itself to end each wait after
a second (and ``settings.redis_broker_connection`` explains why there is no socket
timeout at all on Python < 3.12).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

import flowtrace
from examples.brokers.settings import (
    RESULT_TTL_S,
    queue_name,
    redis_broker_connection,
    redis_url,
)
from examples.brokers.tasks import setup_broker

logger = logging.getLogger(__name__)


class PollingListQueueBroker(ListQueueBroker):
    """``ListQueueBroker`` whose BRPOP returns (empty) every ``poll_timeout`` seconds.

    The read always ends before the client's socket timeout, SIGTERM is noticed within
    a second, a dead Redis is still detected (and retried, not fatal), and no message
    can be lost to a client-side timeout since the server, not the client, ends a wait.
    """

    def __init__(self, url: str, *, poll_timeout: int = 1, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.poll_timeout = poll_timeout

    async def listen(self) -> AsyncGenerator[bytes, None]:
        while True:
            try:
                async with Redis(connection_pool=self.connection_pool) as conn:
                    item = await conn.brpop([self.queue_name], timeout=self.poll_timeout)
            except (RedisConnectionError, RedisTimeoutError) as exc:
                logger.warning("Redis unavailable (%r); retrying in 1 s", exc)
                await asyncio.sleep(1)
                continue
            if item is not None:
                _, message = item
                yield message if isinstance(message, bytes) else message.encode()


def make_broker(url: str | None = None, queue: str | None = None) -> PollingListQueueBroker:
    """The broker, its result backend and the example tasks (no flowtrace yet)."""
    url = url or redis_url()
    backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        url, result_ex_time=RESULT_TTL_S)
    broker = PollingListQueueBroker(
        url, queue_name=queue or queue_name(),
        **redis_broker_connection(),  # a socket timeout, if any, is above poll_timeout
    ).with_result_backend(backend)
    return setup_broker(broker)


broker = make_broker()
flowtrace_middleware = flowtrace.instrument(broker)
