from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.processes import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A private redis-server on a free port, stopped after the test."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill()
