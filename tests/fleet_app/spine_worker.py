"""A real taskiq-redis worker app for the cross-process spine tests.

``TEST_REDIS_URL`` is the broker and result backend; ``FLOWTRACE_REDIS_URL``
is where flowtrace publishes events (a separate server in some tests). The tasks
are the broker examples' (``examples/brokers/tasks.py``) plus one whose result
cannot be stored.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

import flowtrace
from examples.brokers.settings import redis_broker_connection
from examples.brokers.tasks import Tasks, setup_broker
from flowtrace.transport import RedisStreamTransport

BROKER_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# XREADGROUP blocks 1 s, well under redis-py 8's 5 s default socket timeout, so
# idle workers stay alive and SIGTERM shutdown is prompt.
broker = setup_broker(
    RedisStreamBroker(BROKER_URL, xread_block=1000, xread_count=1, idle_timeout=5_000,
                      **redis_broker_connection()).with_result_backend(
        RedisAsyncResultBackend(BROKER_URL)))
# TEST_METRICS_PORT: every worker process serves its own counters from this port up.
METRICS_PORT = os.environ.get("TEST_METRICS_PORT")
# TEST_LINGER_MS: how long this process's events and item counts may wait for a batch
# (flowtrace's default is a few ms; longer makes cross-process races show every time).
LINGER_MS = os.environ.get("TEST_LINGER_MS")
middleware = flowtrace.instrument(
    broker, metrics_port=int(METRICS_PORT) if METRICS_PORT else None,
    transport=RedisStreamTransport(os.environ["FLOWTRACE_REDIS_URL"], linger_ms=float(LINGER_MS))
    if LINGER_MS else None)

_tasks = Tasks.of(broker)
extract, double, where, is_big = _tasks.extract, _tasks.double, _tasks.where, _tasks.is_big
total, explode, flaky, slow = _tasks.total, _tasks.explode, _tasks.flaky, _tasks.slow


@broker.task(task_name="odd_fails")
async def odd_fails(x: int) -> int:
    """A map item (or filter predicate) that fails for odd numbers, after the others."""
    if x % 2:
        await asyncio.sleep(0.05)
        raise ValueError(f"{x} is odd")
    return x + 1


@broker.task(task_name="unstorable")
async def unstorable(_: Any) -> Any:
    return threading.Lock()  # the result backend cannot pickle a lock
