"""Two gateways on one Redis stream whose sweeps find the same run silent at the same moment:
the run is declared LOST once (SPEC §3: exactly one terminal event per run), and a sweep
that cannot reach Redis to claim the run declares it on a later sweep instead."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest
import redis.asyncio as aioredis

from flowtrace.events import PipelineErrorEvent, PipelineStartEvent, utc_now
from flowtrace.gateway import Gateway
from flowtrace.runs import RunStore
from flowtrace.transport.redis_stream import RedisStreamTransport
from tests.support.gateway_proc import publish_to_stream, stream_events
from tests.support.processes import RedisServer
from tests.support.waiting import async_wait_until

NEVER = 3600.0  # the gateways' own sweep loops stay asleep: the test sweeps by hand


@pytest.fixture
async def gateways(events_redis: RedisServer) -> AsyncIterator[list[Gateway]]:
    started: list[Gateway] = []
    try:
        for _ in range(2):
            gateway = Gateway(RedisStreamTransport(events_redis.url), store=RunStore(),
                              stale_after=60.0, sweep_interval=NEVER)
            await gateway.start()
            started.append(gateway)
        yield started
    finally:
        for gateway in started:
            await gateway.stop()
            await gateway.transport.close()


async def start_run(url: str) -> str:
    pipeline_id = f"silent-{uuid.uuid4().hex}"
    await publish_to_stream(url, [PipelineStartEvent(
        pipeline_id=pipeline_id, pipeline_name="silent", pipeline_type="task")])
    return pipeline_id


async def status_everywhere(gateways: list[Gateway], pipeline_id: str, status: str) -> bool:
    states = [g.store.get(pipeline_id) for g in gateways]
    return all(state is not None and state.status == status for state in states)


async def lost_events(url: str, pipeline_id: str) -> list[PipelineErrorEvent]:
    return [e for e in await stream_events(url)
            if isinstance(e, PipelineErrorEvent) and e.pipeline_id == pipeline_id]


async def test_two_gateways_sweeping_at_once_declare_a_silent_run_lost_once(
        events_redis: RedisServer, gateways: list[Gateway]) -> None:
    pipeline_id = await start_run(events_redis.url)
    await async_wait_until(lambda: status_everywhere(gateways, pipeline_id, "RUNNING"),
                           timeout=30, message="both gateways see the run")

    later = utc_now() + timedelta(seconds=120)
    declared = await asyncio.gather(*(g.sweep_once(later) for g in gateways))

    assert sorted(declared) == [0, 1]
    await async_wait_until(lambda: status_everywhere(gateways, pipeline_id, "LOST"),
                           timeout=30, message="both gateways apply the one LOST event")
    assert len(await lost_events(events_redis.url, pipeline_id)) == 1
    # Neither declares it again: the winner's event made it terminal everywhere.
    assert [await g.sweep_once(later + timedelta(hours=1)) for g in gateways] == [0, 0]
    claims = aioredis.Redis.from_url(events_redis.url)
    try:
        assert await claims.exists(f"flowtrace:claims:lost:{pipeline_id}") == 1
    finally:
        await claims.aclose()


async def test_a_sweep_that_cannot_claim_the_run_declares_it_on_a_later_sweep(
        events_redis: RedisServer, gateways: list[Gateway]) -> None:
    gateway = gateways[0]
    pipeline_id = await start_run(events_redis.url)
    await async_wait_until(lambda: status_everywhere([gateway], pipeline_id, "RUNNING"),
                           timeout=30, message="the gateway sees the run")

    later = utc_now() + timedelta(seconds=120)
    events_redis.kill()
    assert await gateway.sweep_once(later) == 0
    events_redis.start()

    assert await gateway.sweep_once(later) == 1
    await async_wait_until(lambda: status_everywhere(gateways, pipeline_id, "LOST"),
                           timeout=60, message="the run declared LOST once Redis is back")
    assert len(await lost_events(events_redis.url, pipeline_id)) == 1
