from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.processes import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port, stopped after the test."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def events_redis() -> Iterator[RedisServer]:
    """A second private redis-server, for flowtrace's events apart from the broker's."""
    with RedisServer() as server:
        yield server
