"""Prometheus metrics (SPEC §5), named after prometheus/client_python conventions.

Two registries, so nothing is ever exposed twice:

* the *process* registry: ``flowtrace_hook_errors_total`` and
  ``flowtrace_events_dropped_total``, which exist wherever they happen (a worker's
  ``metrics_port``, or the gateway process itself);
* a :class:`GatewayMetrics` registry per gateway, fed by the run store from the
  events of every worker: runs, steps, events and WebSocket metrics.

No label ever carries an unbounded value: pipelines and steps are identified by
their names, which are low-cardinality by construction.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from flowtrace.events import EVENT_TYPES

# Runs and steps last from milliseconds (a no-op task) to an hour (a batch job):
# roughly logarithmic buckets, dense below a second where most steps land, with
# enough upper buckets that p99 of hour-long pipelines is still resolved.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)
# Queue waits are usually milliseconds; a backlog pushes them to minutes.
QUEUE_WAIT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 300.0, 600.0,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# The ``reason`` label values, defined here only. They are closed sets, as are the event
# types of ``flowtrace_events_total``, so every series of them is created at 0 with its
# counter: Prometheus's rate() and increase() ignore a series' first sample, and a counter
# born at its first drop would hide that drop from dashboards and alerts.
DROP_BUFFER_FULL: Final = "buffer_full"  # a transport's publish buffer overflowed
DROP_CLOSED: Final = "closed"  # published to, or still buffered in, a closed transport
DROP_HOOK_BACKLOG: Final = "hook_backlog"  # a hook fell too far behind
DROP_INVALID_EVENT: Final = "invalid_event"  # a payload on the transport did not parse
DROP_NO_EVENT_LOOP: Final = "no_event_loop"  # emitted outside an event loop: no hook got it
DROP_REDIS_ERROR: Final = "redis_error"  # Redis rejected a batch
DROP_SUBSCRIBER_OVERFLOW: Final = "subscriber_overflow"  # an in-memory subscriber fell behind
DROP_UNSERIALIZABLE: Final = "unserializable"  # an event could not be encoded as JSON
EVENT_DROP_REASONS: Final = (
    DROP_BUFFER_FULL, DROP_CLOSED, DROP_HOOK_BACKLOG, DROP_INVALID_EVENT, DROP_NO_EVENT_LOOP,
    DROP_REDIS_ERROR, DROP_SUBSCRIBER_OVERFLOW, DROP_UNSERIALIZABLE,
)
"""``flowtrace_events_dropped_total{reason}``."""

RUN_FINAL_STATUSES: Final = ("completed", "failed", "lost")
"""``status`` of ``flowtrace_pipeline_runs_total``."""

WS_DROP_SLOW_CONSUMER: Final = "slow_consumer"  # queued for a client closed 4008
WS_DROP_CLOSED: Final = "closed"  # queued for a client closed for another reason
WS_DROP_SHUTDOWN: Final = "shutdown"  # queued for a client closed 1001 (going away)
WS_DROP_REASONS: Final = (WS_DROP_SLOW_CONSUMER, WS_DROP_CLOSED, WS_DROP_SHUTDOWN)
"""``flowtrace_ws_messages_dropped_total{reason}``."""

REJECT_LIMIT: Final = "limit"  # max_connections reached (close 1013)
REJECT_AUTH: Final = "auth"  # missing or wrong token (close 1008)
REJECT_ORIGIN: Final = "origin"  # Origin not allowed (HTTP 403)
WS_REJECT_REASONS: Final = (REJECT_LIMIT, REJECT_AUTH, REJECT_ORIGIN)
"""``flowtrace_ws_connections_rejected_total{reason}`` (SPEC §5)."""

PROCESS_REGISTRY = CollectorRegistry(auto_describe=True)
HOOK_ERRORS = Counter(
    "flowtrace_hook_errors_total",
    "Hook calls that raised, by hook class name.",
    ["hook"],
    registry=PROCESS_REGISTRY,
)
EVENTS_DROPPED = Counter(
    "flowtrace_events_dropped_total",
    "Events lost in this process, by reason (hook backlog full, transport buffer full, ...).",
    ["reason"],
    registry=PROCESS_REGISTRY,
)


def count_hook_error(hook: str) -> None:
    HOOK_ERRORS.labels(hook=hook).inc()


def count_drop(reason: str, count: int = 1) -> None:
    """``reason`` is one of :data:`EVENT_DROP_REASONS`."""
    EVENTS_DROPPED.labels(reason=reason).inc(count)


class GatewayMetrics:
    """Run, step, event and WebSocket metrics of one gateway, in its own registry."""

    counting = True
    """False while the gateway replays history at start-up: the in-progress gauge follows the
    replayed runs, but counters and histograms start from zero, as after any restart.
    Counting what is still retained would restart them *lower* than before once the stream
    was trimmed, which ``rate()`` reads as a reset followed by the whole history at once."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.pipeline_runs = Counter(
            "flowtrace_pipeline_runs_total", "Finished runs by pipeline and final status.",
            ["pipeline", "status"], registry=r)
        self.pipeline_duration = Histogram(
            "flowtrace_pipeline_duration_seconds", "Run duration from kick to end.",
            ["pipeline", "status"], buckets=DURATION_BUCKETS, registry=r)
        self.pipelines_in_progress = Gauge(
            "flowtrace_pipelines_in_progress", "Runs started and not yet finished.",
            ["pipeline"], registry=r)
        self.step_runs = Counter(
            "flowtrace_step_runs_total", "Step attempts by outcome.",
            ["pipeline", "step", "status"], registry=r)
        self.step_duration = Histogram(
            "flowtrace_step_duration_seconds", "Step attempt execution time.",
            ["pipeline", "step"], buckets=DURATION_BUCKETS, registry=r)
        self.step_queue_wait_seconds = Histogram(
            "flowtrace_step_queue_wait_seconds", "Time a step waited between kick and start.",
            ["pipeline", "step"], buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.events = Counter(
            "flowtrace_events_total", "Events consumed by this gateway, by type.",
            ["type"], registry=r)
        self.ws_connections = Gauge(
            "flowtrace_ws_connections", "Open WebSocket connections.", registry=r)
        self.ws_rejected = Counter(
            "flowtrace_ws_connections_rejected_total", "WebSocket connections refused.",
            ["reason"], registry=r)
        self.ws_sent = Counter(
            "flowtrace_ws_messages_sent_total", "Messages sent to WebSocket clients.", registry=r)
        self.ws_dropped = Counter(
            "flowtrace_ws_messages_dropped_total", "Messages not delivered to a WebSocket client.",
            ["reason"], registry=r)
        self.transport_up = Gauge(
            "flowtrace_transport_up",
            "1 while this gateway can read its transport (Redis), else 0.", registry=r)
        self.transport_up.set(1)
        self._pipelines: set[str] = set()
        _create_series(self.events, "type", EVENT_TYPES)
        _create_series(self.ws_rejected, "reason", WS_REJECT_REASONS)
        _create_series(self.ws_dropped, "reason", WS_DROP_REASONS)

    # Runs -----------------------------------------------------------------
    def run_started(self, pipeline: str) -> None:
        if pipeline not in self._pipelines:
            # Every final status of a new pipeline exposed at 0: the first failed or lost run
            # is then an increase that rate() and increase() see (and alerts with them).
            self._pipelines.add(pipeline)
            for status in RUN_FINAL_STATUSES:
                self.pipeline_runs.labels(pipeline=pipeline, status=status)
        self.pipelines_in_progress.labels(pipeline=pipeline).inc()

    def run_finished(self, pipeline: str, status: str, duration_s: float | None,
                     was_in_progress: bool = True) -> None:
        """Count a finished run; ``status`` is completed, failed or lost."""
        if self.counting:
            self.pipeline_runs.labels(pipeline=pipeline, status=status).inc()
            if duration_s is not None:
                self.pipeline_duration.labels(pipeline=pipeline, status=status).observe(
                    duration_s)
        if was_in_progress:
            self.pipelines_in_progress.labels(pipeline=pipeline).dec()

    # Steps ----------------------------------------------------------------
    def step_finished(self, pipeline: str, step: str, status: str,
                      duration_s: float | None) -> None:
        """Count a step attempt; ``status`` is completed, failed or retried."""
        if not self.counting:
            return
        self.step_runs.labels(pipeline=pipeline, step=step, status=status).inc()
        if duration_s is not None:
            self.step_duration.labels(pipeline=pipeline, step=step).observe(duration_s)

    def step_queue_wait(self, pipeline: str, step: str, wait_s: float) -> None:
        if self.counting:
            self.step_queue_wait_seconds.labels(pipeline=pipeline, step=step).observe(
                max(0.0, wait_s))

    def event_seen(self, event_type: str) -> None:
        if self.counting:
            self.events.labels(type=event_type).inc()

    # WebSocket ------------------------------------------------------------
    def ws_connected(self) -> None:
        self.ws_connections.inc()

    def ws_disconnected(self) -> None:
        self.ws_connections.dec()

    def ws_connection_rejected(self, reason: str) -> None:
        """``reason`` is one of :data:`WS_REJECT_REASONS`."""
        self.ws_rejected.labels(reason=reason).inc()

    def ws_messages_sent(self, count: int = 1) -> None:
        self.ws_sent.inc(count)

    def ws_messages_dropped(self, reason: str, count: int = 1) -> None:
        self.ws_dropped.labels(reason=reason).inc(count)

    def render(self) -> bytes:
        """Prometheus text for this gateway plus this process's own counters."""
        return generate_latest(self.registry) + generate_latest(PROCESS_REGISTRY)


def _create_series(counter: Counter, label: str, values: tuple[str, ...]) -> None:
    """Expose ``counter{label=value}`` at 0 for each value, before anything is counted."""
    for value in values:
        counter.labels(**{label: value})


_create_series(EVENTS_DROPPED, "reason", EVENT_DROP_REASONS)


def render_process_metrics() -> bytes:
    return generate_latest(PROCESS_REGISTRY)


def serve_process_metrics(port: int, addr: str = "0.0.0.0") -> None:
    """Expose this process's own counters (hook errors, local drops) on ``port``."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=addr, registry=PROCESS_REGISTRY)
