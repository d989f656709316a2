"""The deploy stack's example fleet, run with the compose file's own commands.

``deploy/docker-compose.yml`` cannot run here (no Docker engine), so its three flowtrace
services run as processes on a private redis-server, as the README's "without Docker"
commands run them: ``flowtrace serve``, ``taskiq worker examples.fleet.worker:broker
--workers 2`` and ``uvicorn examples.fleet.api:app``. The README's three ``POST /etl``
calls (a good batch, a bad one, a flaky load) must show up on the gateway's WebSocket,
REST and ``/metrics`` as the runs they are, and in the traces the worker and the API
export over OTLP (configured only by the ``OTEL_*`` variables the compose file sets).
"""

from __future__ import annotations

import asyncio
import shlex
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from flowtrace.events import BaseEvent
from tests.support.collect import check_common, shape
from tests.support.gateway_proc import GatewayProcess, WsFeed, serve_gateways
from tests.support.otlp_fixture import otlp_receiver
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.processes import REPO_ROOT, RedisServer, Workers, free_port, kill_process
from tests.support.processes import test_env as process_env
from tests.support.waiting import async_wait_until, wait_until
from tests.test_deploy import API_COMMAND, WORKER_COMMAND

__all__ = ["otlp_receiver"]  # the fixture, used by name

pytestmark = pytest.mark.fleet

STEPS = ("fleet.extract", "fleet.transform", "fleet.load")
OK = [("PipelineStartEvent", None),
      *[pair for i in range(3) for pair in (("StepStartEvent", i), ("StepCompleteEvent", i))],
      ("PipelineCompleteEvent", None)]
BAD = [("PipelineStartEvent", None), ("StepStartEvent", 0), ("StepCompleteEvent", 0),
       ("StepStartEvent", 1), ("StepErrorEvent", 1), ("PipelineErrorEvent", None)]
FLAKY = [*OK[:5], ("StepStartEvent", 2), ("StepErrorEvent", 2), ("StepStartEvent", 2),
         ("StepCompleteEvent", 2), ("PipelineCompleteEvent", None)]


def fleet_env(redis: RedisServer, otlp: OtlpReceiver, service: str) -> dict[str, str]:
    """The compose file's variables, with this test's Redis for ``redis://redis:6379/0``
    and its OTLP receiver for ``http://jaeger:4317``."""
    return process_env(REDIS_URL=redis.url, FLOWTRACE_REDIS_URL=redis.url,
                       **otlp.env("grpc", service_name=service))


class Api:
    """``uvicorn examples.fleet.api:app``, the compose file's command on a free port."""

    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        argv = shlex.split(API_COMMAND)
        argv[argv.index("--port") + 1] = str(self.port)
        argv[argv.index("--host") + 1] = "127.0.0.1"
        self.proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=REPO_ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.healthy, timeout=60, message="example API /healthz")

    def healthy(self) -> bool:
        assert self.proc.poll() is None, "the example API exited early"
        try:
            return httpx.get(self.url("/healthz"), timeout=2, trust_env=False).is_success
        except httpx.HTTPError:
            return False

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def etl(self, body: dict[str, Any] | None = None) -> str:
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            response = await client.post(self.url("/etl"), json=body)
        response.raise_for_status()
        pipeline_id: str = response.json()["pipeline_id"]
        return pipeline_id


@pytest.fixture
def gateway(redis_server: RedisServer) -> Iterator[GatewayProcess]:
    with serve_gateways(redis_server.url) as gateways:
        yield gateways[0]


@pytest.fixture
def workers(redis_server: RedisServer, otlp_receiver: OtlpReceiver) -> Iterator[Workers]:
    argv = shlex.split(WORKER_COMMAND)
    assert argv[:2] == ["taskiq", "worker"]
    count = int(argv[argv.index("--workers") + 1])
    group = Workers(argv[2], fleet_env(redis_server, otlp_receiver, "fleet-worker"),
                    workers=count)
    try:
        wait_until(lambda: group.output().count("Listening started") >= count, timeout=60,
                   message=f"{count} example worker processes to listen")
        yield group
    finally:
        group.stop()


@pytest.fixture
def api(redis_server: RedisServer, otlp_receiver: OtlpReceiver) -> Iterator[Api]:
    app = Api(fleet_env(redis_server, otlp_receiver, "fleet-api"))
    try:
        yield app
    finally:
        kill_process(app.proc)


def step_rows(state: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(step["name"], step["status"], step["attempt"]) for step in state["steps"]]


async def test_the_readme_calls_run_end_to_end(gateway: GatewayProcess, workers: Workers,
                                               api: Api, otlp_receiver: OtlpReceiver) -> None:
    async with WsFeed.open(gateway.ws_url("/ws/*")) as feed:
        ok = await api.etl()
        bad = await api.etl({"records": [{"id": 1, "value": "oops"}]})
        flaky = await api.etl({"flaky": True})
        runs: dict[str, list[BaseEvent]] = {}
        for pipeline_id in (ok, bad, flaky):
            runs[pipeline_id] = await feed.wait_terminal(pipeline_id)

    for pipeline_id in (ok, bad, flaky):
        check_common(runs[pipeline_id], pipeline_id, "etl", "sequential")
    assert shape(runs[ok]) == OK
    assert shape(runs[bad]) == BAD
    assert shape(runs[flaky]) == FLAKY
    assert runs[ok][-1].result == {"loaded": 3, "total": 21.75}  # type: ignore[attr-defined]
    error = runs[bad][-1]
    assert error.error_type == "ValueError"  # type: ignore[attr-defined]
    assert error.failed_step == "fleet.transform"  # type: ignore[attr-defined]
    retried = [e for e in runs[flaky] if e.type == "StepErrorEvent"]  # type: ignore[attr-defined]
    assert [(e.attempt, e.will_retry) for e in retried] == [(1, True)]  # type: ignore[attr-defined]

    states = {pid: await gateway.run_state(pid) for pid in (ok, bad, flaky)}
    assert {pid: state and state["status"] for pid, state in states.items()} == {
        ok: "COMPLETED", bad: "FAILED", flaky: "COMPLETED"}
    assert step_rows(states[flaky] or {}) == [(STEPS[0], "COMPLETED", 1),
                                              (STEPS[1], "COMPLETED", 1),
                                              (STEPS[2], "COMPLETED", 2)]

    async def counted() -> bool:
        completed = await gateway.metric("flowtrace_pipeline_runs_total",
                                         pipeline="etl", status="completed")
        return completed == 2
    await async_wait_until(counted, timeout=30, message="2 completed etl runs on /metrics")
    assert await gateway.metric("flowtrace_pipeline_runs_total",
                                pipeline="etl", status="failed") == 1
    assert await gateway.metric("flowtrace_step_runs_total", pipeline="etl",
                                step="fleet.load", status="retried") == 1


    # The API's very first request is traced, and the run it kicked joined its trace.
    def roots(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.name == "pipeline etl"
                and s.attributes.get("flowtrace.pipeline.id") == ok]

    def run_root_and_request(spans: list[ReceivedSpan]) -> bool:
        return bool(roots(spans)) and any(s.service_name == "fleet-api" for s in spans)
    spans = await asyncio.to_thread(otlp_receiver.wait_for_spans, run_root_and_request, 60)
    (root,) = roots(spans)
    assert root.service_name == "fleet-worker"
    requests = {s.span_id: s for s in spans if s.name == "POST /etl" and s.kind == "SERVER"}
    assert root.parent_span_id in requests, otlp_receiver.dump()
    assert requests[root.parent_span_id].trace_id == root.trace_id


def test_the_workers_stop_on_sigterm(workers: Workers) -> None:
    """``docker compose stop`` sends SIGTERM: idle workers must exit, not be killed."""
    workers.stop(timeout=30)
    assert workers.proc.returncode == 0, workers.output()
