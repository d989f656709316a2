"""Transports: how events travel from workers to the gateway.

The Redis transports are imported when first used: a process that keeps its events
in memory does not load the Redis client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowtrace._lazy import lazy_attributes
from flowtrace.transport.base import Transport
from flowtrace.transport.memory import InMemoryTransport

if TYPE_CHECKING:
    from flowtrace.transport.redis_pubsub import RedisPubSubTransport
    from flowtrace.transport.redis_stream import RedisStreamTransport

__getattr__ = lazy_attributes(__name__, {
    "RedisPubSubTransport": "flowtrace.transport.redis_pubsub",
    "RedisStreamTransport": "flowtrace.transport.redis_stream",
})


__all__ = ["InMemoryTransport", "RedisPubSubTransport", "RedisStreamTransport", "Transport"]
