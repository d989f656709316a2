"""taskiq-redis ``RedisStreamBroker`` (the recommended Redis broker) + Redis results.

    taskiq worker examples.brokers.redis_stream:broker --workers 2

A Redis stream with a consumer group: a message is acknowledged once its result is
saved, and one that a dead worker left unacknowledged is claimed again by another
worker after ``BROKER_REDELIVER_AFTER_S`` (``idle_timeout``).
"""

from __future__ import annotations

from typing import Any

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

import flowtrace
from examples.brokers.settings import (
    RESULT_TTL_S,
    queue_name,
    redeliver_after_s,
    redis_broker_connection,
    redis_url,
)
from examples.brokers.tasks import setup_broker


def make_broker(url: str | None = None, queue: str | None = None) -> RedisStreamBroker:
    """The broker, its result backend and the example tasks (no flowtrace yet)."""
    url = url or redis_url()
    backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        url, result_ex_time=RESULT_TTL_S)
    broker = RedisStreamBroker(
        url,
        queue_name=queue or queue_name(),
        # XREADGROUP blocks 1 s, well under redis-py 8's 5 s default socket timeout:
        # an idle worker neither times out nor misses a SIGTERM for long.
        xread_block=1000,
        xread_count=1,  # take one message at a time, leave the rest to other workers
        # A message unacknowledged this long is taken over by another worker (XAUTOCLAIM),
        # which only happens right after a worker received new messages.
        idle_timeout=int(redeliver_after_s() * 1000),
        # The XAUTOCLAIM lock expires on its own if a worker dies holding it.
        unacknowledged_lock_timeout=10,
        **redis_broker_connection(),  # see settings.py: SIGTERM on Python < 3.12
    ).with_result_backend(backend)
    return setup_broker(broker)


broker = make_broker()
flowtrace_middleware = flowtrace.instrument(broker)
