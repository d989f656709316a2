"""A real taskiq-redis fleet for the tracing tests (``tests/test_tracing.py``).

Workers run it as ``taskiq worker tests.fleet_app.tracing_worker:broker``, configured
only by the environment: ``TEST_REDIS_URL`` for the broker, results and flowtrace's
event stream, and the standard ``OTEL_*`` variables for trace export. The test process
imports the same module to kick the pipelines (see :func:`make_broker`).
"""

from __future__ import annotations

import logging
import os
from typing import Annotated, Any

from opentelemetry import trace
from taskiq import AsyncBroker, Context, SimpleRetryMiddleware, TaskiqDepends
from taskiq_pipelines import PipelineMiddleware
from taskiq_redis import RedisAsyncResultBackend

import flowtrace
from examples.brokers.redis_list import PollingListQueueBroker
from examples.brokers.settings import redis_broker_connection

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("TEST_QUEUE", "flowtrace-tracing")
RESULT_TTL_S = 600
logger = logging.getLogger(__name__)

CONNECTION_KWARGS: dict[str, Any] = redis_broker_connection()


def make_broker(redis_url: str = REDIS_URL, *, queue: str = QUEUE) -> AsyncBroker:
    """The fleet's broker, result backend and pipeline/retry middlewares, no flowtrace."""
    backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        redis_url, result_ex_time=RESULT_TTL_S, **CONNECTION_KWARGS,
    )
    new_broker = PollingListQueueBroker(redis_url, queue_name=queue, **CONNECTION_KWARGS)
    new_broker = new_broker.with_result_backend(backend)
    new_broker.add_middlewares(PipelineMiddleware(), SimpleRetryMiddleware(default_retry_count=3))
    register_tasks(new_broker)
    return new_broker


def register_tasks(target: AsyncBroker) -> None:
    """Register the test tasks on ``target`` (a worker's and a kicker's broker alike)."""

    @target.task(task_name="tracing.produce")
    async def produce(count: int) -> list[int]:
        return list(range(count))

    @target.task(task_name="tracing.square")
    async def square(value: int) -> int:
        return value * value

    @target.task(task_name="tracing.is_even")
    async def is_even(value: int) -> bool:
        return value % 2 == 0

    @target.task(task_name="tracing.explode")
    async def explode(values: list[int]) -> list[int]:
        raise ValueError(f"invalid input: {len(values)} values")

    @target.task(task_name="tracing.flaky", retry_on_error=True, max_retries=3)
    async def flaky(values: list[int], context: Annotated[Context, TaskiqDepends()]) -> int:
        # SimpleRetryMiddleware re-kicks a failed attempt with ``_retries`` = attempts so far.
        if int(context.message.labels.get("_retries", 0) or 0) == 0:
            raise RuntimeError("first attempt fails")
        return sum(values)

    @target.task(task_name="tracing.pokes_current_span")
    async def pokes_current_span(values: list[int]) -> dict[str, Any]:
        """What user code may do with the span current in a step: it is not recording, so
        none of it changes the step's span (which flowtrace records itself)."""
        span = trace.get_current_span()
        span.set_attribute("user.attribute", 1)
        span.set_attributes({"user.other": 2})
        span.add_event("user-event", {"n": 1})
        span.record_exception(ValueError("user error"))
        span.set_status(trace.StatusCode.ERROR, "user status")
        span.update_name("renamed by user")
        span.end()
        context = span.get_span_context()
        return {"recording": span.is_recording(), "trace_id": f"{context.trace_id:032x}",
                "span_id": f"{context.span_id:016x}"}

    @target.task(task_name="tracing.with_user_span")
    async def with_user_span(values: list[int]) -> int:
        tracer = trace.get_tracer("tests.fleet_app")
        with tracer.start_as_current_span("user-span") as span:
            span.set_attribute("test.values", len(values))
            return len(values)


_worker_broker: AsyncBroker | None = None


def worker_broker() -> AsyncBroker:
    """The instrumented broker workers run: built on first use, so importing has no effects."""
    global _worker_broker
    if _worker_broker is None:
        _worker_broker = make_broker()
        flowtrace.instrument(_worker_broker, redis_url=REDIS_URL)
    return _worker_broker


def __getattr__(name: str) -> Any:
    # ``taskiq worker tests.fleet_app.tracing_worker:broker`` resolves ``broker`` here.
    if name == "broker":
        return worker_broker()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
