"""Example taskiq worker, instrumented with flowtrace.

Run it (Redis at ``REDIS_URL``, events to the gateway through ``FLOWTRACE_REDIS_URL``,
traces to ``OTEL_EXPORTER_OTLP_ENDPOINT``, a dead worker's step redelivered after
``BROKER_REDELIVER_AFTER_S``)::

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
from typing import Annotated, Any

from taskiq import Context, SimpleRetryMiddleware, TaskiqDepends
from taskiq_pipelines import PipelineMiddleware
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

import flowtrace
from examples.brokers.settings import redeliver_after_s, redis_broker_connection

logger = logging.getLogger("examples.fleet.worker")

REDIS_URL = os.environ.get("REDIS_URL", "redis://localhost:6379/0")

result_backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
    REDIS_URL,
    result_ex_time=3600,  # results (and taskiq-pipelines' step results) expire after an hour
)


# A Redis stream with a consumer group (the README's recommended Redis broker): a step
# whose worker dies is acknowledged by nobody and runs again on another worker after
# BROKER_REDELIVER_AFTER_S (default 300 s), instead of being lost with its run.
broker = RedisStreamBroker(
    REDIS_URL,
    queue_name="flowtrace-fleet",
    xread_block=1000,  # each read ends within 1 s: idle workers live and heed SIGTERM
    xread_count=1,  # one message at a time; the rest stay for the other workers
    idle_timeout=int(redeliver_after_s() * 1000),
    unacknowledged_lock_timeout=10,
    health_check_interval=30,  # PING a connection idle for 30 s before reusing it
    **redis_broker_connection(),  # no worker that ignores SIGTERM: see its docstring
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
