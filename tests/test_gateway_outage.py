"""``flowtrace serve`` while its Redis is down: no run declared LOST for the gateway's own
deafness (SPEC §3), and one log line per outage rather than a traceback per retry."""

from __future__ import annotations

import shutil
import uuid
from datetime import datetime, timezone
from typing import Any

from flowtrace.events import (
    BaseEvent,
    PipelineCompleteEvent,
    PipelineErrorEvent,
    PipelineStartEvent,
    StepCompleteEvent,
    StepStartEvent,
)
from tests.support.gateway_proc import (
    GatewayProcess,
    publish_to_stream,
    serve_gateways,
    stream_events,
)
from tests.support.processes import RedisServer
from tests.support.waiting import async_wait_until

STALE_AFTER = 3.0


def run_events(pipeline_id: str, name: str) -> tuple[list[BaseEvent], list[BaseEvent]]:
    """A one-step run: the events of its start, and those of its end."""
    common: dict[str, Any] = {"pipeline_id": pipeline_id, "pipeline_name": name}
    started: list[BaseEvent] = [
        PipelineStartEvent(**common, total_steps=1, steps=["work"]),
        StepStartEvent(**common, step_name="work", task_id="t"),
    ]
    ended: list[BaseEvent] = [
        StepCompleteEvent(**common, step_name="work", task_id="t", duration_ms=1.0),
        PipelineCompleteEvent(**common, duration_ms=2.0),
    ]
    return started, ended


async def status_is(gateway: GatewayProcess, pipeline_id: str, status: str) -> bool:
    state = await gateway.run_state(pipeline_id)
    return state is not None and state["status"] == status


async def readiness(gateway: GatewayProcess) -> tuple[int, dict[str, Any]]:
    response = await gateway.get("/readyz")
    return response.status_code, response.json()


async def deaf_for(gateway: GatewayProcess, seconds: float) -> bool:
    """Whether ``/readyz`` says the transport has not answered for ``seconds``."""
    status, body = await readiness(gateway)
    since = body["unreachable_since"]
    return status == 503 and since is not None and (
        datetime.now(timezone.utc) - datetime.fromisoformat(since)).total_seconds() > seconds


async def readiness_shows(gateway: GatewayProcess, read_failures: int) -> bool:
    status, body = await readiness(gateway)
    return (status, body["transport"]) == (503, "unreachable") and \
        body["read_failures"] >= read_failures


async def test_a_redis_outage_makes_no_running_run_lost(events_redis: RedisServer) -> None:
    alive, witness = f"alive-{uuid.uuid4().hex}", f"witness-{uuid.uuid4().hex}"
    started, ended = run_events(alive, "alive")
    with serve_gateways(events_redis.url, 1, "--stale-after", str(STALE_AFTER)) as (gateway,):
        await publish_to_stream(events_redis.url, started)
        await async_wait_until(lambda: status_is(gateway, alive, "RUNNING"), timeout=30,
                               message="the run under way")

        events_redis.kill()
        # The outage: the run's worker is fine, but the gateway hears nobody for twice
        # stale_after, over several sweeps (every stale_after / 4).
        await async_wait_until(lambda: deaf_for(gateway, 2 * STALE_AFTER), timeout=60,
                               message="the gateway deaf for twice stale_after")
        assert await gateway.metric("flowtrace_transport_up") == 0.0
        events_redis.start()
        await publish_to_stream(events_redis.url, ended)
        await async_wait_until(lambda: status_is(gateway, alive, "COMPLETED"), timeout=60,
                               message="the run's own end")

        # The sweep still works once Redis is back: a run silent from now on is declared
        # LOST, after whatever the gateway had buffered during the outage was published.
        await publish_to_stream(events_redis.url, run_events(witness, "witness")[0])
        await async_wait_until(lambda: status_is(gateway, witness, "LOST"), timeout=60,
                               message="the silent witness declared LOST")

        assert (await readiness(gateway))[0] == 200
        assert await gateway.metric("flowtrace_transport_up") == 1.0
        stream = await stream_events(events_redis.url)
        lost = [e.pipeline_id for e in stream if isinstance(e, PipelineErrorEvent)]
        assert lost == [witness]
        assert await gateway.metric("flowtrace_pipeline_runs_total",
                                    pipeline="alive", status="completed") == 1.0
        assert await gateway.metric("flowtrace_pipeline_runs_total",
                                    pipeline="alive", status="lost") == 0.0
        assert await gateway.metric("flowtrace_pipeline_runs_total",
                                    pipeline="witness", status="lost") == 1.0


async def test_a_gateway_started_before_its_redis_says_so_once_and_catches_up() -> None:
    redis = RedisServer()  # its port, but nothing listening yet
    try:
        with serve_gateways(redis.url, 1) as (gateway,):
            refused = f"connecting to 127.0.0.1:{redis.port}"
            await async_wait_until(lambda: refused in gateway.output(), timeout=30,
                                   message="the gateway to report the outage")
            # The rest of the outage: it retries with a backoff from 0.05 s, failing again
            # several times.
            await async_wait_until(lambda: readiness_shows(gateway, read_failures=3),
                                   timeout=30, message="several failed reads")
            redis.start()

            run = f"after-{uuid.uuid4().hex}"
            started_events, ended_events = run_events(run, "after")
            await publish_to_stream(redis.url, started_events + ended_events)
            await async_wait_until(lambda: status_is(gateway, run, "COMPLETED"), timeout=60,
                                   message="the run published once Redis is up")

            output = gateway.output()
            assert "Traceback" not in output, output
            # One warning when the outage starts and one when it ends (INFO lines say more).
            said = [line.split(" WARNING flowtrace.gateway: ", 1)[1]
                    for line in output.splitlines() if " WARNING flowtrace." in line]
            assert len(said) == 2, output
            assert said[0].startswith("flowtrace gateway: cannot read the transport "
                                      "(ConnectionError: "), output
            assert said[1] == "flowtrace gateway: reading the transport again", output
    finally:
        redis.kill()
        shutil.rmtree(redis.dir, ignore_errors=True)
