"""Settings the four broker examples share, from the environment (localhost defaults)."""

from __future__ import annotations

import os
import re
import socket
import sys
from typing import Any

#: Results (and taskiq-pipelines' bookkeeping of map/filter items) expire after an hour.
RESULT_TTL_S = 3600
_NAME = re.compile(r"[A-Za-z0-9_-]+")


def redis_url() -> str:
    """``REDIS_URL``: the result backend of every example, and the Redis brokers' queue."""
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def queue_name() -> str:
    """``BROKER_QUEUE``: the queue, stream, subject (and derived names) the example uses.

    Give every deployment (and every test run) its own name so that workers never take
    each other's messages. Letters, digits, ``_`` and ``-`` only: the one name must be
    valid as a Redis key, a RabbitMQ queue and exchange, and a NATS subject and stream.
    """
    name = os.environ.get("BROKER_QUEUE", "flowtrace-examples")
    if not _NAME.fullmatch(name):
        raise ValueError(f"BROKER_QUEUE={name!r}: use letters, digits, '_' and '-' only")
    return name


def redeliver_after_s() -> float:
    """``BROKER_REDELIVER_AFTER_S``: how long a message may stay unacknowledged before
    another worker gets it (``RedisStreamBroker(idle_timeout)``, JetStream ``ack_wait``).

    It is also how long a task may run before it runs twice: keep it above your longest
    task *and* your longest map/filter step (taskiq-pipelines' waiter task runs as long
    as all of the step's items). RabbitMQ redelivers when a worker's connection drops
    instead, whatever the duration.
    """
    return float(os.environ.get("BROKER_REDELIVER_AFTER_S", "300"))


def redis_broker_connection() -> dict[str, Any]:
    """Connection settings for a taskiq-redis *broker* (its workers' listening pool).

    On Python < 3.12 ``asyncio.wait_for`` can swallow a cancellation that arrives just
    as the awaited operation completes (CPython gh-86296, fixed in 3.12), and redis-py
    sends every command through ``wait_for`` when ``socket_timeout`` is set. taskiq
    stops a worker by cancelling its pending ``listen()``; when that cancellation is
    swallowed the listen loop runs on and the worker ignores SIGTERM for good. Without
    a socket timeout redis-py sends without ``wait_for``; the blocking reads still
    return every second (``BRPOP``/``XREADGROUP`` server-side timeouts), and TCP
    keepalive (a dead server is noticed within about a minute) stands in for the
    timeout.
    """
    if sys.version_info >= (3, 12):
        return {"socket_timeout": 5, "socket_connect_timeout": 5}
    keepalive = {getattr(socket, name): value for name, value in (
        ("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3))
        if hasattr(socket, name)}
    return {"socket_timeout": None, "socket_connect_timeout": 5, "socket_keepalive": True,
            "socket_keepalive_options": keepalive}
