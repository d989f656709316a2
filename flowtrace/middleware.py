"""The taskiq middleware: the one place where flowtrace looks at taskiq.

It turns taskiq's hooks into SPEC §3 events and SPEC §4 spans, for plain tasks
and for taskiq-pipelines pipelines. Placement matters and is enforced: the
middleware sits first in ``broker.middlewares`` (so its ``post_*``/``on_error``
hooks run after everyone else's, including ``PipelineMiddleware.post_save``, which
kicks the next hop) and a small companion sits last (its ``on_error`` runs first,
capturing the exception before a retry middleware re-kicks the task).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import datetime, timezone
from typing import Any, TypeAlias, TypeVar

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from taskiq import AsyncBroker, TaskiqMessage, TaskiqMiddleware, TaskiqResult
from taskiq.exceptions import NoResultError
from taskiq_pipelines import AbortPipeline

from flowtrace import metrics
from flowtrace.emitter import Emitter
from flowtrace.events import EventFields, error_text
from flowtrace.execution import (
    DONE,
    HANDOFF,
    ITEM,
    STEP,
    WAITER,
    Execution,
    Role,
    current_execution,
)
from flowtrace.hooks import HookManager, hooks_of
from flowtrace.labels import (
    KICKED_AT_LABEL,
    NAME_LABEL,
    RUN_LABEL,
    STEP_LABEL,
    STEP_WORKER_LABEL,
    RunContext,
    StepContext,
    kicked_at,
)
from flowtrace.pipeline_data import (
    CURRENT_STEP,
    FILTER_WAITER,
    MAP_WAITER,
    PIPELINE_DATA,
    StepInfo,
    current_step,
    parse_steps,
)
from flowtrace.progress import ProgressMonitor, counter_key
from flowtrace.tracing.current import current_parent, make_current, restore_current
from flowtrace.tracing.setup import configure_tracing, flush_tracing
from flowtrace.tracing.spans import (
    SpanRecord,
    SpanSink,
    derived_trace_ids,
    new_span_id,
    new_trace_id,
)
from flowtrace.transport.base import Transport
from flowtrace.transport.memory import InMemoryTransport

logger = logging.getLogger("flowtrace")

WAITER_TASKS = frozenset({MAP_WAITER, FILTER_WAITER})
_PIPELINES_LOGGER = "taskiq_pipelines.middleware"

T = TypeVar("T")

MaybeAwaitable: TypeAlias = "T | Coroutine[Any, Any, T]"
"""What a hook returns: taskiq awaits a coroutine and takes anything else as is.

The hooks do their work synchronously and return a coroutine only when they must
wait (a transport flush before a pipeline hop, a map step's Redis counters): on a
plain task nothing of flowtrace is awaited at all.
"""


_SHUTDOWN_WAIT_S = 4.0
"""The longest a broker's shutdown waits for hooks and the span flush (they run at once):
under taskiq's default ``--shutdown-timeout`` of 5 s, which cuts the whole shutdown off."""

_HOOK_FAILED = "flowtrace: %s failed; the task is unaffected"
"""flowtrace must never fail the task it observes: every hook logs this and carries on."""


async def _guarded(work: Awaitable[T], default: T, hook: str) -> T:
    """``await work``, or ``default`` if it raised (logged as :data:`_HOOK_FAILED`)."""
    try:
        return await work
    except Exception:
        logger.exception(_HOOK_FAILED, hook)
        return default


def _call_input(args: list[Any], kwargs: dict[str, Any]) -> Any:
    """A task's input as users think of it: the single positional argument, else args and
    kwargs (a keyword-only call must not read as one positional dict)."""
    if len(args) == 1 and not kwargs:
        return args[0]
    return {"args": list(args), "kwargs": kwargs}


_time_ns = time.time_ns
_perf_ns = time.perf_counter_ns
_now = datetime.now
_UTC = timezone.utc
_CONSUMER = SpanKind.CONSUMER


def _clock() -> tuple[datetime, int]:
    """Now, as an event's timestamp and in ns (two clock reads: a datetime built from the
    ns costs twice as much as ``datetime.now``)."""
    return _now(_UTC), _time_ns()


def _utc(time_ns: int) -> datetime:
    return datetime.fromtimestamp(time_ns / 1e9, timezone.utc)


def _event_ids(run: RunContext, span: SpanRecord | None) -> dict[str, Any]:
    """The fields every event of a run starts with, in declared order (see ``BaseEvent``).

    The span's ids only when it is recorded: an unsampled run has no trace to link.
    """
    if span is None or not span.sampled:
        trace_hex = span_hex = None
    else:
        trace_hex, span_hex = run.hex_ids()
        if span.span_id != run.root_span_id:
            span_hex = span.span_id_hex
    return {
        "id": None,
        "pipeline_id": run.pipeline_id,
        "pipeline_name": run.name,
        "pipeline_type": run.type,
        "trace_id": trace_hex,
        "span_id": span_hex,
    }


def _label_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _run_attributes(run: RunContext) -> dict[str, Any]:
    """The run's fields as span event attributes (SPEC §4: scalar fields, ``flowtrace.``)."""
    return {
        "flowtrace.pipeline_id": run.pipeline_id,
        "flowtrace.pipeline_name": run.name,
        "flowtrace.pipeline_type": run.type,
    }


def _step_attributes(run: RunContext, name: str, index: int, attempt: int,
                     task_id: str) -> dict[str, Any]:
    """SPEC §4's attributes of a step (and item) span: messaging conventions + flowtrace."""
    return {
        "messaging.system": "taskiq",
        "messaging.operation.type": "process",
        "messaging.message.id": task_id,
        "flowtrace.pipeline.id": run.pipeline_id,
        "flowtrace.pipeline.name": run.name,
        "flowtrace.pipeline.type": run.type,
        "flowtrace.step.index": index,
        "flowtrace.step.name": name,
        "flowtrace.step.attempt": attempt,
    }


class _ErrorCapture(TaskiqMiddleware):
    """Sits last so that its ``on_error`` runs first, before any retry is kicked."""

    def on_error(self, message: TaskiqMessage, result: TaskiqResult[Any],
                 exception: BaseException) -> None:
        execution = current_execution.get()
        if execution is not None and execution.task_id == message.task_id:
            execution.exception = exception


class _AbortCapture(logging.Filter):
    """Reads the reason of a pipeline aborted inside ``PipelineMiddleware.post_save``.

    taskiq-pipelines catches ``AbortPipeline`` itself and only logs it; the log
    record is the one place its reason is visible.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args and isinstance(args[0], BaseException):
            execution = current_execution.get()
            if execution is not None and "abort" in str(record.msg).lower():
                execution.abort_error = args[0]
        return True


_abort_capture = _AbortCapture()


class _SaveFailureCapture(logging.Filter):
    """Reads the exception taskiq logs when storing a result or a ``post_save`` raised.

    When a middleware's ``post_save`` raises, taskiq logs it and skips every later
    ``post_save``, flowtrace's (it runs last) included: the log record is where the
    reason of the skipped hop is visible.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc_info = record.exc_info
        if (exc_info and isinstance(exc_info[1], Exception)
                and str(record.msg).startswith(_SAVE_FAILED_MESSAGE)):
            execution = current_execution.get()
            if execution is not None and execution.owner is not None:
                if execution.abort_error is None:
                    execution.abort_error = exc_info[1]
                # flowtrace's post_save will not run: report the stored result instead.
                asyncio.get_running_loop().call_soon(execution.owner.post_save_skipped,
                                                      execution)
        return True


_save_failure_capture = _SaveFailureCapture()
_RECEIVER_LOGGER = "taskiq.receiver.receiver"
_SAVE_FAILED_MESSAGE = "Can't set result"  # taskiq 0.13's record: "Can't set result in ..."


def _note_abort(task_id: str, error: BaseException | None) -> None:
    """An aborted pipeline's error result, written for its last step by the step that
    aborted it: the reason, when the log record that names it better was filtered out."""
    if isinstance(error, AbortPipeline):
        execution = current_execution.get()
        if (execution is not None and execution.task_id != task_id
                and execution.abort_error is None):
            execution.abort_error = error


class FlowtraceMiddleware(TaskiqMiddleware):
    """Emits flowtrace events and spans for every run on the broker it is added to."""

    def __init__(
        self,
        hooks: HookManager | Iterable[Any] | None = None,
        transport: Transport | None = None,
        service_name: str | None = None,
        capture_payloads: bool = True,
        max_payload_bytes: int = 1024,
        redact: Callable[[Any], Any] | None = None,
        tracer_provider: TracerProvider | None = None,
        progress_interval: float = 0.25,
    ) -> None:
        super().__init__()
        self.hooks = hooks_of(hooks)
        self.transport = transport if transport is not None else InMemoryTransport()
        self.transport.on_drop(metrics.count_drop)
        self.service_name = service_name
        self.progress_interval = progress_interval
        self.emitter = Emitter(self.transport, self.hooks, capture_payloads, max_payload_bytes,
                               redact)
        self._tracer_provider = tracer_provider
        self._sink: SpanSink | None = None
        self._sink_resolved = False
        self._tail = _ErrorCapture()
        self._chain: list[TaskiqMiddleware] | None = None
        self._chain_length = 0
        self._retry_middleware: TaskiqMiddleware | None = None
        """The first middleware that may retry a failed task (taskiq's Simple/SmartRetry)."""
        logging.getLogger(_PIPELINES_LOGGER).addFilter(_abort_capture)
        logging.getLogger(_RECEIVER_LOGGER).addFilter(_save_failure_capture)

    # Placement and setup ----------------------------------------------------

    def set_broker(self, broker: AsyncBroker) -> None:
        super().set_broker(broker)
        self._tail.set_broker(broker)

    def ensure_placement(self) -> None:
        """Keep this middleware first and its error capture last (see module doc)."""
        broker = getattr(self, "broker", None)
        if broker is None:
            return
        chain = broker.middlewares
        if not (chain and chain[0] is self and chain[-1] is self._tail):
            others = [m for m in chain if m is not self and m is not self._tail]
            # A new list: a hook loop iterating the old one is not disturbed.
            chain = broker.middlewares = [self, *others, self._tail]
        self._wrap_result_backend(broker)  # once per backend, even one set after instrument()
        self._chain = chain
        self._chain_length = len(chain)
        self._retry_middleware = next(
            (m for m in chain if getattr(m, "default_retry_label", None) is not None), None)

    def _keep_placement(self) -> None:
        """:meth:`ensure_placement` when the chain changed (users add middlewares any time)."""
        broker = self.broker
        if broker is not None:
            chain = broker.middlewares
            # Added to (in place, by add_middlewares) or replaced since last checked.
            if chain is not self._chain or len(chain) != self._chain_length:
                self.ensure_placement()

    def _wrap_result_backend(self, broker: AsyncBroker) -> None:
        """A result that cannot be stored fails its step: taskiq only logs it."""
        backend = broker.result_backend
        original = backend.set_result
        if getattr(original, "_flowtrace_wrapped", False):
            return

        @functools.wraps(original)
        async def set_result(task_id: str, result: TaskiqResult[Any]) -> None:
            if result.is_err:
                _note_abort(task_id, result.error)
            try:
                await original(task_id, result)
            except Exception as exc:
                await self._result_not_stored(task_id, exc)
                raise

        set_result._flowtrace_wrapped = True  # type: ignore[attr-defined]
        backend.set_result = set_result  # type: ignore[method-assign]

    @property
    def sink(self) -> SpanSink | None:
        """Where spans go; resolved at broker startup or first use, not when instrumented,
        so that an app's own provider installed after ``instrument()`` is honoured."""
        if not self._sink_resolved:
            self._sink_resolved = True
            provider = self._tracer_provider or configure_tracing(self.service_name)
            self._sink = SpanSink(provider) if provider is not None else None
        return self._sink

    async def startup(self) -> None:
        self.ensure_placement()
        self.transport.reopen()  # closed by an earlier shutdown of the same broker
        # Tracing set up from OTEL_* now installs the global provider before the app
        # serves: the first request an instrumented FastAPI app handles is then traced,
        # and a run kicked inside it joins its trace.
        _ = self.sink

    async def shutdown(self) -> None:
        """Deliver what is queued: every finished span, hooks and the transport, at once.

        All three share taskiq's shutdown timeout, so a slow hook must not starve the
        span flush: they run concurrently.
        """
        waits: list[Awaitable[object]] = [self.transport.close()]
        if self.hooks is not None:
            waits.append(self.hooks.close(_SHUTDOWN_WAIT_S))
        if self._sink is not None:
            waits.append(asyncio.to_thread(flush_tracing, self._sink.provider,
                                           int(_SHUTDOWN_WAIT_S * 1000)))
        for outcome in await asyncio.gather(*waits, return_exceptions=True):
            if isinstance(outcome, BaseException):
                logger.error("flowtrace: shutdown step failed: %r", outcome)

    # Sending ---------------------------------------------------------------

    def pre_send(self, message: TaskiqMessage) -> MaybeAwaitable[TaskiqMessage]:
        # No placement check: the order of middlewares matters where messages execute.
        try:
            labels = message.labels
            sent = _time_ns()
            labels[KICKED_AT_LABEL] = str(sent)
            execution = current_execution.get()
            if execution is not None and execution.phase is not DONE:
                return _guarded(self._send_from_task(execution, message, sent), message,
                                "pre_send")
            if (RUN_LABEL not in labels and self._start_run(message, sent)
                    and self.transport.buffers):
                return _guarded(self._flushed(message), message, "pre_send")
        except Exception:
            logger.exception(_HOOK_FAILED, "pre_send")
        return message

    async def _send_from_task(self, execution: Execution, message: TaskiqMessage,
                              sent: int) -> TaskiqMessage:
        """A message kicked while a task runs: its retry, its next hop, or a new run."""
        if message.task_id == execution.task_id:
            await self._retry_kicked(execution)
            return message
        if execution.phase is HANDOFF and await self._next_hop(execution, message):
            return message
        if RUN_LABEL not in message.labels and self._start_run(message, sent):
            await self.transport.flush()
        return message

    async def _flushed(self, message: TaskiqMessage) -> TaskiqMessage:
        await self.transport.flush()
        return message

    def _start_run(self, message: TaskiqMessage, sent_ns: int) -> bool:
        """Label a new run's first message and emit its PipelineStartEvent (True if done).

        The run starts when its first message is sent (``sent_ns``, its kicked-at label).
        """
        labels = message.labels
        steps = None
        if CURRENT_STEP in labels and (step := current_step(labels)) is not None:
            steps = parse_steps(labels.get(PIPELINE_DATA))
            if steps is None or step != 0:
                return False  # a later hop kicked without flowtrace: its worker picks the run up
        timestamp = _now(_UTC)
        run = self._new_run(message, steps, sent_ns, labels)
        labels[RUN_LABEL] = run.encode()
        self._emit_pipeline_start(run, message, steps, timestamp)
        return True

    def _new_run(self, message: TaskiqMessage, steps: list[StepInfo] | None,
                 started_ns: int, labels: dict[str, Any]) -> RunContext:
        explicit_name = labels.get(NAME_LABEL)
        if steps:
            run_id, kind, name = steps[-1].task_id, "sequential", steps[0].name
        else:
            run_id, kind, name = message.task_id, "task", message.task_name
        if explicit_name is not None:
            name = _label_text(explicit_name) or name
        sink = self.sink
        if sink is None:
            return RunContext(run_id, name, kind, started_ns)
        parent = current_parent()
        trace_id = parent.trace_id if parent is not None else new_trace_id()
        return RunContext(run_id, name, kind, started_ns, trace_id, new_span_id(),
                          parent.span_id if parent is not None else 0,
                          sink.sample(trace_id, name, parent))

    def _adopt_run(self, run: RunContext) -> RunContext:
        """Trace a run whose kicker did not: every tracing worker derives the same ids."""
        assert self.sink is not None
        trace_id, root_span_id = derived_trace_ids(run.pipeline_id)
        sampled = self.sink.sample(trace_id, run.name, None)
        return dataclasses.replace(run, trace_id=trace_id, root_span_id=root_span_id,
                                   sampled=sampled)

    def _emit_pipeline_start(self, run: RunContext, message: TaskiqMessage,
                             steps: list[StepInfo] | None, timestamp: datetime) -> None:
        names = [s.name for s in steps] if steps else [message.task_name]
        args, kwargs = message.args, message.kwargs
        trace_hex, root_hex = run.hex_ids() if run.sampled else (None, None)
        fields: EventFields = {
            "id": None,
            "pipeline_id": run.pipeline_id,
            "pipeline_name": run.name,
            "pipeline_type": run.type,
            "trace_id": trace_hex,
            "span_id": root_hex,
            "timestamp": timestamp,
            "type": "PipelineStartEvent",
            "input": self.emitter.payload(_call_input(args, kwargs)) if args or kwargs else None,
            "total_steps": len(names),
            "steps": names,
        }
        self.emitter.emit(fields, None, run.started_ns)

    async def _next_hop(self, execution: Execution, message: TaskiqMessage) -> bool:
        """Label the next step's message or a map item, after publishing this hop's events."""
        next_step = execution.next_step()
        if next_step is None:
            return False
        labels = message.labels
        index = current_step(labels)
        if index == execution.step_index + 1 and message.task_id == next_step.task_id:
            await self._report_hop_success(execution)
            if next_step.fans_out:
                fan_out = execution.next_fan_out or self._start_fan_out(execution, next_step)
                fan_out = StepContext(fan_out.index, fan_out.span_id, fan_out.started_ns,
                                      execution.items_kicked)
                labels[STEP_LABEL] = fan_out.encode()
                labels[STEP_WORKER_LABEL] = self.emitter.worker
            labels[RUN_LABEL] = execution.run.encode()
            execution.next_kicked = True
            await self.transport.flush()
            return True
        if index is None and next_step.fans_out and message.task_name == next_step.name:
            started = execution.next_fan_out
            if started is None:
                await self._report_hop_success(execution)
                started = self._start_fan_out(execution, next_step)
                await self.transport.flush()
            fan_out = started
            labels[RUN_LABEL] = execution.run.encode()
            labels[STEP_LABEL] = StepContext(fan_out.index, fan_out.span_id, fan_out.started_ns,
                                             0, execution.items_kicked).encode()
            execution.items_kicked += 1
            return True
        return False

    def _start_fan_out(self, execution: Execution, step: StepInfo) -> StepContext:
        """The kicking process starts a map/filter step: its span and StepStartEvent."""
        run = execution.run
        now = time.time_ns()
        fan_out = StepContext(execution.step_index + 1, new_span_id(), now)
        execution.next_fan_out = fan_out
        span = self._step_span(run, step.name, fan_out.index, 1, step.task_id, now, fan_out.span_id)
        fields: EventFields = {
            **_event_ids(run, span),
            "timestamp": _utc(now),
            "type": "StepStartEvent",
            "step_name": step.name,
            "step_index": fan_out.index,
            "task_id": step.task_id,
            "attempt": 1,
            "queue_wait_ms": None,
            "worker": self.emitter.worker,
        }
        self.emitter.emit(fields, None, now)
        return fan_out

    # Executing -------------------------------------------------------------

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        try:
            self._keep_placement()
            self._begin(message)
        except Exception:
            logger.exception(_HOOK_FAILED, "pre_execute")
        return message

    def _begin(self, message: TaskiqMessage) -> None:
        """The message's :class:`Execution`, span context and start events."""
        (timestamp, now_wall), now_perf = _clock(), _perf_ns()
        labels = message.labels
        if CURRENT_STEP in labels or STEP_LABEL in labels:  # a pipeline's hop
            index = current_step(labels) if CURRENT_STEP in labels else None
            steps = parse_steps(labels.get(PIPELINE_DATA)) if index is not None else None
            fan_out = StepContext.decode(labels[STEP_LABEL]) if STEP_LABEL in labels else None
            role = self._role_of(message, fan_out, steps)
        else:  # a plain task, the commonest message
            index = steps = fan_out = None
            role = STEP
        run_label = labels.get(RUN_LABEL)
        run = RunContext.decode(run_label) if run_label is not None else None
        started_here = run is None
        if run is None:
            run = self._new_run(message, steps, now_wall, labels)
            labels[RUN_LABEL] = run.encode()
        elif not run.trace_id and self.sink is not None:
            run = self._adopt_run(run)  # kicked by a process that does not trace
            labels[RUN_LABEL] = run.encode()
        step_index = fan_out.index if fan_out is not None else (index or 0)
        step_name = (
            steps[step_index].name if steps and role is WAITER and step_index < len(steps)
            else message.task_name
        )
        retries = labels.get("_retries")
        execution = Execution(message, run, role, step_index, step_name,
                              int(retries) + 1 if retries else 1, steps, now_wall, now_perf)
        execution.owner = self
        if fan_out is not None:
            execution.fan_out = fan_out
        if started_here and (index in (None, 0)) and role is not ITEM:
            self._emit_pipeline_start(run, message, steps, timestamp)
        self._enter(execution, self._execution_span(execution, now_wall))
        if role is STEP or (role is WAITER and (fan_out is None or execution.attempt > 1)):
            # (A map/filter's first waiter attempt: the kicking process emitted it.)
            self._emit_step_start(execution, labels, now_wall, timestamp)
        if role is WAITER:
            self._start_monitor(execution, message)

    @staticmethod
    def _enter(execution: Execution, span: SpanRecord | None) -> None:
        """Make the execution, and its span, current in this task's context; give the
        execution its span and its events' ids. User spans in the task nest under it."""
        execution.token = current_execution.set(execution)
        execution.event_ids = _event_ids(execution.run, span)
        if span is not None:
            execution.span = span
            execution.span_token = make_current(span)

    @staticmethod
    def _leave(execution: Execution) -> None:
        """Undo :meth:`_enter` once the message is done: in its last hook, ``post_save``
        (``post_execute`` when taskiq stores no result, the result backend's wrapper when
        storing it failed).

        asyncio keeps a finished task, and with it its context, a while longer: what the
        context holds (the execution, its span, its events) would outlive the message and
        make the garbage collector run more often.
        """
        try:
            if execution.span_token is not None:
                restore_current(execution.span_token)
            if execution.token is not None:
                current_execution.reset(execution.token)
        except (ValueError, RuntimeError):
            pass  # hooks called from another context (not taskiq's way): nothing of ours is set
        execution.token = execution.span_token = None

    @staticmethod
    def _role_of(message: TaskiqMessage, fan_out: StepContext | None,
                 steps: list[StepInfo] | None) -> Role:
        if fan_out is not None and fan_out.item_index >= 0:
            return ITEM
        if message.task_name in WAITER_TASKS and steps is not None:
            return WAITER
        return STEP

    def _execution_span(self, execution: Execution, now: int) -> SpanRecord | None:
        run = execution.run
        if self.sink is None or not run.trace_id:
            return None
        fan_out = execution.fan_out
        if execution.role is ITEM and fan_out is not None:
            attributes = None
            if run.sampled:
                attributes = _step_attributes(run, execution.step_name, execution.step_index,
                                              execution.attempt, execution.task_id)
                attributes["flowtrace.item.index"] = fan_out.item_index
            return SpanRecord(execution.message.task_name, run.trace_id, new_span_id(),
                              fan_out.span_id, now, run.sampled, _CONSUMER, attributes)
        if execution.role is WAITER and fan_out is not None and execution.attempt == 1:
            # The step's span, opened by the kicking process; a retried waiter's
            # attempt is a span of its own, as any step's.
            waiter_span = self._step_span(run, execution.step_name, execution.step_index, 1,
                                          execution.task_id, fan_out.started_ns,
                                          fan_out.span_id)
            if waiter_span is not None and waiter_span.sampled:
                # Its StepStartEvent was emitted by the kicking process.
                attributes = {
                    **_run_attributes(run),
                    "flowtrace.step_name": execution.step_name,
                    "flowtrace.step_index": execution.step_index,
                    "flowtrace.task_id": execution.task_id,
                    "flowtrace.attempt": 1,
                }
                worker = _label_text(execution.message.labels.get(STEP_WORKER_LABEL))
                if worker is not None:  # (a kicker of an earlier version does not say)
                    attributes["flowtrace.worker"] = worker
                waiter_span.record_event("StepStartEvent", attributes, fan_out.started_ns)
            return waiter_span
        if run.type == "task":
            return self._plain_task_span(execution, now)
        return self._step_span(run, execution.step_name, execution.step_index, execution.attempt,
                               execution.task_id, now, new_span_id())

    def _plain_task_span(self, execution: Execution, now: int) -> SpanRecord | None:
        """A plain task's trace is one span: its step span is the run's root (SPEC §4).

        It starts when the task is kicked, ends with the run and carries the run's events.
        A task that a retry middleware may retry keeps the pipeline shape instead (a root
        span, one span per attempt), so that the run's end is on the root whatever the
        attempt that reaches it.
        """
        run = execution.run
        if self._retryable(execution.message):
            return self._step_span(run, execution.step_name, execution.step_index,
                                   execution.attempt, execution.task_id, now, new_span_id())
        execution.span_ends_run = True
        if execution.attempt > 1:  # retried by a middleware flowtrace does not know
            return self._step_span(run, execution.step_name, execution.step_index,
                                   execution.attempt, execution.task_id, now, new_span_id())
        return self._root_step_span(execution)

    @staticmethod
    def _root_step_span(execution: Execution) -> SpanRecord:
        """A plain task's one span: the run's root, from the kick, with its PipelineStart."""
        run, name = execution.run, execution.step_name
        sampled = run.sampled
        return SpanRecord(
            name, run.trace_id, run.root_span_id, run.parent_span_id, run.started_ns, sampled,
            _CONSUMER,
            _step_attributes(run, name, 0, 1, execution.task_id) if sampled else None,
            ["PipelineStartEvent", 1, run.started_ns] if sampled else None,
        )

    def _retryable(self, message: TaskiqMessage) -> bool:
        """Whether taskiq's Simple/SmartRetryMiddleware on this broker may retry ``message``.

        Both read the ``retry_on_error`` label (text or bool), else their
        ``default_retry_label``.
        """
        retrier = self._retry_middleware
        if retrier is None:
            return False
        label = message.labels.get("retry_on_error")
        if isinstance(label, str):
            label = label.lower() == "true"
        return bool(retrier.default_retry_label if label is None else label)  # type: ignore[attr-defined]

    def _step_span(self, run: RunContext, name: str, index: int, attempt: int, task_id: str,
                   start_ns: int, span_id: int) -> SpanRecord | None:
        if self.sink is None or not run.trace_id:
            return None
        attributes = _step_attributes(run, name, index, attempt, task_id) if run.sampled else None
        return SpanRecord(name, run.trace_id, span_id, run.root_span_id, start_ns, run.sampled,
                          _CONSUMER, attributes)

    def _emit_step_start(self, execution: Execution, labels: dict[str, Any], now: int,
                         timestamp: datetime) -> None:
        sent = kicked_at(labels)
        fields: EventFields = {
            **execution.event_ids,  # type: ignore[dict-item]
            "timestamp": timestamp,
            "type": "StepStartEvent",
            "step_name": execution.step_name,
            "step_index": execution.step_index,
            "task_id": execution.task_id,
            "attempt": execution.attempt,
            "queue_wait_ms": max(0.0, (now - sent) / 1e6) if sent is not None else None,
            "worker": self.emitter.worker,
        }
        self.emitter.emit(fields, execution.span, now)

    def _start_monitor(self, execution: Execution, message: TaskiqMessage) -> None:
        task_ids = message.args[0] if message.args else message.kwargs.get("task_ids", [])
        total = len(task_ids) if isinstance(task_ids, list) else 0

        async def report(done: int, failed: int) -> None:
            now = time.time_ns()
            fields: EventFields = {
                **execution.event_ids,  # type: ignore[dict-item]
                "timestamp": _utc(now),
                "type": "StepProgressEvent",
                "step_name": execution.step_name,
                "step_index": execution.step_index,
                "done": done,
                "failed": failed,
                "total": total,
            }
            self.emitter.emit(fields, None, now)

        execution.monitor = ProgressMonitor(
            self.transport, counter_key(execution.run.pipeline_id, execution.step_index), total,
            report, self.progress_interval,
        )
        execution.monitor.start()

    def on_error(self, message: TaskiqMessage, result: TaskiqResult[Any],
                 exception: BaseException) -> None:
        try:
            execution = current_execution.get()
            if execution is None or execution.task_id != message.task_id:
                return
            if execution.exception is None:
                execution.exception = exception
            if isinstance(result.error, NoResultError) and not isinstance(exception,
                                                                          NoResultError):
                execution.retry_pending = True  # a retry middleware took the failure over
        except Exception:
            logger.exception(_HOOK_FAILED, "on_error")

    def post_execute(self, message: TaskiqMessage,
                     result: TaskiqResult[Any]) -> MaybeAwaitable[None]:
        """The task returned (its result is stored next, then ``post_save``) or raised."""
        try:
            execution = current_execution.get()
            if execution is None or execution.task_id != message.task_id:
                return None
            execution.duration_ms = (_perf_ns() - execution.started_perf_ns) / 1e6
            if not result.is_err:
                execution.phase = HANDOFF
                execution.result_preview = result.return_value
                if execution.role is ITEM:
                    self._finish_item(execution, failed=False)
                return None
            outcome = self._raised(execution, result)
            if outcome is None and isinstance(result.error, NoResultError):
                self._leave(execution)  # taskiq stores nothing: no post_save follows
            return outcome
        except Exception:
            logger.exception(_HOOK_FAILED, "post_execute")
        return None

    def _raised(self, execution: Execution, result: TaskiqResult[Any]) -> MaybeAwaitable[None]:
        """The task raised (or chose to store no result): report a failure."""
        if execution.role is ITEM:
            if execution.retry_pending:
                self._item_retried(execution)  # (once: usually when it was re-kicked)
            else:
                self._finish_item(execution, failed=True)
            return None
        exception = execution.exception or result.error
        if exception is None or (isinstance(exception, NoResultError)
                                 and execution.exception is None):
            execution.phase = HANDOFF  # the task chose to store no result
            return None
        if (isinstance(exception, NoResultError) and execution.run.type == "task"
                and not execution.retry_pending):
            # taskiq: the task "skipped setting result", which is no failure. (A pipeline's
            # step cannot hand on a result it did not store: that fails its run below.)
            self._step_saved(execution)
            return None
        if execution.monitor is not None:
            return _guarded(self._after_final_progress(
                execution, True, self._step_failed, exception), None, "post_execute")
        self._step_failed(execution, exception)
        return None

    def _step_failed(self, execution: Execution, exception: BaseException) -> None:
        will_retry = execution.retry_pending or execution.outcome_reported
        self._report_error(execution, exception, will_retry)
        if not will_retry:
            self._end_run_failed(execution, exception, execution.step_name, execution.step_index)

    def post_save(self, message: TaskiqMessage,
                  result: TaskiqResult[Any]) -> MaybeAwaitable[None]:
        try:
            execution = current_execution.get()
            if execution is None or execution.task_id != message.task_id:
                return None
            if not (result.is_err or execution.role is ITEM or execution.phase is DONE):
                if execution.monitor is not None:  # (left when its task ends)
                    return _guarded(self._after_final_progress(
                        execution, False, self._step_saved), None, "post_save")
                self._step_saved(execution)
            self._leave(execution)
        except Exception:
            logger.exception(_HOOK_FAILED, "post_save")
        return None

    def _step_saved(self, execution: Execution) -> None:
        """The step's result is stored and its next hop kicked (or not): report both.

        A run that ends here ends at the moment its last step does: one clock reading.
        """
        timestamp, now = _clock()
        self._report_success(execution, timestamp, now)
        if execution.is_last_step:
            self._end_run_completed(execution, timestamp, now)
        elif not execution.next_kicked:
            reason = execution.abort_error
            next_step = execution.next_step()
            self._end_run_failed(
                execution,
                reason if reason is not None else RuntimeError("pipeline aborted"),
                next_step.name if next_step is not None else execution.step_name,
                execution.step_index + 1,
            )
        execution.phase = DONE

    # Outcomes --------------------------------------------------------------

    async def _retry_kicked(self, execution: Execution) -> None:
        """A retry middleware re-kicked the failing task: report the attempt first."""
        execution.retry_pending = True
        if execution.role is ITEM:
            self._item_retried(execution)
            return
        exception = execution.exception or RuntimeError("task failed")
        execution.duration_ms = (time.perf_counter_ns() - execution.started_perf_ns) / 1e6
        await self._finish_monitor(execution, failed=True)
        self._report_error(execution, exception, will_retry=True)
        await self.transport.flush()

    async def _after_final_progress(self, execution: Execution, failed: bool,
                                    report: Callable[..., None], *args: Any) -> None:
        """``report(execution, *args)`` once a map/filter waiter's final counts are in.

        Reading them may wait on the transport (Redis): the only outcome that does.
        """
        await self._finish_monitor(execution, failed)
        report(execution, *args)

    async def _report_hop_success(self, execution: Execution) -> None:
        """:meth:`_report_success` of a hop whose next message is being sent (a waiter's
        final counts first)."""
        await self._finish_monitor(execution, failed=False)
        self._report_success(execution, *_clock())

    def _report_success(self, execution: Execution, timestamp: datetime, now: int) -> None:
        """StepCompleteEvent at ``timestamp`` (``now`` in ns) and the end of the step's span
        (a waiter's monitor is finished first)."""
        if execution.outcome_reported:
            return
        execution.outcome_reported = True
        if execution.role is WAITER:
            duration = self._fan_out_duration(execution, now)
        else:
            duration = execution.duration_ms
        execution.result_preview = self.emitter.payload(execution.result_preview)
        fields: EventFields = {
            **execution.event_ids,  # type: ignore[dict-item]
            "timestamp": timestamp,
            "type": "StepCompleteEvent",
            "step_name": execution.step_name,
            "step_index": execution.step_index,
            "task_id": execution.task_id,
            "attempt": execution.attempt,
            "result": execution.result_preview,
            "duration_ms": duration,
        }
        self.emitter.emit(fields, execution.span, now)
        if not execution.span_ends_run:
            self._end_span(execution.span, now)

    def _report_error(self, execution: Execution, exception: BaseException,
                      will_retry: bool) -> None:
        """StepErrorEvent and the step's span (a waiter's monitor is finished first)."""
        if execution.outcome_reported:
            return
        execution.outcome_reported = True
        timestamp, now = _clock()
        duration = execution.duration_ms
        if execution.role is WAITER:
            duration = self._fan_out_duration(execution, now)
        span = execution.span
        fields: EventFields = {
            **execution.event_ids,  # type: ignore[dict-item]
            "timestamp": timestamp,
            "type": "StepErrorEvent",
            "step_name": execution.step_name,
            "step_index": execution.step_index,
            "task_id": execution.task_id,
            "attempt": execution.attempt,
            "error": error_text(exception),
            "error_type": type(exception).__name__,
            "will_retry": will_retry,
            "duration_ms": duration,
        }
        if span is not None and span.sampled:
            span.record_error(exception, now)
            span.record_attributes({"flowtrace.step.will_retry": will_retry})
        self.emitter.emit(fields, span, now)
        if will_retry or not execution.span_ends_run:
            self._end_span(span, now)

    @staticmethod
    def _fan_out_duration(execution: Execution, now: int) -> float:
        """From the items' kick on a waiter's first attempt, else from the attempt's start."""
        fan_out, start = execution.fan_out, execution.started_wall_ns
        if fan_out is not None and execution.attempt == 1:
            start = fan_out.started_ns
        return max(0.0, (now - start) / 1e6)

    async def _finish_monitor(self, execution: Execution, failed: bool) -> None:
        """Final progress of a map/filter step, from the counters (once; a no-op elsewhere)."""
        monitor = execution.monitor
        if monitor is None or execution.outcome_reported:
            return
        execution.monitor = None
        total = monitor.total
        value = execution.result_preview
        if not failed and execution.message.task_name == MAP_WAITER and isinstance(value, list):
            # The map's result says it all (skipped errors are missing results): no counters.
            done, bad = len(value), total - len(value)
        else:
            counted_done, counted_failed = await monitor.settled()
            if failed:  # the waiter failed: at least one item did
                bad = min(total, max(1, counted_failed))
                done = min(total - bad, counted_done)
            else:
                bad = min(total, counted_failed)
                done = total - bad
        await monitor.finish(done, bad)
        if not execution.retry_pending:  # the step is over: its counters are no longer read
            self.transport.forget_counts(monitor.key)
        if execution.span is not None and execution.span.sampled:
            execution.span.record_attributes({
                "flowtrace.step.done": done, "flowtrace.step.failed": bad,
                "flowtrace.step.total": total,
            })

    def _item_retried(self, execution: Execution) -> None:
        """A map/filter item's attempt failed and runs again: its span ends, nothing else.

        An item's attempts are not the step's (the step neither fails nor retries), and
        the item is counted once, by the attempt that settles it. Does nothing the second
        time (re-kicked, then raised).
        """
        if execution.phase is DONE:
            return
        execution.phase = DONE
        span = execution.span
        if span is not None:
            now = time.time_ns()
            if span.sampled:
                span.record_error(execution.exception or RuntimeError("task failed"), now)
                span.record_attributes({"flowtrace.step.will_retry": True})
            self._end_span(span, now)

    def _finish_item(self, execution: Execution, failed: bool) -> None:
        self.transport.count_item(counter_key(execution.run.pipeline_id, execution.step_index),
                                  failed)
        execution.phase = DONE
        span = execution.span
        if span is not None and failed and execution.exception is not None:
            span.record_error(execution.exception, time.time_ns())
        self._end_span(span, time.time_ns())

    def _end_span(self, span: SpanRecord | None, now: int) -> None:
        if span is not None and self._sink is not None:
            self._sink.emit(span, now)

    def _end_run_completed(self, execution: Execution, timestamp: datetime, now: int) -> None:
        run = execution.run
        root = self._run_end_span(execution)
        fields: EventFields = {
            **self._run_end_ids(execution, root),
            "timestamp": timestamp,
            "type": "PipelineCompleteEvent",
            "status": "COMPLETED",
            "duration_ms": max(0.0, (now - run.started_ns) / 1e6),
            "result": execution.result_preview,
        }
        self.emitter.emit(fields, root, now)
        self._end_span(root, now)
        execution.phase = DONE

    def _end_run_failed(self, execution: Execution, exception: BaseException,
                        failed_step: str, failed_index: int) -> None:
        run, (timestamp, now) = execution.run, _clock()
        root = self._run_end_span(execution)
        fields: EventFields = {
            **self._run_end_ids(execution, root),
            "timestamp": timestamp,
            "type": "PipelineErrorEvent",
            "status": "FAILED",
            "error": error_text(exception),
            "error_type": type(exception).__name__,
            "failed_step": failed_step,
            "failed_step_index": failed_index,
            "duration_ms": max(0.0, (now - run.started_ns) / 1e6),
        }
        if root is not None:
            root.error = fields["error"]
        self.emitter.emit(fields, root, now)
        self._end_span(root, now)
        execution.phase = DONE

    @staticmethod
    def _run_end_ids(execution: Execution, root: SpanRecord | None) -> dict[str, Any]:
        """The run-end event's ids: its step's when the step's span is the root (plain task)."""
        ids = execution.event_ids
        if root is not execution.span or ids is None:
            ids = _event_ids(execution.run, root)
        return ids

    def _run_end_span(self, execution: Execution) -> SpanRecord | None:
        """The span that gets the run's end: a plain task's own, else the run's root span.

        The root span is closed by whichever process sees the run end.
        """
        if execution.span_ends_run:
            return execution.span
        run = execution.run
        if self.sink is None or not run.trace_id:
            return None
        root = SpanRecord(f"pipeline {run.name}", run.trace_id, run.root_span_id,
                          run.parent_span_id, run.started_ns, run.sampled)
        if run.sampled:
            root.record_attributes({
                "flowtrace.pipeline.id": run.pipeline_id,
                "flowtrace.pipeline.name": run.name,
                "flowtrace.pipeline.type": run.type,
            })
            self._add_pipeline_start(root, run, len(execution.steps or ()) or 1)
        return root

    @staticmethod
    def _add_pipeline_start(root: SpanRecord, run: RunContext, total_steps: int) -> None:
        """The PipelineStartEvent span event, added by the process that ends the root span."""
        root.record_event("PipelineStartEvent", total_steps, run.started_ns)

    def post_save_skipped(self, execution: Execution) -> None:
        """Report what ``post_save`` would have: another middleware's ``post_save`` raised
        after the result was stored, and taskiq skipped the rest (flowtrace's runs last)."""
        if execution.token is None or execution.phase is not HANDOFF or execution.role is ITEM:
            return  # left already, a failure (reported when it raised), or an item
        logger.warning("flowtrace: a middleware's post_save failed before flowtrace's ran; "
                       "reporting the stored result of %s", execution.task_id)
        execution.token = execution.span_token = None  # (their context is gone)
        if execution.monitor is not None:
            asyncio.get_running_loop().create_task(_guarded(self._after_final_progress(
                execution, False, self._step_saved), None, "post_save"))
            return
        try:
            self._step_saved(execution)
        except Exception:
            logger.exception(_HOOK_FAILED, "post_save")

    async def _result_not_stored(self, task_id: str, exc: Exception) -> None:
        execution = current_execution.get()
        if execution is None or execution.task_id != task_id:
            return
        try:
            if execution.phase is HANDOFF and execution.role is not ITEM:
                await self._finish_monitor(execution, failed=True)
                self._report_error(execution, exc, will_retry=False)
                self._end_run_failed(execution, exc, execution.step_name, execution.step_index)
            self._leave(execution)  # taskiq skips post_save when storing failed
        except Exception:
            logger.exception("flowtrace: reporting an unstored result failed")
