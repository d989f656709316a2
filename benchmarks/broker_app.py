"""The worker of :mod:`benchmarks.broker`: ``taskiq worker benchmarks.broker_app:broker``.

A taskiq-redis ``RedisStreamBroker`` with a Redis result backend and one no-op task, and
the middlewares of one variant, chosen by the parent through the environment:

- ``FLOWTRACE_BENCH_VARIANT``: ``bare``, ``otel_prom`` or ``flowtrace`` (as in
  :mod:`benchmarks.overhead`; flowtrace publishes its events to the queue's Redis, as a
  fleet's workers do), or ``flowtrace_in_process``: flowtrace with its events kept in the
  process (the in-memory transport), to show what publishing them to Redis costs;
- ``FLOWTRACE_BENCH_REDIS``: the queue's (and flowtrace's) Redis;
  ``FLOWTRACE_BENCH_RESULTS``: the results' database; ``FLOWTRACE_BENCH_QUEUE``: the stream.

The parent kicks with the same builders (:func:`make_broker`, :func:`add_middlewares`),
so the worker sees the labels an instrumented kicker writes.
"""

from __future__ import annotations

import os
import tempfile
from typing import cast

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from taskiq import AsyncBroker
from taskiq_pipelines import PipelineMiddleware
from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

import flowtrace
from benchmarks.overhead import otel_prom_middlewares, span_provider
from examples.brokers.settings import redis_broker_connection
from flowtrace import FlowtraceMiddleware
from flowtrace.transport import InMemoryTransport

VARIANTS = ("bare", "otel_prom", "flowtrace", "flowtrace_in_process")
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


def install_span_provider() -> TracerProvider:
    """An SDK provider, installed globally as an application does, whose batch processor's
    exporter drops what it is given, as a network exporter does: nothing is kept."""
    provider, _ = span_provider("batch", "discard")
    trace.set_tracer_provider(provider)
    return cast(TracerProvider, provider)


def add_middlewares(broker: AsyncBroker, variant: str, url: str,
                    worker: bool) -> FlowtraceMiddleware | None:
    """The variant's middlewares, with the installed tracer provider (the kicker's part of
    them when not ``worker``: it counts no Prometheus metrics); flowtrace's, if any."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
    broker.add_middlewares(PipelineMiddleware())
    if variant == "otel_prom":
        metrics_dir = tempfile.mkdtemp(prefix="flowtrace-bench-prom-") if worker else None
        broker.add_middlewares(*otel_prom_middlewares(trace.get_tracer_provider(),
                                                      metrics_dir))
    if variant == "flowtrace":
        return flowtrace.instrument(broker, redis_url=url)  # as a fleet's worker does
    if variant == "flowtrace_in_process":
        # Named, not defaulted: FLOWTRACE_REDIS_URL in the environment must not send them.
        return flowtrace.instrument(broker, transport=InMemoryTransport())
    return None


def _worker_broker() -> RedisStreamBroker:
    url = os.environ["FLOWTRACE_BENCH_REDIS"]
    broker = make_broker(url, os.environ["FLOWTRACE_BENCH_RESULTS"],
                         os.environ["FLOWTRACE_BENCH_QUEUE"])
    install_span_provider()
    add_middlewares(broker, os.environ[VARIANT_ENV], url, worker=True)
    return broker


# Built only in the worker: the parent imports this module for its builders.
broker = _worker_broker() if VARIANT_ENV in os.environ else None
