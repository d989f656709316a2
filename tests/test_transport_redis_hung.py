"""Redis transports against a hung redis-server (SIGSTOP: it keeps its connections and
answers nothing, as in a network partition without a reset), then resumed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from flowtrace.events import StepStartEvent, parse_event
from flowtrace.transport import RedisPubSubTransport, RedisStreamTransport
from flowtrace.transport.base import FROM_BEGINNING, Transport
from tests.support.processes import RedisServer
from tests.support.waiting import async_wait_until, wait_until

SOCKET_TIMEOUT_S = 0.5
"""Short, so that the batch in flight times out soon and is sent again."""


def step(n: int) -> StepStartEvent:
    return StepStartEvent(pipeline_id="p", step_name="s", step_index=n)


def _state(pid: int) -> str:
    """The process state letter in ``/proc/<pid>/stat`` (``T``: stopped)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


@contextlib.contextmanager
def hung(server: RedisServer) -> Iterator[None]:
    """``server`` stopped (SIGSTOP) inside the block, resumed (SIGCONT) after it."""
    assert server.proc is not None
    pid = server.proc.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(lambda: _state(pid) == "T", timeout=10, message="redis-server to stop")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def outage_logs(caplog: pytest.LogCaptureFixture) -> int:
    return sum("lost Redis" in r.getMessage() for r in caplog.records)


async def _resend_after_a_hang(server: RedisServer, transport: Transport,
                               caplog: pytest.LogCaptureFixture) -> None:
    """Step 0 sent; steps 1-3 and an item count in flight when Redis hangs, until the
    socket timeout; Redis resumed and everything sent (again); then step 4."""
    await transport.publish(step(0))
    assert await transport.flush(timeout=10)
    with hung(server):
        for n in range(1, 4):
            await transport.publish(step(n))
        transport.count_item("run:1", failed=False)
        await async_wait_until(lambda: outage_logs(caplog) == 1,
                               message="the batch in flight to time out")
    await async_wait_until(lambda: transport.flush(timeout=1), message="the batch sent again")
    await transport.publish(step(4))  # after every copy of the batch, in Redis's order
    assert await transport.flush(timeout=10)


async def test_stream_batch_sent_again_after_a_hang_is_applied_once(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """The copy that waited in the hung server's socket runs when it resumes, and so does
    the copy sent again after the timeout: the events and the count are applied once."""
    transport = RedisStreamTransport(redis_server.url, socket_timeout=SOCKET_TIMEOUT_S)
    await _resend_after_a_hang(redis_server, transport, caplog)
    replayed = [e async for e in transport.replay(FROM_BEGINNING)]
    assert [e.step_index for e in replayed if isinstance(e, StepStartEvent)] == [0, 1, 2, 3, 4]
    assert await transport.read_counts("run:1") == (1, 0)
    assert transport.dropped == {}
    await transport.close()


async def _received(pubsub: PubSub, last: int) -> list[int]:
    """Step indexes received on ``pubsub`` up to step ``last``."""
    indexes: list[int] = []
    while last not in indexes:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
        if message is not None:  # None: nothing yet, or a subscription's confirmation
            event = parse_event(message["data"])
            assert isinstance(event, StepStartEvent)
            indexes.append(event.step_index)
    return indexes


async def test_pubsub_batch_sent_again_after_a_hang_is_applied_once(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    async with (Redis.from_url(redis_server.url, socket_timeout=SOCKET_TIMEOUT_S) as client,
                Redis.from_url(redis_server.url) as raw, raw.pubsub() as pubsub):
        await pubsub.subscribe("flowtrace:events")  # waits out the hang, keeps every message
        transport = RedisPubSubTransport(client)
        await _resend_after_a_hang(redis_server, transport, caplog)
        assert await asyncio.wait_for(_received(pubsub, 4), 30) == [0, 1, 2, 3, 4]
        assert await transport.read_counts("run:1") == (1, 0)
        assert transport.dropped == {}
        await transport.close()


async def test_stream_flush_after_one_timed_out_on_a_hung_redis_answers_at_once(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """Before the socket timeout marks an outage, a hung Redis looks like a slow one: once
    one flush timed out on the batch in flight, the next ones (each pipeline hop) do not
    wait their timeout too. Once a batch is sent again, a flush waits again."""
    transport = RedisStreamTransport(redis_server.url, socket_timeout=60)
    await transport.publish(step(0))
    assert await transport.flush(timeout=10)
    with hung(redis_server):
        await transport.publish(step(1))
        assert not await transport.flush(timeout=0.2)  # times out: the batch is in flight
        for n in (2, 3):
            await transport.publish(step(n))
            # A generous bound, far below the flush's (and the socket's) timeout.
            assert not await asyncio.wait_for(transport.flush(timeout=60), timeout=30)
        assert outage_logs(caplog) == 0  # nothing has failed: step 1 is still in flight
    await async_wait_until(lambda: transport.flush(timeout=1), message="the buffer to drain")
    await transport.publish(step(4))
    assert await transport.flush(timeout=10)
    replayed = [e async for e in transport.replay(FROM_BEGINNING)]
    assert [e.step_index for e in replayed if isinstance(e, StepStartEvent)] == [0, 1, 2, 3, 4]
    await transport.close()
