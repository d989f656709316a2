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
            proc.send_signal(signal.SIGTERM)
            await async_wait_until(lambda: feed.ended, timeout=30,
                                   message="the server to close the socket")
            assert feed.ws.close_code == 1001, feed.close_error
        assert proc.wait(timeout=30) == 0
    finally:
        kill_process(proc)
