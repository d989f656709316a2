"""taskiq-aio-pika ``AioPikaBroker`` (RabbitMQ) + Redis results.

    taskiq worker examples.brokers.rabbitmq:broker --workers 2

RabbitMQ carries the messages; taskiq-pipelines needs a result backend that every
worker and the kicking process can read (a step's result is the next step's input,
a map's waiter polls its items' results): Redis here. The exchange, the (quorum)
queue and its dead-letter queue are all named after ``BROKER_QUEUE``.

A message is acknowledged once its result is saved (taskiq's default
``--ack-type when_saved``). When a worker dies, RabbitMQ puts its unacknowledged
messages back at once and another worker runs them again from the start.
"""

from __future__ import annotations

import os
from typing import Any

from taskiq_aio_pika import AioPikaBroker, Exchange, Queue
from taskiq_redis import RedisAsyncResultBackend

import flowtrace
from examples.brokers.settings import RESULT_TTL_S, queue_name, redis_url
from examples.brokers.tasks import setup_broker


def rabbitmq_url() -> str:
    """``RABBITMQ_URL``."""
    return os.environ.get("RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")


def make_broker(url: str | None = None, queue: str | None = None,
                results_url: str | None = None) -> AioPikaBroker:
    """The broker, its result backend and the example tasks (no flowtrace yet)."""
    name = queue or queue_name()
    backend: RedisAsyncResultBackend[Any] = RedisAsyncResultBackend(
        results_url or redis_url(), result_ex_time=RESULT_TTL_S)
    broker = AioPikaBroker(
        url or rabbitmq_url(),
        exchange=Exchange(name=name),
        task_queues=[Queue(name=name)],
        dead_letter_queue=Queue(name=f"{name}.dead_letter"),
        # Messages a worker process takes ahead; unacknowledged ones go back to the
        # queue when it dies. Small, so that a map's items spread over the workers.
        qos=5,
    ).with_result_backend(backend)
    return setup_broker(broker)


broker = make_broker()
flowtrace_middleware = flowtrace.instrument(broker)
