"""A lower bound for the worker-overhead benchmark: the least a middleware does for a
plain task that delivers what SPEC §3/§4 ask of flowtrace, written flat.

For each message: the run label and kicked-at label on send, a PipelineStartEvent; on
execution, one span (the run's root, from the kick) made current, a StepStartEvent, and at
the end a StepCompleteEvent and a PipelineCompleteEvent, each event with every field,
handed to the span (as a span event), the hooks and the in-memory transport; the span
handed to the SDK's processor. It reuses flowtrace's span record, current-span access,
hooks and transport, and nothing of its middleware: no placement checks, no pipelines
(a pipeline's hops count as plain tasks), no retries, failures or payload previews, no
guards around hooks. Not a product: a measuring stick for how much of flowtrace's cost
is the contract's work and how much is flowtrace's own code.
"""

from __future__ import annotations

import contextvars
import os
import socket
import time
from datetime import datetime, timezone
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from taskiq import TaskiqMessage, TaskiqMiddleware, TaskiqResult

from flowtrace.hooks import HookManager
from flowtrace.tracing.current import make_current, restore_current
from flowtrace.tracing.spans import SpanRecord, SpanSink, new_span_id, new_trace_id
from flowtrace.transport.memory import InMemoryTransport

RUN_LABEL, KICKED_AT_LABEL = "flowtrace_run", "flowtrace_kicked_at"
_now, _UTC, _time_ns, _perf_ns = datetime.now, timezone.utc, time.time_ns, time.perf_counter_ns


class _Run:
    __slots__ = ("duration_ms", "name", "perf_ns", "pipeline_id", "span", "span_hex",
                 "span_token", "started_ns", "task_id", "token", "trace_hex")


class FloorMiddleware(TaskiqMiddleware):
    """See the module docstring. ``hooks`` and ``transport`` as on ``FlowtraceMiddleware``."""

    def __init__(self, provider: TracerProvider, hooks: HookManager,
                 transport: InMemoryTransport) -> None:
        super().__init__()
        self.hooks, self.transport = hooks, transport
        self._sink = SpanSink(provider)
        self._current: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
            "floor_run", default=None)
        self._worker = f"{socket.gethostname()}:{os.getpid()}"

    def _emit(self, fields: dict[str, Any], span: SpanRecord | None, time_ns: int) -> None:
        if span is not None:
            span.event_data += (fields["type"], fields, time_ns)
        self.hooks.emit_nowait(fields)
        self.transport.publish_fields_nowait(fields)

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        sent = _time_ns()
        label = "%d%032x%016x%016x%d:%s:%d:%s%s" % (  # noqa: UP031 - as flowtrace's label
            1, new_trace_id(), new_span_id(), 0, sent, "task", len(message.task_id),
            message.task_id, message.task_name)
        message.labels[RUN_LABEL] = label
        message.labels[KICKED_AT_LABEL] = str(sent)
        self._emit({
            "id": None, "pipeline_id": message.task_id, "pipeline_name": message.task_name,
            "pipeline_type": "task", "trace_id": label[1:33], "span_id": label[33:49],
            "timestamp": _now(_UTC), "type": "PipelineStartEvent", "input": None,
            "total_steps": 1, "steps": [message.task_name],
        }, None, sent)
        return message

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        labels, now, run = message.labels, _time_ns(), _Run()
        label = labels[RUN_LABEL]
        started, _, size, rest = label[65:].split(":", 3)
        length = int(size)
        run.task_id, run.pipeline_id, run.name = message.task_id, rest[:length], rest[length:]
        run.trace_hex, run.span_hex, run.started_ns = label[1:33], label[33:49], int(started)
        run.perf_ns = _perf_ns()
        span = run.span = SpanRecord(
            run.name, int(run.trace_hex, 16), int(run.span_hex, 16), 0, run.started_ns, True,
            SpanKind.CONSUMER, {
                "messaging.system": "taskiq", "messaging.operation.type": "process",
                "messaging.message.id": run.task_id, "flowtrace.pipeline.id": run.pipeline_id,
                "flowtrace.pipeline.name": run.name, "flowtrace.pipeline.type": "task",
                "flowtrace.step.index": 0, "flowtrace.step.name": run.name,
                "flowtrace.step.attempt": 1,
            }, ("PipelineStartEvent", 1, run.started_ns))
        run.token, run.span_token = self._current.set(run), make_current(span)
        self._emit({
            "id": None, "pipeline_id": run.pipeline_id, "pipeline_name": run.name,
            "pipeline_type": "task", "trace_id": run.trace_hex, "span_id": run.span_hex,
            "timestamp": _now(_UTC), "type": "StepStartEvent", "step_name": run.name,
            "step_index": 0, "task_id": run.task_id, "attempt": 1,
            "queue_wait_ms": (now - int(labels[KICKED_AT_LABEL])) / 1e6, "worker": self._worker,
        }, span, now)
        return message

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        run = self._current.get()
        if run is not None:
            run.duration_ms = (_perf_ns() - run.perf_ns) / 1e6

    def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        run = self._current.get()
        if run is None:
            return
        timestamp, now, span = _now(_UTC), _time_ns(), run.span
        ids = {"id": None, "pipeline_id": run.pipeline_id, "pipeline_name": run.name,
               "pipeline_type": "task", "trace_id": run.trace_hex, "span_id": run.span_hex,
               "timestamp": timestamp}
        self._emit({**ids, "type": "StepCompleteEvent", "step_name": run.name, "step_index": 0,
                    "task_id": run.task_id, "attempt": 1, "result": None,
                    "duration_ms": run.duration_ms}, span, now)
        self._emit({**ids, "type": "PipelineCompleteEvent", "status": "COMPLETED",
                    "duration_ms": (now - run.started_ns) / 1e6, "result": None}, span, now)
        self._sink.emit(span, now)
        restore_current(run.span_token)
        self._current.reset(run.token)
