"""Counters whose labels are a closed set exist at 0 from the start (SPEC §5).

Prometheus's ``rate()``/``increase()`` ignore a series' first sample: a counter born at
its first drop or rejection would hide it from the dashboard. Checked on a real
``flowtrace serve`` (and a real Prometheus scraping it) and on a real taskiq worker's
``metrics_port``.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets

from flowtrace import metrics
from flowtrace.events import EVENT_TYPES
from flowtrace.metrics import EVENT_DROP_REASONS, WS_DROP_REASONS, WS_REJECT_REASONS
from tests.support.gateway_proc import GatewayProcess, metric_value, serve_gateways
from tests.support.processes import (
    REPO_ROOT,
    RedisServer,
    Workers,
    free_port,
    test_env,
    wait_for_log,
)
from tests.support.prometheus import PrometheusServer, sample_value
from tests.support.waiting import wait_until

TOKEN = "s3cret"
AUTH = 'flowtrace_ws_connections_rejected_total{reason="auth"}'
CLOSED_SETS = {
    "flowtrace_events_dropped_total": ("reason", EVENT_DROP_REASONS),
    "flowtrace_ws_messages_dropped_total": ("reason", WS_DROP_REASONS),
    "flowtrace_ws_connections_rejected_total": ("reason", WS_REJECT_REASONS),
    "flowtrace_events_total": ("type", EVENT_TYPES),
}


def zero_series(text: str, metrics: dict[str, tuple[str, tuple[str, ...]]]) -> list[str]:
    """The series of ``metrics`` that are missing from ``text`` or not 0."""
    wrong = []
    for name, (label, values) in metrics.items():
        for value in values:
            found = metric_value(text, name, **{label: value})
            if found != 0.0:
                wrong.append(f'{name}{{{label}="{value}"}} = {found}')
    return wrong


@pytest.fixture
def gateway(events_redis: RedisServer) -> Iterator[GatewayProcess]:
    with serve_gateways(events_redis.url, 1, "--token", TOKEN) as (gateway,):
        yield gateway


async def test_fresh_gateway_exposes_every_closed_set_series_at_zero(
        gateway: GatewayProcess) -> None:
    response = await gateway.get("/metrics")
    response.raise_for_status()
    assert zero_series(response.text, CLOSED_SETS) == []


async def reject_without_token(gateway: GatewayProcess) -> int | None:
    async with websockets.connect(gateway.ws_url("/ws/*"), proxy=None,
                                  open_timeout=15) as ws:
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 15)
        return ws.close_code


def test_prometheus_sees_the_first_auth_rejections(gateway: GatewayProcess) -> None:
    with PrometheusServer([f"127.0.0.1:{gateway.port}"], scrape_interval="500ms") as prom:
        prom.wait_for_up()
        # Scraped at 0 before anything happens: the first rejections are an increase.
        prom.wait_for_query(f"{AUTH} == 0")
        for _ in range(3):
            assert asyncio.run(reject_without_token(gateway)) == 1008
        prom.wait_for_query(f"{AUTH} == 3")
        (increase,) = prom.wait_for_query(f"increase({AUTH}[5m]) > 0")
        assert sample_value(increase) > 0
        # The dashboard's panel query answers too.
        (rate,) = prom.wait_for_query(
            "sum by (reason) (rate(flowtrace_ws_connections_rejected_total[1m])) > 0")
        assert rate["metric"] == {"reason": "auth"}


@pytest.mark.fleet
def test_worker_metrics_port_exposes_every_drop_reason_at_zero(
        redis_server: RedisServer, events_redis: RedisServer) -> None:
    port = free_port()
    workers = Workers("tests.fleet_app.spine_worker:broker",
                      test_env(TEST_REDIS_URL=redis_server.url,
                               FLOWTRACE_REDIS_URL=events_redis.url,
                               TEST_METRICS_PORT=str(port)),
                      workers=1)
    try:
        wait_for_log(workers, "Listening started")

        def scraped() -> str | None:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2,
                                 trust_env=False).text
            except httpx.HTTPError:
                return None

        text = wait_until(scraped, timeout=30, message="the worker's metrics port")
        assert text is not None
    finally:
        workers.stop()
    drops = {"flowtrace_events_dropped_total": CLOSED_SETS["flowtrace_events_dropped_total"]}
    assert zero_series(text, drops) == []


def test_every_drop_reason_counted_in_flowtrace_is_a_known_one() -> None:
    """Reasons are defined in flowtrace.metrics; a literal or ``DROP_*`` constant counted
    elsewhere must be one of them, or its series would not exist at 0."""
    counted = re.compile(r"""count_drop\(\s*(?:["'](\w+)["']|(?:metrics\.)?(DROP_\w+))""")
    used: dict[str, set[str]] = {}
    for path in (Path(REPO_ROOT) / "flowtrace").rglob("*.py"):
        for literal, constant in counted.findall(path.read_text()):
            reason = literal or getattr(metrics, constant, constant)
            used.setdefault(reason, set()).add(path.name)
    assert used, "the scan found no drop at all: the pattern is stale"
    unknown = {reason: files for reason, files in used.items()
               if reason not in EVENT_DROP_REASONS}
    assert unknown == {}
