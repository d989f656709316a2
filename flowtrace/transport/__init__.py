"""Transports: how events travel from workers to the gateway.

The Redis transports are imported when first used: a process that keeps its events
in memory does not load the Redis client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from flowtrace.transport.base import Transport
from flowtrace.transport.memory import InMemoryTransport

if TYPE_CHECKING:
    from flowtrace.transport.redis_pubsub import RedisPubSubTransport
    from flowtrace.transport.redis_stream import RedisStreamTransport

_LAZY = {
    "RedisPubSubTransport": "flowtrace.transport.redis_pubsub",
    "RedisStreamTransport": "flowtrace.transport.redis_stream",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flowtrace.transport' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["InMemoryTransport", "RedisPubSubTransport", "RedisStreamTransport", "Transport"]
