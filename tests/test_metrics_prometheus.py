"""SPEC §5 metrics end to end: a real gateway (``create_app`` under uvicorn) fed a
realistic mix of SPEC §3 events through an ``InMemoryTransport``, scraped by a real
Prometheus, queried with every panel of the Grafana dashboard.

The events are built with the event classes directly, so these tests depend on the
gateway only, not on the taskiq middleware.
"""

from __future__ import annotations

import math
import secrets
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from flowtrace.app import create_app
from flowtrace.events import (
    BaseEvent,
    PipelineCompleteEvent,
    PipelineErrorEvent,
    PipelineStartEvent,
    StepCompleteEvent,
    StepErrorEvent,
    StepProgressEvent,
    StepStartEvent,
)
from flowtrace.hooks import EventFilter, HookManager
from flowtrace.metrics import RUN_FINAL_STATUSES
from flowtrace.transport.memory import InMemoryTransport
from tests.support.app_thread import AppServer
from tests.support.grafana import load_dashboard, panel_queries, substitute
from tests.support.prometheus import PrometheusServer, sample_value
from tests.support.waiting import wait_until

ETL = ("extract", "transform", "load")
REPORT = ("fetch", "render")
CLEANUP = ("cleanup",)
TOKEN = "s3cret"
STALE_AFTER = 3.0  # the abandoned run is declared LOST after this much silence

SeriesKey = tuple[str, frozenset[tuple[str, str]]]


# --------------------------------------------------------------------------- events
class Run:
    """Builds the events one run emits, in the causal order SPEC §3 promises."""

    def __init__(self, name: str, steps: tuple[str, ...], pipeline_type: str = "sequential"):
        self.id = uuid.uuid4().hex
        self.name = name
        self.steps = steps
        self.type = pipeline_type
        self.trace_id = secrets.token_hex(16)
        self.events: list[BaseEvent] = []

    def _common(self) -> dict[str, Any]:
        return {"pipeline_id": self.id, "pipeline_name": self.name, "pipeline_type": self.type,
                "trace_id": self.trace_id, "span_id": secrets.token_hex(8)}

    def start(self) -> Run:
        self.events.append(PipelineStartEvent(
            **self._common(), input={"records": [1, 2, 3]}, total_steps=len(self.steps),
            steps=list(self.steps)))
        return self

    def step_start(self, index: int, queue_wait_ms: float | None, attempt: int = 1) -> Run:
        self.events.append(StepStartEvent(
            **self._common(), step_name=self.steps[index], step_index=index,
            task_id=uuid.uuid4().hex, attempt=attempt, queue_wait_ms=queue_wait_ms,
            worker="worker-1"))
        return self

    def ok(self, index: int, duration_ms: float, queue_wait_ms: float | None,
           attempt: int = 1) -> Run:
        self.step_start(index, queue_wait_ms, attempt)
        self.events.append(StepCompleteEvent(
            **self._common(), step_name=self.steps[index], step_index=index,
            task_id=uuid.uuid4().hex, attempt=attempt, result={"rows": 3},
            duration_ms=duration_ms))
        return self

    def error(self, index: int, duration_ms: float, queue_wait_ms: float | None,
              will_retry: bool, attempt: int = 1) -> Run:
        self.step_start(index, queue_wait_ms, attempt)
        self.events.append(StepErrorEvent(
            **self._common(), step_name=self.steps[index], step_index=index,
            task_id=uuid.uuid4().hex, attempt=attempt, error="ValueError: invalid input",
            error_type="ValueError", will_retry=will_retry, duration_ms=duration_ms))
        return self

    def map_ok(self, index: int, duration_ms: float, total: int) -> Run:
        """A map step: started by the kicking process (no queue wait), with progress."""
        self.step_start(index, None)
        for done in (total // 2, total):
            self.events.append(StepProgressEvent(
                **self._common(), step_name=self.steps[index], step_index=index,
                done=done, failed=0, total=total))
        self.events.append(StepCompleteEvent(
            **self._common(), step_name=self.steps[index], step_index=index,
            task_id=uuid.uuid4().hex, duration_ms=duration_ms, result=[1, 2]))
        return self

    def redeliver(self, *positions: int) -> Run:
        """Repeat already emitted events (a redelivered message)."""
        self.events.extend(self.events[p].model_copy() for p in positions)
        return self

    def complete(self, duration_ms: float) -> Run:
        self.events.append(PipelineCompleteEvent(**self._common(), duration_ms=duration_ms,
                                                 result={"loaded": 3}))
        return self

    def fail(self, index: int, duration_ms: float) -> Run:
        self.events.append(PipelineErrorEvent(
            **self._common(), error="ValueError: invalid input", error_type="ValueError",
            failed_step=self.steps[index], failed_step_index=index, duration_ms=duration_ms))
        return self


def etl_completed() -> Run:
    return Run("etl", ETL).start().ok(0, 100, 5).ok(1, 200, 10).ok(2, 300, 20).complete(700)


def etl_failed() -> Run:
    return Run("etl", ETL).start().ok(0, 100, 5).error(1, 50, 10, will_retry=False).fail(1, 200)


def etl_map_redelivered() -> Run:
    # PipelineStart and extract's outcome delivered twice; transform maps over 10 items.
    return (Run("etl", ETL).start().ok(0, 100, 5).redeliver(0, 2)
            .map_ok(1, 200, total=10).ok(2, 300, 20).complete(700))


def etl_retried_load() -> Run:
    return (Run("etl", ETL).start().ok(0, 100, 5).ok(1, 200, 10)
            .error(2, 150, 20, will_retry=True).ok(2, 250, 40, attempt=2).complete(900))


def report_retried_render() -> Run:
    return (Run("report", REPORT).start().ok(0, 40, 2)
            .error(1, 30, 3, will_retry=True).ok(1, 60, 1000, attempt=2).complete(1500))


def report_failed_fetch() -> Run:
    return Run("report", REPORT).start().error(0, 80, 2, will_retry=False).fail(0, 100)


def report_retries_exhausted() -> Run:
    return (Run("report", REPORT).start().ok(0, 40, 2).error(1, 30, 3, will_retry=True)
            .error(1, 30, 500, will_retry=False, attempt=2).fail(1, 800))


def cleanup_task() -> Run:
    return Run("cleanup", CLEANUP, "task").start().ok(0, 10, 1).complete(12)


def etl_abandoned() -> Run:
    """Its worker "died" in extract: only the gateway's LOST sweep ends it."""
    return Run("etl", ETL).start().step_start(0, 5)


# Expected gateway metrics for the scenario of test_gateway_metrics_scraped_by_prometheus.
EXPECTED_RUNS = {
    ("etl", "completed"): 3, ("etl", "failed"): 1, ("etl", "lost"): 1,
    ("report", "completed"): 1, ("report", "failed"): 2,
    ("cleanup", "completed"): 2,
}
EVERY_RUN_SERIES = {  # every final status of every pipeline seen, at 0 until counted
    (pipeline, status): float(EXPECTED_RUNS.get((pipeline, status), 0))
    for pipeline, _ in EXPECTED_RUNS for status in RUN_FINAL_STATUSES}
EXPECTED_RUN_DURATION_SUM = {  # seconds, from each terminal event's duration_ms
    ("etl", "completed"): 0.7 + 0.7 + 0.9, ("etl", "failed"): 0.2,
    ("report", "completed"): 1.5, ("report", "failed"): 0.1 + 0.8,
    ("cleanup", "completed"): 0.024,
}
EXPECTED_STEPS = {
    ("etl", "extract", "completed"): 4,
    ("etl", "transform", "completed"): 3, ("etl", "transform", "failed"): 1,
    ("etl", "load", "completed"): 3, ("etl", "load", "retried"): 1,
    ("report", "fetch", "completed"): 2, ("report", "fetch", "failed"): 1,
    ("report", "render", "completed"): 1, ("report", "render", "retried"): 2,
    ("report", "render", "failed"): 1,
    ("cleanup", "cleanup", "completed"): 2,
}
EXPECTED_STEP_DURATION_COUNT = {  # one observation per finished attempt
    ("etl", "extract"): 4, ("etl", "transform"): 4, ("etl", "load"): 4,
    ("report", "fetch"): 3, ("report", "render"): 4, ("cleanup", "cleanup"): 2,
}
EXPECTED_STEP_DURATION_SUM = {("etl", "load"): 0.3 + 0.3 + 0.15 + 0.25,
                              ("report", "render"): 0.03 + 0.06 + 0.03 + 0.03}
EXPECTED_QUEUE_WAIT_COUNT = {  # one per StepStartEvent with a queue_wait_ms
    ("etl", "extract"): 5, ("etl", "transform"): 3, ("etl", "load"): 4,
    ("report", "fetch"): 3, ("report", "render"): 4, ("cleanup", "cleanup"): 2,
}
EXPECTED_QUEUE_WAIT_SUM = {("report", "render"): 0.003 + 1.0 + 0.003 + 0.5}


# --------------------------------------------------------------------------- helpers
def scrape(server: AppServer) -> dict[SeriesKey, float]:
    """Every sample of the gateway's /metrics, keyed by (name, labels)."""
    response = httpx.get(f"{server.url}/metrics", timeout=10)
    response.raise_for_status()
    samples: dict[SeriesKey, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def by_labels(samples: dict[SeriesKey, float], name: str,
              *labels: str) -> dict[tuple[str, ...], float]:
    """``{label values: value}`` of the samples called ``name``."""
    out: dict[tuple[str, ...], float] = {}
    for (sample_name, label_set), value in samples.items():
        if sample_name == name:
            found = dict(label_set)
            out[tuple(found.get(label, "") for label in labels)] = value
    return out


def total(samples: dict[SeriesKey, float], name: str) -> float:
    return sum(value for (sample_name, _), value in samples.items() if sample_name == name)


def publish(server: AppServer, transport: InMemoryTransport, events: list[BaseEvent]) -> None:
    """Publish ``events`` on the gateway's loop in one go (a burst, as from a busy fleet)."""
    async def publish_all() -> None:
        for event in events:
            await transport.publish(event)

    server.call(publish_all)


def wait_for_scrape(server: AppServer, condition: Any, message: str,
                    timeout: float = 20.0) -> dict[SeriesKey, float]:
    seen: list[dict[SeriesKey, float]] = [{}]

    def check() -> bool:
        seen[0] = scrape(server)
        return bool(condition(seen[0]))

    wait_until(check, timeout=timeout, interval=0.05, message=message)
    return seen[0]


class RaisingHook:
    """A gateway hook that fails on every failed run: counted, never fatal."""

    def on_pipeline_error(self, event: PipelineErrorEvent) -> None:
        raise RuntimeError(f"alerting backend down ({event.pipeline_id})")


class StuckHook:
    """A sync gateway hook stuck on its first event until released: its backlog overflows."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def on_event(self, _event: BaseEvent) -> None:
        self.gate.wait(60)


def ws_url(server: AppServer, path: str, token: str = TOKEN) -> str:
    return f"{server.ws_url}{path}?token={token}"


def close_code(client: ClientConnection) -> int | None:
    """Read until the server closes ``client``; its close code."""
    try:
        while True:
            client.recv(timeout=10)
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


# --------------------------------------------------------------------------- tests
@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as resources:
        yield resources


def test_gateway_metrics_scraped_by_prometheus(stack: ExitStack) -> None:
    transport = InMemoryTransport()
    hooks = HookManager(backlog=5)
    raising, stuck = RaisingHook(), StuckHook()
    hooks.add_hook(raising, EventFilter(event_types=["PipelineErrorEvent"]))
    hooks.add_hook(stuck)
    app = create_app(transport, hooks=hooks, stale_after=STALE_AFTER, max_connections=2,
                     token=TOKEN, allowed_origins=["http://localhost:8000"], send_queue_size=20)
    server = stack.enter_context(AppServer(app))
    stack.callback(stuck.gate.set)  # runs before the server stops: shutdown does not wait
    prometheus = stack.enter_context(PrometheusServer([server.address]))
    prometheus.wait_for_up()

    baseline = scrape(server)
    drops_before = by_labels(baseline, "flowtrace_events_dropped_total", "reason")
    hook_errors_before = by_labels(baseline, "flowtrace_hook_errors_total", "hook")

    # Every pipeline finishes runs in both bursts, so that Prometheus sees its counters
    # move (a series born in the last burst has a zero rate over the window).
    first = [etl_completed(), etl_failed(), report_retried_render(), report_failed_fetch(),
             cleanup_task()]
    watched = etl_map_redelivered()
    abandoned = etl_abandoned()
    second = [watched, etl_retried_load(), report_retries_exhausted(), cleanup_task(),
              abandoned]
    burst1 = [e for run in first for e in run.events]
    burst2 = [e for run in second for e in run.events]
    assert len(burst1) > 20, "the first burst must overflow the slow client's queue"

    # WebSocket clients: one watching a run, one on every run that never reads (slow).
    watcher = stack.enter_context(connect(ws_url(server, f"/ws/{watched.id}")))
    assert '"subscribed"' in str(watcher.recv(timeout=10))
    slow = stack.enter_context(connect(ws_url(server, "/ws/*"), max_queue=None))
    assert '"subscribed"' in str(slow.recv(timeout=10))
    # Refused: over the limit (2), a wrong token, a foreign Origin.
    with connect(ws_url(server, "/ws/*")) as third:
        assert close_code(third) == 1013
    with connect(ws_url(server, "/ws/*", token="wrong")) as intruder:
        assert close_code(intruder) == 1008
    with pytest.raises(InvalidStatus) as refused:
        connect(ws_url(server, "/ws/*"), origin="http://evil.example")
    assert refused.value.response.status_code == 403

    # Burst 1; the slow client is disconnected when its queue overflows.
    publish(server, transport, burst1)
    wait_for_scrape(server, lambda s: total(s, "flowtrace_events_total") == len(burst1)
                    and total(s, "flowtrace_ws_connections") == 1, "burst 1 consumed")
    assert close_code(slow) == 4008
    # Prometheus sees the state between the bursts, so rates over both are non-zero.
    prometheus.wait_for_query(
        'flowtrace_pipeline_runs_total{pipeline="etl", status="completed"} == 1')

    publish(server, transport, burst2)
    mid = wait_for_scrape(
        server, lambda s: total(s, "flowtrace_events_total") >= len(burst1) + len(burst2),
        "burst 2 consumed")
    if total(mid, "flowtrace_events_total") == len(burst1) + len(burst2):  # not LOST yet
        assert by_labels(mid, "flowtrace_pipelines_in_progress", "pipeline")[("etl",)] == 1

    # The abandoned run is declared LOST; the raising hook saw every failed run.
    final = wait_for_scrape(
        server, lambda s: by_labels(s, "flowtrace_pipeline_runs_total", "pipeline", "status")
        .get(("etl", "lost")) == 1
        and by_labels(s, "flowtrace_hook_errors_total", "hook").get(("RaisingHook",), 0)
        - hook_errors_before.get(("RaisingHook",), 0) == 4,
        "the LOST run and 4 hook errors", timeout=STALE_AFTER * 5)

    # The watcher got its run's events live, through the end of the run.
    received: list[str] = []
    wait_until(lambda: received.append(str(watcher.recv(timeout=10)))
               or '"PipelineCompleteEvent"' in received[-1], timeout=20,
               message="the watched run's PipelineCompleteEvent")
    assert sum('"pipeline_id"' in text for text in received) >= len(watched.events)

    # ---- every SPEC §5 metric and label, exact ------------------------------------
    runs = by_labels(final, "flowtrace_pipeline_runs_total", "pipeline", "status")
    # Every final status of every pipeline seen is a series, at 0 until counted.
    assert runs == EVERY_RUN_SERIES
    durations = by_labels(final, "flowtrace_pipeline_duration_seconds_count", "pipeline", "status")
    assert durations == {k: float(v) for k, v in EXPECTED_RUNS.items()}
    sums = by_labels(final, "flowtrace_pipeline_duration_seconds_sum", "pipeline", "status")
    for key, expected in EXPECTED_RUN_DURATION_SUM.items():
        assert sums[key] == pytest.approx(expected), key
    assert sums[("etl", "lost")] >= STALE_AFTER  # kick to the LOST declaration
    assert by_labels(final, "flowtrace_pipelines_in_progress", "pipeline") == {
        ("etl",): 0.0, ("report",): 0.0, ("cleanup",): 0.0}

    steps = by_labels(final, "flowtrace_step_runs_total", "pipeline", "step", "status")
    assert steps == {k: float(v) for k, v in EXPECTED_STEPS.items()}
    step_counts = by_labels(final, "flowtrace_step_duration_seconds_count", "pipeline", "step")
    assert step_counts == {k: float(v) for k, v in EXPECTED_STEP_DURATION_COUNT.items()}
    step_sums = by_labels(final, "flowtrace_step_duration_seconds_sum", "pipeline", "step")
    for key, expected in EXPECTED_STEP_DURATION_SUM.items():
        assert step_sums[key] == pytest.approx(expected), key
    waits = by_labels(final, "flowtrace_step_queue_wait_seconds_count", "pipeline", "step")
    assert waits == {k: float(v) for k, v in EXPECTED_QUEUE_WAIT_COUNT.items()}
    wait_sums = by_labels(final, "flowtrace_step_queue_wait_seconds_sum", "pipeline", "step")
    for key, expected in EXPECTED_QUEUE_WAIT_SUM.items():
        assert wait_sums[key] == pytest.approx(expected), key
    # Buckets are cumulative and end with +Inf == _count.
    buckets = by_labels(final, "flowtrace_pipeline_duration_seconds_bucket",
                        "pipeline", "status", "le")
    assert buckets[("etl", "completed", "0.5")] == 0
    assert buckets[("etl", "completed", "1.0")] == 3
    assert buckets[("etl", "completed", "+Inf")] == 3

    published = Counter(event.type for event in burst1 + burst2)  # type: ignore[attr-defined]
    published["PipelineErrorEvent"] += 1  # the gateway's own LOST declaration
    events = by_labels(final, "flowtrace_events_total", "type")
    assert events == {(k,): float(v) for k, v in published.items()}

    drops = by_labels(final, "flowtrace_events_dropped_total", "reason")
    grown = {k: v - drops_before.get(k, 0) for k, v in drops.items()
             if v != drops_before.get(k, 0)}
    assert set(grown) == {("hook_backlog",)}, grown  # the transport itself lost nothing
    assert grown[("hook_backlog",)] >= 1

    assert total(final, "flowtrace_ws_connections") == 1  # the watcher
    assert by_labels(final, "flowtrace_ws_connections_rejected_total", "reason") == {
        ("limit",): 1.0, ("auth",): 1.0, ("origin",): 1.0}
    assert total(final, "flowtrace_ws_messages_sent_total") >= len(received)
    ws_dropped = by_labels(final, "flowtrace_ws_messages_dropped_total", "reason")
    assert ws_dropped.get(("slow_consumer",), 0) >= 1

    # No label value is a run id, a task id or an error message.
    for (_, label_set) in final:
        for label, value in label_set:
            assert len(value) < 40, (label, value)
            assert "invalid input" not in value
    assert not any(run.id in value for run in first + second
                   for (_, label_set) in final for _, value in label_set)

    # ---- the same, through the real Prometheus --------------------------------------
    expected_events = sum(published.values())
    prometheus.wait_for_query(
        f"sum(flowtrace_events_total) == {expected_events}"
        ' and on() sum(flowtrace_pipelines_in_progress) == 0'
        ' and on() flowtrace_pipeline_runs_total{pipeline="etl", status="lost"} == 1')
    in_prometheus = {
        (s["metric"]["pipeline"], s["metric"]["status"]): sample_value(s)
        for s in prometheus.query("flowtrace_pipeline_runs_total")}
    assert in_prometheus == EVERY_RUN_SERIES
    (up,) = prometheus.query('up{job="flowtrace-gateway"}')
    assert sample_value(up) == 1

    # ---- every dashboard panel returns data -------------------------------------------
    queries = panel_queries(load_dashboard())
    empty: list[str] = []
    for pipeline, step in ((".*", ".*"), ("etl", "load"), ("(etl|report)", ".*"),
                           ("report", "(fetch|render)")):
        for query in queries:
            expr = substitute(query.expr, {"pipeline": pipeline, "step": step})
            result = prometheus.query(expr)
            if not result or not any(math.isfinite(sample_value(s)) for s in result):
                empty.append(f"panel {query.panel_id} {query.panel_title!r} "
                             f"(pipeline={pipeline}, step={step}): {result}\n  {expr}")
    assert not empty, "\n".join(empty)


def test_series_do_not_grow_with_runs(stack: ExitStack) -> None:
    """1 000 runs with distinct ids produce exactly the series of 10 runs."""
    templates = [etl_completed, etl_failed, etl_map_redelivered, etl_retried_load,
                 report_retried_render, report_failed_fetch, report_retries_exhausted,
                 cleanup_task, etl_completed, cleanup_task]
    transport = InMemoryTransport(maxlen=20_000, subscriber_queue_size=20_000)
    server = stack.enter_context(AppServer(create_app(transport)))

    def run_batch(count: int, offset: int) -> list[Run]:
        return [templates[(offset + i) % len(templates)]() for i in range(count)]

    def publish_and_wait(runs: list[Run], events_so_far: int) -> dict[SeriesKey, float]:
        events = [e for run in runs for e in run.events]
        publish(server, transport, events)
        expected = events_so_far + len(events)
        return wait_for_scrape(server, lambda s: total(s, "flowtrace_events_total") == expected,
                               f"{expected} events consumed")

    first = run_batch(10, 0)
    ten = publish_and_wait(first, 0)
    more = run_batch(990, 10)
    thousand = publish_and_wait(more, int(total(ten, "flowtrace_events_total")))

    gateway_series = {key for key in ten if key[0].startswith("flowtrace_")}
    assert len(gateway_series) > 50
    assert {key for key in thousand if key[0].startswith("flowtrace_")} == gateway_series
    assert total(thousand, "flowtrace_pipeline_runs_total") == 1000
    assert total(thousand, "flowtrace_pipelines_in_progress") == 0
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert not any(run.id in text for run in first + more)
