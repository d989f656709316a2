"""``python -m flowtrace.cli serve`` as a real process against a real redis-server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from flowtrace.events import PipelineStartEvent
from flowtrace.transport.redis_stream import RedisStreamTransport
from tests.support.processes import REPO_ROOT, RedisServer, free_port, kill_process
from tests.support.processes import test_env as make_env
from tests.support.waiting import async_wait_until, wait_until


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"gateway exited early:\n{self.output()}"
        try:
            return httpx.get(self.url + "/healthz", timeout=1, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False


@contextmanager
def gateway(*args: str, env: dict[str, str] | None = None) -> Iterator[Gateway]:
    port = free_port()
    with tempfile.NamedTemporaryFile(prefix="flowtrace-serve-", suffix=".log",
                                     delete=False) as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flowtrace.cli", "serve", "--port", str(port), *args],
            cwd=REPO_ROOT, env=env or make_env(), stdout=log, stderr=subprocess.STDOUT)
    served = Gateway(proc, port, Path(log.name))
    try:
        wait_until(served.healthy, timeout=30, message="flowtrace serve /healthz")
        yield served
    finally:
        kill_process(proc)
        Path(log.name).unlink(missing_ok=True)


def test_serve_answers_health_and_prints_its_urls(redis_server: RedisServer) -> None:
    with gateway("--redis-url", redis_server.url) as served:
        assert httpx.get(served.url + "/healthz", trust_env=False).json() == {"status": "ok"}
        wait_until(lambda: f"http://127.0.0.1:{served.port}/" in served.output(),
                   message="URLs printed")
        assert "/metrics" in served.output()
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=30) == 0, served.output()


def test_serve_without_redis_url_exits_2_with_a_clear_message() -> None:
    env = make_env()
    env.pop("FLOWTRACE_REDIS_URL", None)
    result = subprocess.run([sys.executable, "-m", "flowtrace.cli", "serve"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "--redis-url" in result.stderr
    assert "FLOWTRACE_REDIS_URL" in result.stderr


def test_serve_reads_its_settings_from_the_environment(redis_server: RedisServer) -> None:
    env = make_env(FLOWTRACE_REDIS_URL=redis_server.url, FLOWTRACE_TOKEN="tok",
                   FLOWTRACE_MAX_CONNECTIONS="7", FLOWTRACE_STALE_AFTER="120")
    with gateway(env=env) as served:
        assert httpx.get(served.url + "/api/pipelines", trust_env=False).status_code == 401
        authorized = httpx.get(served.url + "/api/pipelines?token=tok", trust_env=False)
        assert authorized.status_code == 200
        stats = httpx.get(served.url + "/ws/metrics?token=tok", trust_env=False).json()
        assert stats["max_connections"] == 7


async def test_serve_shows_runs_published_to_redis(redis_server: RedisServer) -> None:
    publisher = RedisStreamTransport(redis_server.url)
    try:
        await publisher.publish(PipelineStartEvent(pipeline_id="from-redis", pipeline_name="etl"))
        assert await publisher.flush(timeout=10)
        with gateway("--redis-url", redis_server.url) as served:
            async with httpx.AsyncClient(trust_env=False) as client:

                async def known() -> bool:
                    response = await client.get(served.url + "/api/pipelines/from-redis")
                    return response.status_code == 200 and response.json()["status"] == "RUNNING"

                await async_wait_until(known, message="run from redis")
    finally:
        await publisher.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_shutdown_closes_websocket_clients_with_1001(redis_server: RedisServer,
                                                          sig: signal.Signals) -> None:
    with gateway("--redis-url", redis_server.url) as served:
        async with connect(f"ws://127.0.0.1:{served.port}/ws/*", open_timeout=10,
                           proxy=None) as ws:
            first = json.loads(await ws.recv())
            assert first["type"] == "subscribed"
            served.proc.send_signal(sig)
            with pytest.raises(ConnectionClosed) as closed:
                while True:  # anything still in flight, then the close frame
                    await ws.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 1001
        assert served.proc.wait(timeout=30) == 0, served.output()


@pytest.mark.parametrize(("flag", "deflate"), [((), True), (("--no-ws-deflate",), False)])
async def test_per_message_deflate_is_negotiated_unless_turned_off(
        redis_server: RedisServer, flag: tuple[str, ...], deflate: bool) -> None:
    with gateway("--redis-url", redis_server.url, *flag) as served:
        # The client offers deflate, as browsers do; the server decides.
        async with connect(f"ws://127.0.0.1:{served.port}/ws/*", open_timeout=10,
                           proxy=None, compression="deflate") as ws:
            assert json.loads(await ws.recv())["type"] == "subscribed"
            assert ws.response is not None
            accepted = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert ("permessage-deflate" in accepted) is deflate, accepted
