"""Example taskiq worker, instrumented with flowtrace.

Run it (Redis at ``REDIS_URL``, events to the gateway through ``FLOWTRACE_REDIS_URL``,
traces to ``OTEL_EXPORTER_OTLP_ENDPOINT``)::

    taskiq worker examples.fleet.worker:broker --workers 2

The tasks form an ETL pipeline (see ``api.py``): ``extract`` reads a batch,
``transform`` validates and converts it (and fails on bad input), ``load`` stores it
(and, when asked, fails its first attempt so that taskiq retries it).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq import Context, SimpleRetryMiddleware, TaskiqDepends
from taskiq_pipelines import PipelineMiddleware
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

import flowtrace

logger = logging.getLogger("examples.fleet.worker")

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

result_backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
    REDIS_URL,
    result_ex_time=3600,  # results (and taskiq-pipelines' step results) expire after an hour
)


class PollingListQueueBroker(ListQueueBroker):
    """``ListQueueBroker`` whose BRPOP returns every ``poll_timeout`` seconds.

    taskiq-redis 1.2.4's ``ListQueueBroker.listen`` issues ``BRPOP queue 0`` (block
    forever) and has no keyword for a server-side timeout, which leaves two bad
    choices with redis-py 8:

    * the default ``socket_timeout`` (5 s) makes an idle worker's BRPOP raise
      ``redis.TimeoutError``, which ``listen`` does not catch: the worker process
      dies every 5 s and taskiq's process manager restarts it;
    * ``socket_timeout=None`` keeps idle workers alive but hangs SIGTERM: taskiq
      installs a plain ``signal.signal`` handler that sets an ``asyncio.Event``, and
      an event loop blocked in an endless read never wakes up to notice it.

    A 1 s server-side BRPOP timeout avoids both: the read always returns (an empty
    reply while idle), SIGTERM is noticed within a second, the 5 s socket timeout
    still detects a dead Redis, and Redis errors are retried instead of ending the
    worker. No message can be lost to a client-side timeout either, since the
    server, not the client, ends an idle wait.
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
                logger.warning("Redis unavailable (%s); retrying in 1 s", exc)
                await asyncio.sleep(1)
                continue
            if item is not None:
                yield item[1]


broker = PollingListQueueBroker(
    REDIS_URL,
    queue_name="flowtrace-fleet",
    socket_timeout=5,  # above poll_timeout: an idle BRPOP returns before it
    socket_connect_timeout=5,
    health_check_interval=30,  # PING a connection idle for 30 s before reusing it
).with_result_backend(result_backend)
broker.add_middlewares(
    SimpleRetryMiddleware(default_retry_count=3),
    PipelineMiddleware(),
)

# Events go to Redis when FLOWTRACE_REDIS_URL is set (the gateway reads them there);
# traces go over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set.
flowtrace_middleware = flowtrace.instrument(broker, service_name="fleet-worker")


async def _io(low: float = 0.01, high: float = 0.2) -> None:
    """Stand-in for a network call."""
    await asyncio.sleep(random.uniform(low, high))


@broker.task(task_name="fleet.extract")
async def extract(source: dict[str, Any]) -> dict[str, Any]:
    """Read a batch: ``{"records": [...], "flaky": bool}`` -> ``{"rows": [...], ...}``."""
    await _io()
    rows = list(source.get("records") or [])
    return {"rows": rows, "flaky": bool(source.get("flaky", False))}


@broker.task(task_name="fleet.transform")
async def transform(batch: dict[str, Any]) -> dict[str, Any]:
    """Validate every row (a numeric ``value`` is required) and convert it."""
    await _io()
    out = []
    for index, row in enumerate(batch["rows"]):
        value = row.get("value") if isinstance(row, dict) else None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"invalid input: row {index} has no numeric 'value'")
        out.append({**row, "value": float(value), "value_x2": float(value) * 2})
    return {"rows": out, "flaky": batch.get("flaky", False)}


@broker.task(task_name="fleet.load", retry_on_error=True, max_retries=3)
async def load(
    batch: dict[str, Any], context: Annotated[Context, TaskiqDepends()]
) -> dict[str, Any]:
    """Store the batch. With ``flaky`` set the first attempt fails and taskiq retries."""
    await _io(0.05, 0.3)
    attempt = int(context.message.labels.get("_retries", 0)) + 1
    if batch.get("flaky") and attempt == 1:
        raise ConnectionError("warehouse unavailable, will retry")
    rows = batch["rows"]
    return {"loaded": len(rows), "total": sum(row["value"] for row in rows)}


__all__ = ["broker", "extract", "flowtrace_middleware", "load", "transform"]
