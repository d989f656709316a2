"""What this process knows about the message it is executing right now.

One :class:`Execution` per message, kept in a context variable: taskiq runs
``pre_execute``, the task, ``on_error``, ``post_execute`` and ``post_save`` of one
message in one asyncio task, and kicks the next hop from inside ``post_save``,
so the kicks of a hop can be recognised as coming from it.
"""

from __future__ import annotations

import contextvars
import enum
from typing import Any

from taskiq import TaskiqMessage

from flowtrace.labels import RunContext, StepContext
from flowtrace.pipeline_data import StepInfo
from flowtrace.progress import ProgressMonitor
from flowtrace.tracing.spans import SpanRecord


class Role(enum.Enum):
    STEP = "step"
    """A pipeline step or a plain task: the user's own task."""
    WAITER = "waiter"
    """taskiq-pipelines' waiter of a map/filter step: stands for the whole step."""
    ITEM = "item"
    """One item of a map/filter step."""


class Phase(enum.Enum):
    RUNNING = "running"
    HANDOFF = "handoff"
    """The task succeeded; its result is being stored and the next hop kicked."""
    DONE = "done"


RUNNING, HANDOFF, DONE = Phase.RUNNING, Phase.HANDOFF, Phase.DONE
STEP, WAITER, ITEM = Role.STEP, Role.WAITER, Role.ITEM
"""The members by module-level name, for the per-message path: on Python 3.11 reading one
off its class (``Phase.DONE``) goes through ``EnumType.__getattr__``, a slot call that
allocates a method wrapper per read."""


class Execution:
    """One message's state from ``pre_execute`` to ``post_save``.

    A plain class: what is rarely set (fan-out, retries, failures) defaults at class
    level, so building one per message sets nine attributes, not twenty-five.
    """

    fan_out: StepContext | None = None
    """The map/filter step this message belongs to (items, waiter)."""
    span: SpanRecord | None = None
    event_ids: dict[str, Any] | None = None
    """The fields every event of this step starts with: run identity and its span's ids."""
    next_fan_out: StepContext | None = None
    """The map/filter step this hop is starting by kicking its items."""
    items_kicked: int = 0
    phase: Phase = RUNNING
    exception: BaseException | None = None
    retry_pending: bool = False
    outcome_reported: bool = False
    next_kicked: bool = False
    abort_error: BaseException | None = None
    result_preview: Any = None
    duration_ms: float = 0.0
    monitor: ProgressMonitor | None = None
    span_ends_run: bool = False
    """A plain task's span: it also carries the run's end (and, on attempt 1, is its root)."""
    token: contextvars.Token[Execution | None] | None = None
    """Undoes making this execution current (see ``FlowtraceMiddleware._leave``)."""
    span_token: Any = None
    """Undoes making its span current (``tracing.current.restore_current``)."""
    owner: Any = None
    """The middleware that began it (``FlowtraceMiddleware``; untyped: no import cycle)."""

    def __init__(self, message: TaskiqMessage, run: RunContext, role: Role, step_index: int,
                 step_name: str, attempt: int, steps: list[StepInfo] | None,
                 started_wall_ns: int, started_perf_ns: int) -> None:
        self.message = message
        self.task_id = message.task_id  # compared in every hook: read once
        self.run = run
        self.role = role
        self.step_index = step_index
        self.step_name = step_name
        self.attempt = attempt
        self.steps = steps
        self.started_wall_ns = started_wall_ns
        self.started_perf_ns = started_perf_ns

    @property
    def is_last_step(self) -> bool:
        return self.steps is None or self.step_index >= len(self.steps) - 1

    def next_step(self) -> StepInfo | None:
        if self.steps is None or self.step_index + 1 >= len(self.steps):
            return None
        return self.steps[self.step_index + 1]


current_execution: contextvars.ContextVar[Execution | None] = contextvars.ContextVar(
    "flowtrace_execution", default=None
)
