"""taskiq-nats ``PullBasedJetStreamBroker`` (NATS JetStream) + Redis results.

    taskiq worker examples.brokers.nats:broker --workers 2

A JetStream work-queue stream (a message is deleted once acknowledged) and one
durable pull consumer that every worker shares, all named after ``BROKER_QUEUE``.
taskiq acknowledges a message once its result is saved; one left unacknowledged by
a dead worker is delivered again after ``BROKER_REDELIVER_AFTER_S`` (``ack_wait``).

The result backend is Redis: taskiq-nats' ``NATSObjectStoreResultBackend`` works with
pipelines too, but every ``is_result_ready`` downloads the whole object (a map's waiter
polls one per item) and results never expire. Plain core-NATS ``NatsBroker`` has no acknowledgement
(at most once) and, without a ``queue`` group, delivers every message to every worker.
"""

from __future__ import annotations

import os
from typing import Any

from nats.js.api import ConsumerConfig, RetentionPolicy, StreamConfig
from taskiq_nats import PullBasedJetStreamBroker
from taskiq_redis import RedisAsyncResultBackend

import flowtrace
from examples.brokers.settings import RESULT_TTL_S, queue_name, redeliver_after_s, redis_url
from examples.brokers.tasks import setup_broker


def nats_url() -> str:
    """``NATS_URL``."""
    return os.environ.get("NATS_URL", "nats://127.0.0.1:4222")


def make_broker(url: str | None = None, queue: str | None = None,
                results_url: str | None = None) -> PullBasedJetStreamBroker:
    """The broker, its result backend and the example tasks (no flowtrace yet)."""
    name = queue or queue_name()
    backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        results_url or redis_url(), result_ex_time=RESULT_TTL_S)
    broker = PullBasedJetStreamBroker(
        [url or nats_url()],
        subject=name,
        stream_name=name,
        durable=name,
        stream_config=StreamConfig(name=name, subjects=[name],
                                   retention=RetentionPolicy.WORK_QUEUE),
        consumer_config=ConsumerConfig(durable_name=name, ack_wait=redeliver_after_s()),
        pull_consume_batch=1,
        # Each fetch ends after 1 s when idle. Without it an idle worker on asyncio's
        # default event loop sleeps through SIGTERM (taskiq's handler only sets an
        # asyncio.Event; uvloop, which taskiq uses when installed, does wake up).
        pull_consume_timeout=1.0,
    ).with_result_backend(backend)
    return setup_broker(broker)


broker = make_broker()
flowtrace_middleware = flowtrace.instrument(broker)
