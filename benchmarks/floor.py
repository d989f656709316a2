"""A lower bound for the worker-overhead benchmark: the least a middleware does for a
plain task that delivers what SPEC §3/§4 ask of flowtrace, written flat.

For each message: the run label and kicked-at label on send, a PipelineStartEvent; on
execution, one span (the run's root, from the kick) made current, a StepStartEvent, and at
the end a StepCompleteEvent and a PipelineCompleteEvent, each event with every field,
handed to the span (as a span event), the hooks and the in-memory transport; the span
handed to the SDK's processor.

The pieces are flowtrace's own (the label codec, the event ids and span attributes, the
emitter, span record, current-span access, hooks and transport), so the floor cannot drift
from what flowtrace emits; what it leaves out is the middleware around them: no placement
checks, no pipelines (a pipeline's hops count as plain tasks), no retries, failures or
payload previews, no guards around hooks. Not a product: a measuring stick for how much
of flowtrace's cost is the contract's work and how much is flowtrace's own code.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from taskiq import TaskiqMessage, TaskiqMiddleware, TaskiqResult

from flowtrace.emitter import Emitter
from flowtrace.hooks import HookManager
from flowtrace.labels import KICKED_AT_LABEL, RUN_LABEL, RunContext, kicked_at

# The contract's shapes, as the middleware builds them.
from flowtrace.middleware import _event_ids, _step_attributes
from flowtrace.tracing.current import make_current, restore_current
from flowtrace.tracing.spans import SpanRecord, SpanSink, new_span_id, new_trace_id
from flowtrace.transport.memory import InMemoryTransport

_now, _UTC, _time_ns, _perf_ns = datetime.now, timezone.utc, time.time_ns, time.perf_counter_ns


@dataclass(slots=True, init=False, eq=False)
class _Execution:
    duration_ms: float
    ids: dict[str, Any]
    perf_ns: int
    run: RunContext
    span: SpanRecord
    span_token: Any
    token: contextvars.Token[_Execution | None]


class FloorMiddleware(TaskiqMiddleware):
    """See the module docstring. ``hooks`` and ``transport`` as on ``FlowtraceMiddleware``."""

    def __init__(self, provider: TracerProvider, hooks: HookManager,
                 transport: InMemoryTransport) -> None:
        super().__init__()
        self.hooks, self.transport = hooks, transport
        self.emitter = Emitter(transport, hooks, capture_payloads=False, max_payload_bytes=0,
                               redact=None)
        self._sink = SpanSink(provider)
        self._current: contextvars.ContextVar[_Execution | None] = contextvars.ContextVar(
            "floor_execution", default=None)

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        sent = _time_ns()
        run = RunContext(message.task_id, message.task_name, "task", sent, new_trace_id(),
                         new_span_id(), 0, True)
        message.labels[RUN_LABEL] = run.encode()
        message.labels[KICKED_AT_LABEL] = str(sent)
        trace_hex, root_hex = run.hex_ids()
        self.emitter.emit({
            "id": None, "pipeline_id": run.pipeline_id, "pipeline_name": run.name,
            "pipeline_type": run.type, "trace_id": trace_hex, "span_id": root_hex,
            "timestamp": _now(_UTC), "type": "PipelineStartEvent", "input": None,
            "total_steps": 1, "steps": [message.task_name],
        }, None, sent)
        return message

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        now, execution = _time_ns(), _Execution()
        run = RunContext.decode(message.labels[RUN_LABEL])
        assert run is not None  # every message went through pre_send
        execution.run = run
        execution.perf_ns = _perf_ns()
        span = execution.span = SpanRecord(
            run.name, run.trace_id, run.root_span_id, 0, run.started_ns, True, SpanKind.CONSUMER,
            _step_attributes(run, run.name, 0, 1, message.task_id),
            ["PipelineStartEvent", 1, run.started_ns])
        execution.ids = _event_ids(run, span)
        execution.token, execution.span_token = self._current.set(execution), make_current(span)
        sent = kicked_at(message.labels) or now
        self.emitter.emit({
            **execution.ids, "timestamp": _now(_UTC), "type": "StepStartEvent",
            "step_name": run.name, "step_index": 0, "task_id": message.task_id, "attempt": 1,
            "queue_wait_ms": (now - sent) / 1e6, "worker": self.emitter.worker,
        }, span, now)
        return message

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        execution = self._current.get()
        if execution is not None:
            execution.duration_ms = (_perf_ns() - execution.perf_ns) / 1e6

    def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        execution = self._current.get()
        if execution is None:
            return
        timestamp, now = _now(_UTC), _time_ns()
        run, span, ids = execution.run, execution.span, execution.ids
        self.emitter.emit({
            **ids, "timestamp": timestamp, "type": "StepCompleteEvent", "step_name": run.name,
            "step_index": 0, "task_id": message.task_id, "attempt": 1, "result": None,
            "duration_ms": execution.duration_ms,
        }, span, now)
        self.emitter.emit({
            **ids, "timestamp": timestamp, "type": "PipelineCompleteEvent",
            "status": "COMPLETED", "duration_ms": (now - run.started_ns) / 1e6, "result": None,
        }, span, now)
        self._sink.emit(span, now)
        restore_current(execution.span_token)
        self._current.reset(execution.token)
