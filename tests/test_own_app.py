"""``flowtrace.websocket.router`` in a user's own app, served by ``flowtrace.cli.run_app``.

Live events reach ``/ws/*`` through the bridge, and on SIGTERM the clients are closed
with 1001 (under plain uvicorn they would get 1012: uvicorn closes WebSockets before an
app's shutdown code runs).
"""

from __future__ import annotations

import signal
import subprocess
import sys

import httpx

from tests.support.gateway_proc import WsFeed
from tests.support.processes import REPO_ROOT, free_port, kill_process, test_env
from tests.support.waiting import async_wait_until, wait_until

SERVE = "from flowtrace.cli import run_app; from tests.fleet_app.own_app import app; " \
        "run_app(app, port={port}, banner='own app')"


def healthy(base: str) -> bool:
    try:
        return httpx.get(base + "/api/ws/pipelines", timeout=2, trust_env=False).is_success
    except httpx.HTTPError:
        return False


async def test_router_in_an_own_app_streams_live_and_closes_with_1001() -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-c", SERVE.format(port=port)], cwd=REPO_ROOT,
                            env=test_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: healthy(base), timeout=60, message="the app to serve")
        async with WsFeed.open(f"ws://127.0.0.1:{port}/ws/*") as feed:
            async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
                pipeline_id = (await client.post(base + "/kick")).json()["pipeline_id"]
            events = await feed.wait_terminal(pipeline_id)
            assert [e.type for e in events] == ["PipelineStartEvent", "StepStartEvent",
                                                "StepCompleteEvent", "PipelineCompleteEvent"]
            await _subscribing_after_the_kick_misses_nothing(base, port)
            proc.send_signal(signal.SIGTERM)
            await async_wait_until(lambda: feed.ended, timeout=30,
                                   message="the server to close the socket")
            assert feed.ws.close_code == 1001, feed.close_error
        assert proc.wait(timeout=30) == 0
    finally:
        kill_process(proc)


async def _subscribing_after_the_kick_misses_nothing(base: str, port: int) -> None:
    """SPEC §2: a caller subscribes to ``/ws/{task_id}`` right after kicking. The bridge
    keeps this process's runs, so the run's snapshot comes first even when the run
    ended before the socket opened, and the REST routes know the run."""
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        pipeline_id = (await client.post(base + "/kick")).json()["pipeline_id"]
        async with WsFeed.open(f"ws://127.0.0.1:{port}/ws/{pipeline_id}") as feed:
            await feed.wait(lambda: feed.frames_of("snapshot") or (feed.of(pipeline_id)
                            and feed.of(pipeline_id)[-1].type == "PipelineCompleteEvent"),
                            "the run's snapshot or its events")
            snapshots = feed.frames_of("snapshot")
            if snapshots:  # (else the run was not known yet: every event arrives live)
                assert feed.frames.index(snapshots[0]) == 1  # right after "subscribed"
                assert snapshots[0]["pipeline"]["pipeline_id"] == pipeline_id
        run = (await client.get(f"{base}/api/pipelines/{pipeline_id}")).json()
        assert run["status"] == "COMPLETED" and run["pipeline_name"] == "own.add_one"
