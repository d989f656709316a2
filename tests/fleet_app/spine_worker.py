"""A real taskiq-redis worker app for the cross-process spine tests.

``TEST_REDIS_URL`` is the broker and result backend; ``FLOWTRACE_REDIS_URL``
is where flowtrace publishes events (a separate server in some tests).
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from taskiq import Context, TaskiqDepends
from taskiq.middlewares import SimpleRetryMiddleware
from taskiq_pipelines import PipelineMiddleware
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

import flowtrace
from examples.brokers.settings import redis_broker_connection

BROKER_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

# XREADGROUP blocks 1 s, well under redis-py 8's 5 s default socket timeout, so
# idle workers stay alive and SIGTERM shutdown is prompt.
broker = RedisStreamBroker(BROKER_URL, xread_block=1000, xread_count=1, idle_timeout=5_000,
                           **redis_broker_connection()).with_result_backend(
    RedisAsyncResultBackend(BROKER_URL))
broker.add_middlewares(PipelineMiddleware(), SimpleRetryMiddleware(default_retry_count=3))
middleware = flowtrace.instrument(broker)


@broker.task(task_name="extract")
async def extract(n: int) -> list[int]:
    await asyncio.sleep(0.01)
    return list(range(n))


@broker.task(task_name="where")
async def where(x: int) -> int:
    """An item that takes long enough for both worker processes to get some."""
    await asyncio.sleep(0.3)
    return os.getpid()


@broker.task(task_name="double")
async def double(x: int) -> int:
    await asyncio.sleep(0.01)
    return x * 2


@broker.task(task_name="is_big")
async def is_big(x: int) -> bool:
    await asyncio.sleep(0.05)
    return x >= 4


@broker.task(task_name="total")
async def total(xs: list[int]) -> int:
    return sum(xs)


@broker.task(task_name="explode")
async def explode(_: Any) -> int:
    raise ValueError("invalid input")


@broker.task(task_name="flaky", retry_on_error=True, max_retries=3)
async def flaky(x: Any, context: Context = TaskiqDepends()) -> str:
    if int(context.message.labels.get("_retries", 0)) == 0:
        raise ConnectionError("first attempt fails")
    return "ok"


@broker.task(task_name="unstorable")
async def unstorable(_: Any) -> Any:
    return threading.Lock()  # the result backend cannot pickle a lock


@broker.task(task_name="slow")
async def slow(seconds: float) -> float:
    await asyncio.sleep(seconds)
    return seconds
