"""The worker of :mod:`benchmarks.broker`: ``taskiq worker benchmarks.broker_app:broker``.

A taskiq-redis ``RedisStreamBroker`` with a Redis result backend and one no-op task, and
the middlewares of one variant, chosen by the parent through the environment:

- ``FLOWTRACE_BENCH_VARIANT``: ``bare``, ``otel_prom`` or ``flowtrace`` (as in
  :mod:`benchmarks.overhead`; flowtrace publishes its events to the queue's Redis, as a
  fleet's workers do);
- ``FLOWTRACE_BENCH_REDIS``: the queue's (and flowtrace's) Redis;
  ``FLOWTRACE_BENCH_RESULTS``: the results' database; ``FLOWTRACE_BENCH_QUEUE``: the stream.

The parent kicks with the same builders (:func:`make_broker`, :func:`add_middlewares`),
so the worker sees the labels an instrumented kicker writes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from taskiq import AsyncBroker
from taskiq_pipelines import PipelineMiddleware
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from benchmarks.common import free_port
from examples.brokers.settings import redis_broker_connection

VARIANTS = ("bare", "otel_prom", "flowtrace")
VARIANT_ENV = "FLOWTRACE_BENCH_VARIANT"


def make_broker(url: str, results_url: str, queue: str) -> RedisStreamBroker:
    """taskiq-redis's defaults (up to 100 messages per read), reads that end every second."""
    broker = RedisStreamBroker(url, queue_name=queue, xread_block=1000,
                               **redis_broker_connection())
    broker = broker.with_result_backend(RedisAsyncResultBackend(results_url))

    @broker.task(task_name="noop")
    async def noop() -> None:
        return None

    return broker


def add_middlewares(broker: AsyncBroker, variant: str, provider: Any, url: str,
                    worker: bool) -> Any:
    """The variant's middlewares (the kicker's part of them when not ``worker``); returns
    flowtrace's middleware, or None."""
    if variant == "bare":
        broker.add_middlewares(PipelineMiddleware())
        return None
    if variant == "otel_prom":
        from taskiq.middlewares.opentelemetry_middleware import OpenTelemetryMiddleware

        broker.add_middlewares(PipelineMiddleware(),
                               OpenTelemetryMiddleware(tracer_provider=provider))
        if worker:
            from taskiq.middlewares import PrometheusMiddleware

            broker.add_middlewares(PrometheusMiddleware(
                metrics_path=Path(tempfile.mkdtemp(prefix="flowtrace-bench-prom-")),
                server_port=free_port(), server_addr="127.0.0.1"))
        return None
    if variant == "flowtrace":
        from flowtrace import FlowtraceMiddleware
        from flowtrace.transport.redis_stream import RedisStreamTransport

        broker.add_middlewares(PipelineMiddleware())
        middleware = FlowtraceMiddleware(transport=RedisStreamTransport(url),
                                         tracer_provider=provider)
        broker.add_middlewares(middleware)
        middleware.ensure_placement()
        return middleware
    raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")


def _worker_broker() -> RedisStreamBroker:
    from benchmarks.overhead import span_provider

    url = os.environ["FLOWTRACE_BENCH_REDIS"]
    broker = make_broker(url, os.environ["FLOWTRACE_BENCH_RESULTS"],
                         os.environ["FLOWTRACE_BENCH_QUEUE"])
    provider, _ = span_provider("batch", "discard")  # as a network exporter: nothing kept
    add_middlewares(broker, os.environ[VARIANT_ENV], provider, url, worker=True)
    return broker


# Built only in the worker: the parent imports this module for its builders.
broker = _worker_broker() if VARIANT_ENV in os.environ else None
