"""``python -m flowtrace.cli serve`` as a real process against a real redis-server."""

from __future__ import annotations

import asyncio
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


async def test_serve_logs_its_own_lines_and_never_the_token(redis_server: RedisServer) -> None:
    secret = "S3CRET-token"
    with gateway("--redis-url", redis_server.url, "--token", secret) as served:
        assert httpx.get(f"{served.url}/api/pipelines?token={secret}",
                         trust_env=False).status_code == 200
        async with connect(f"ws://127.0.0.1:{served.port}/ws/*?limit=1&token={secret}") as ws:
            assert json.loads(await ws.recv())["type"] == "subscribed"
        wait_until(lambda: "/ws/*?limit=1&token=***" in served.output()
                   and "/api/pipelines?token=***" in served.output(),
                   message="the access log's request lines, token masked")
        # flowtrace's own INFO lines, with a level and the logger's name.
        assert " INFO flowtrace.gateway: flowtrace gateway: rebuilt 0 run(s)" in served.output()
        assert secret not in served.output()


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


# --------------------------------------------------------------------------- inbound frame limit
FRAME = 8 * 1024 * 1024
CLIENTS = 4


def peak_rss(pid: int) -> int:
    """The process's resident-set high-water mark in bytes (Linux ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


async def send_oversized(port: int, compression: str | None) -> int | None:
    """Send one FRAME-byte text frame; the close code the server answers with."""
    async with connect(f"ws://127.0.0.1:{port}/ws/*", open_timeout=10, proxy=None,
                       compression=compression, close_timeout=10) as ws:
        assert json.loads(await ws.recv())["type"] == "subscribed"
        with pytest.raises(ConnectionClosed) as closed:
            await ws.send("x" * FRAME)
            while True:
                await ws.recv()
        return closed.value.rcvd.code if closed.value.rcvd is not None else None


@pytest.mark.parametrize("compression", [None, "deflate"])
async def test_oversized_frames_are_refused_with_1009_before_they_are_buffered(
        redis_server: RedisServer, compression: str | None) -> None:
    with gateway("--redis-url", redis_server.url) as served:
        peak_before = peak_rss(served.proc.pid)
        codes = await asyncio.gather(*(send_oversized(served.port, compression)
                                       for _ in range(CLIENTS)))
        assert codes == [1009] * CLIENTS
        # Buffered, the frames would have cost the server at least CLIENTS x FRAME bytes.
        grown = peak_rss(served.proc.pid) - peak_before
        assert grown < FRAME // 2, f"peak RSS grew by {grown} bytes"

        async with connect(f"ws://127.0.0.1:{served.port}/ws/*", open_timeout=10,
                           proxy=None) as ws:  # a frame within the limit still works
            assert json.loads(await ws.recv())["type"] == "subscribed"
            await ws.send(json.dumps({"type": "ping", "pad": "x" * 4000}))
            assert json.loads(await ws.recv()) == {"type": "pong"}


# --------------------------------------------------------------------------- bad values
def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flowtrace.cli", *args], cwd=REPO_ROOT,
                          env=env or make_env(), capture_output=True, text=True, timeout=60,
                          check=False)


BAD_FLAGS = [
    ("--stale-after", "nan"), ("--stale-after", "inf"), ("--stale-after", "-inf"),
    ("--stale-after", "0"), ("--stale-after", "1e300"), ("--port", "99999"),
    ("--port", "-1"), ("--redis-url", "notaurl"), ("--redis-url", "redis://host:99999/0"),
    ("--max-connections", "0"), ("--redis-url", "redis://127.0.0.1:1/0?socket_timeout=abc"),
    ("--redis-url", "redis://127.0.0.1:1/0?no_such_option=1"),
    ("--redis-url", "redis://127.0.0.1:1/abc"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_FLAGS)
def test_a_bad_flag_is_a_usage_error(flag: str, value: str) -> None:
    args = {"--redis-url": "redis://127.0.0.1:1/0", "--port": str(free_port()), flag: value}
    result = run_cli("serve", *(item for pair in args.items() for item in pair))
    assert_usage_error(result, "serve", flag)


@pytest.mark.parametrize(("variable", "value", "flag"), [
    ("FLOWTRACE_STALE_AFTER", "nan", "--stale-after"),
    ("FLOWTRACE_STALE_AFTER", "inf", "--stale-after"),
    ("FLOWTRACE_REDIS_URL", "notaurl", "--redis-url"),
    ("FLOWTRACE_MAX_CONNECTIONS", "many", "--max-connections"),
])
def test_a_bad_environment_variable_is_a_usage_error(variable: str, value: str,
                                                     flag: str) -> None:
    env = make_env(**{"FLOWTRACE_REDIS_URL": "redis://127.0.0.1:1/0", variable: value})
    result = run_cli("serve", "--port", str(free_port()), env=env)
    assert_usage_error(result, "serve", flag)
    assert variable in result.stderr


def test_the_demo_keeps_its_runs_in_memory_even_with_a_redis_url_set(
        redis_server: RedisServer) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flowtrace.cli", "demo", "--port", str(port)],
                            cwd=REPO_ROOT, env=make_env(FLOWTRACE_REDIS_URL=redis_server.url),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def finished_runs() -> bool:
            try:
                runs = httpx.get(f"http://127.0.0.1:{port}/api/pipelines?status=COMPLETED",
                                 timeout=2, trust_env=False).json()
            except httpx.HTTPError:
                return False
            return len(runs) >= 3

        wait_until(finished_runs, timeout=90, message="the demo's first finished runs")
        keys = subprocess.run(["redis-cli", "-p", str(redis_server.port), "--scan"],
                              capture_output=True, text=True, timeout=30, check=True).stdout
        assert keys.split() == []  # nothing of the demo's reached the fleet's Redis
    finally:
        kill_process(proc)


def test_a_bad_demo_port_is_a_usage_error() -> None:
    assert_usage_error(run_cli("demo", "--port", "99999"), "demo", "--port")


def assert_usage_error(result: subprocess.CompletedProcess[str], command: str,
                       flag: str) -> None:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"flowtrace {command}: error: argument {flag}:"), result.stderr


def test_help_shows_defaults_and_the_trace_url_variable() -> None:
    serve = run_cli("serve", "--help")
    assert serve.returncode == 0, serve
    text = " ".join(serve.stdout.split())  # argparse wraps lines
    assert "default 1000" in text and "default 3600" in text, serve.stdout
    assert "FLOWTRACE_TRACE_URL" in text and "{trace_id}" in text, serve.stdout
    demo = run_cli("demo", "--help")
    assert demo.returncode == 0 and "FLOWTRACE_TRACE_URL" in demo.stdout, demo
