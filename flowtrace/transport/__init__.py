"""Transports: how events travel from workers to the gateway."""

from flowtrace.transport.base import Transport
from flowtrace.transport.memory import InMemoryTransport
from flowtrace.transport.redis_pubsub import RedisPubSubTransport
from flowtrace.transport.redis_stream import RedisStreamTransport

__all__ = ["InMemoryTransport", "RedisPubSubTransport", "RedisStreamTransport", "Transport"]
