"""Run states the gateway keeps (SPEC §6) and the run/step metrics they drive (SPEC §5).

:class:`RunStore` folds every consumed event into a bounded, LRU-ordered map of
:class:`RunState`. Metrics are driven by state *transitions*, never by raw events,
so that redelivered messages (a repeated PipelineStartEvent, a duplicated step
outcome) count a run or a step attempt once:

* in-progress gauge: +1 when a run is first seen, -1 when it ends or is evicted;
* run counter/duration: on the first terminal event only;
* step counters: once per ``(step, attempt, outcome)``.

A run in a terminal state (COMPLETED, FAILED, LOST) ignores later events for state
and metrics; only ``flowtrace_events_total`` still counts them, as it counts every
event the gateway consumes. In particular a worker that comes back after its run was
declared LOST changes nothing: the run stays LOST and is counted once, as lost.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel
from typing_extensions import Self

from flowtrace.events import (
    BaseEvent,
    PipelineCompleteEvent,
    PipelineErrorEvent,
    PipelineStartEvent,
    PipelineType,
    StepCompleteEvent,
    StepErrorEvent,
    StepProgressEvent,
    StepStartEvent,
    utc_now,
)
from flowtrace.metrics import GatewayMetrics

RunStatus = Literal["RUNNING", "COMPLETED", "FAILED", "LOST"]
StepStatus = Literal["PENDING", "RUNNING", "RETRYING", "COMPLETED", "FAILED"]
RUN_STATUSES: tuple[RunStatus, ...] = ("RUNNING", "COMPLETED", "FAILED", "LOST")

_StepEvent = StepStartEvent | StepProgressEvent | StepCompleteEvent | StepErrorEvent


class StepState(BaseModel):
    """One step of a run. ``done``/``total`` are set for map/filter steps only."""

    index: int
    name: str = ""
    status: StepStatus = "PENDING"
    attempt: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    done: int | None = None
    total: int | None = None
    error: str | None = None
    """The last attempt's error while the step has not completed (beyond SPEC §6: the page
    shows it after a reload)."""


class RunBookkeeping:
    """What the store keeps about a run besides its state (never serialized)."""

    __slots__ = ("counted_steps", "first_seen_at", "gauge_label", "last_event_at",
                 "lost_declared", "start_seen")

    def __init__(self) -> None:
        # When the store first and last received an event of this run (the LOST sweep).
        self.last_event_at = self.first_seen_at = utc_now()
        self.lost_declared = False
        self.gauge_label: str | None = None
        self.start_seen = False
        self.counted_steps: set[tuple[int, int, str]] = set()


class RunState(BaseModel):
    """One run as REST and the WebSocket ``snapshot`` show it.

    ``total_steps`` is null while unknown (the run's PipelineStartEvent was not seen).
    Private attributes are bookkeeping and never serialized.
    """

    pipeline_id: str
    pipeline_name: str = ""
    pipeline_type: PipelineType = "sequential"
    status: RunStatus = "RUNNING"
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_ms: float | None = None
    trace_id: str | None = None
    total_steps: int | None = None
    error: str | None = None
    steps: list[StepState] = []
    result: Any = None
    """The completed run's result preview (beyond SPEC §6: the page shows it after a reload)."""

    # The store's bookkeeping, in a slot of its own rather than pydantic private attributes:
    # pydantic inspects a private attribute's default factory for every instance and reads
    # private attributes through __getattr__ (≈ 2 µs each), which made building a run cost
    # ≈ 80 µs and every event several reads; a slot costs neither.
    __slots__ = ("_book",)  # not annotated: pydantic would make it a private attribute

    def model_post_init(self, context: Any, /) -> None:
        self._book: RunBookkeeping = RunBookkeeping()

    def __copy__(self) -> Self:
        copied = super().__copy__()
        copied._book = copy.copy(self._book)
        return copied

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Self:
        copied = super().__deepcopy__(memo)
        copied._book = copy.deepcopy(self._book, memo)
        return copied

    def __getstate__(self) -> dict[Any, Any]:
        return {**super().__getstate__(), "_book": self._book}

    def __setstate__(self, state: dict[Any, Any]) -> None:
        state = dict(state)
        book = state.pop("_book", None)
        super().__setstate__(state)
        self._book = book if book is not None else RunBookkeeping()

    @property
    def last_event_at(self) -> datetime:
        """When the store last received an event of this run (for the LOST sweep)."""
        return self._book.last_event_at

    @property
    def is_terminal(self) -> bool:
        return self.status != "RUNNING"

    def step(self, index: int, name: str = "") -> StepState:
        """The step at ``index``, creating PENDING placeholders up to it as needed."""
        while len(self.steps) <= index:
            self.steps.append(StepState(index=len(self.steps)))
        step = self.steps[index]
        if name and not step.name:
            step.name = name
        return step

    def current_step(self) -> StepState | None:
        """The step in flight: the last RUNNING/RETRYING one, else the last started one."""
        active = [s for s in self.steps if s.status in ("RUNNING", "RETRYING")]
        if active:
            return active[-1]
        started = [s for s in self.steps if s.status != "PENDING"]
        return started[-1] if started else None


class RunStore:
    """Bounded LRU of recent runs; the source of REST state, snapshots and run metrics.

    Not thread-safe: it is meant to be driven from the gateway's event loop.
    """

    def __init__(self, max_runs: int = 10_000, metrics: GatewayMetrics | None = None,
                 stale_after: float = 3600.0) -> None:
        if max_runs < 1:
            raise ValueError("max_runs must be >= 1")
        self.max_runs = max_runs
        self.metrics = metrics
        self.stale_after = stale_after
        self._runs: OrderedDict[str, RunState] = OrderedDict()
        self._silence_from = datetime.min.replace(tzinfo=timezone.utc)

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, pipeline_id: object) -> bool:
        return pipeline_id in self._runs

    def get(self, pipeline_id: str) -> RunState | None:
        """The live state of one run (do not mutate it), or None when unknown."""
        return self._runs.get(pipeline_id)

    def list(self, limit: int | None = 50, status: str | None = None) -> builtins.list[RunState]:
        """Runs newest first (by start time), optionally only those with ``status``.

        ``status`` is case-insensitive (``failed`` or ``FAILED``); ``limit=None`` means all.
        """
        runs: builtins.list[RunState] = list(self._runs.values())
        if status:
            wanted = status.upper()
            runs = [run for run in runs if run.status == wanted]
        runs.sort(key=_start_key, reverse=True)
        return runs if limit is None else runs[: max(0, limit)]

    # ----------------------------------------------------------------- applying
    def apply(self, event: BaseEvent, now: datetime | None = None) -> None:
        """Fold one consumed event into its run's state and the metrics.

        ``now`` is when the event was received (default: the current time); the LOST
        sweep measures silence from it. Unknown event classes only count as events.
        """
        received = now or utc_now()
        event_type = str(getattr(event, "type", type(event).__name__))
        if self.metrics is not None:
            self.metrics.event_seen(event_type)
        run = self._runs.get(event.pipeline_id)
        if run is None:
            run = self._create(event, received)
        elif run.is_terminal:
            return  # late event of a finished or lost run: changes nothing (see module doc)
        else:
            self._runs.move_to_end(event.pipeline_id)
        run._book.last_event_at = max(run._book.last_event_at, received)
        self._absorb_identity(run, event)
        if isinstance(event, PipelineStartEvent):
            self._on_pipeline_start(run, event)
        elif isinstance(event, StepStartEvent):
            self._on_step_start(run, event)
        elif isinstance(event, StepProgressEvent):
            step = run.step(event.step_index, event.step_name)
            step.done, step.total = event.done, event.total
        elif isinstance(event, StepCompleteEvent):
            self._on_step_complete(run, event)
        elif isinstance(event, StepErrorEvent):
            self._on_step_error(run, event)
        elif isinstance(event, PipelineCompleteEvent):
            run.result = event.result
            self._finish(run, "COMPLETED", event.timestamp, event.duration_ms, None)
        elif isinstance(event, PipelineErrorEvent):
            self._on_pipeline_error(run, event)

    def _create(self, event: BaseEvent, received: datetime) -> RunState:
        """First sight of a run, whichever event it is (its start may have been missed)."""
        run = RunState(pipeline_id=event.pipeline_id, pipeline_name=event.pipeline_name,
                       pipeline_type=event.pipeline_type, trace_id=event.trace_id,
                       started_at=event.timestamp)
        run._book.first_seen_at = received
        run._book.last_event_at = received
        self._runs[event.pipeline_id] = run
        run._book.gauge_label = run.pipeline_name
        if self.metrics is not None:
            self.metrics.run_started(run.pipeline_name)
        while len(self._runs) > self.max_runs:
            self._evict()
        return run

    def _evict(self) -> None:
        """Drop the least recently updated run; one still in progress leaves the gauge."""
        _, run = self._runs.popitem(last=False)
        if not run.is_terminal and run._book.gauge_label is not None and self.metrics is not None:
            self.metrics.pipelines_in_progress.labels(pipeline=run._book.gauge_label).dec()

    @staticmethod
    def _absorb_identity(run: RunState, event: BaseEvent) -> None:
        if event.pipeline_name and not run.pipeline_name:
            run.pipeline_name = event.pipeline_name
        if event.trace_id and not run.trace_id:
            run.trace_id = event.trace_id

    @staticmethod
    def _on_pipeline_start(run: RunState, event: PipelineStartEvent) -> None:
        """Also applies a redelivered repeat: fills in what is known, resets nothing."""
        if not run._book.start_seen:
            run._book.start_seen = True
            run.started_at = event.timestamp  # the kick, even when a step event came first
        if event.pipeline_name:
            run.pipeline_name = event.pipeline_name
        run.pipeline_type = event.pipeline_type
        run.total_steps = event.total_steps
        for index, name in enumerate(event.steps):
            run.step(index, name)
        if event.total_steps > 0:
            run.step(event.total_steps - 1)

    def _on_step_start(self, run: RunState, event: StepStartEvent) -> None:
        step = run.step(event.step_index, event.step_name)
        step.status = "RUNNING"
        step.attempt = event.attempt
        step.started_at = event.timestamp
        step.finished_at = None
        step.duration_ms = None
        if self.metrics is not None and event.queue_wait_ms is not None:
            self.metrics.step_queue_wait(run.pipeline_name, step.name or event.step_name,
                                         event.queue_wait_ms / 1000.0)

    def _end_step(self, run: RunState, event: StepCompleteEvent | StepErrorEvent,
                  status: StepStatus, outcome: str) -> None:
        step = run.step(event.step_index, event.step_name)
        step.status = status
        step.attempt = max(step.attempt, event.attempt)
        step.finished_at = event.timestamp
        step.duration_ms = event.duration_ms
        key = (event.step_index, event.attempt, outcome)
        if key in run._book.counted_steps:
            return  # redelivered outcome of an attempt already counted
        run._book.counted_steps.add(key)
        if self.metrics is not None:
            self.metrics.step_finished(run.pipeline_name, event.step_name, outcome,
                                       event.duration_ms / 1000.0)

    def _on_step_complete(self, run: RunState, event: StepCompleteEvent) -> None:
        self._end_step(run, event, "COMPLETED", "completed")
        run.step(event.step_index).error = None

    def _on_step_error(self, run: RunState, event: StepErrorEvent) -> None:
        run.step(event.step_index, event.step_name).error = event.error
        if event.will_retry:
            self._end_step(run, event, "RETRYING", "retried")
        else:
            self._end_step(run, event, "FAILED", "failed")

    def _on_pipeline_error(self, run: RunState, event: PipelineErrorEvent) -> None:
        if event.status == "FAILED" and event.failed_step_index is not None:
            # An aborted step that never reported its own error still shows as failed
            # (state only: step metrics come from StepErrorEvents). A LOST run leaves
            # its steps as last seen, so the page shows where the run stopped.
            step = run.step(event.failed_step_index, event.failed_step or "")
            if step.status in ("PENDING", "RUNNING", "RETRYING"):
                step.status = "FAILED"
        self._finish(run, event.status, event.timestamp, event.duration_ms, event.error)

    def _finish(self, run: RunState, status: RunStatus, at: datetime, duration_ms: float,
                error: str | None) -> None:
        run.status = status
        run.finished_at = at
        run.duration_ms = duration_ms
        run.error = error
        if self.metrics is not None:
            # The gauge was raised under the name first seen (it may have been filled in
            # since): lower it there, count the run under the final name.
            label = run._book.gauge_label
            self.metrics.run_finished(run.pipeline_name, status.lower(), duration_ms / 1000.0,
                                      was_in_progress=label == run.pipeline_name)
            if label is not None and label != run.pipeline_name:
                self.metrics.pipelines_in_progress.labels(pipeline=label).dec()
        run._book.gauge_label = None

    # ----------------------------------------------------------------- LOST sweep
    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """Apply retained history: run states and the in-progress gauge follow it, counters
        and histograms do not (see :attr:`~flowtrace.metrics.GatewayMetrics.counting`)."""
        metrics = self.metrics
        if metrics is None:
            yield
            return
        metrics.counting = False
        try:
            yield
        finally:
            metrics.counting = True

    def restart_silence(self, at: datetime) -> None:
        """Count no run's silence before ``at``: every RUNNING run gets a fresh ``stale_after``.

        For time when the gateway could not hear the workers (its transport unreachable):
        their silence then says nothing about them.
        """
        self._silence_from = max(self._silence_from, at)

    def sweep_lost(self, now: datetime | None = None) -> builtins.list[PipelineErrorEvent]:
        """LOST events for RUNNING runs silent for ``stale_after`` seconds.

        The store does not change state here: the caller publishes the events and the
        run becomes LOST when one comes back through :meth:`apply`, so that state follows
        the transport's order, as on every gateway. A run is declared once: its event,
        even while it waits to be published, settles it (an event that never arrives
        leaves the run RUNNING here, rather than risk a second LOST).
        """
        now = now or utc_now()
        stale = timedelta(seconds=self.stale_after)
        declared: builtins.list[PipelineErrorEvent] = []
        for run in self._runs.values():
            if run.is_terminal or run._book.lost_declared:
                continue
            if now - max(run._book.last_event_at, self._silence_from) < stale:
                continue
            run._book.lost_declared = True
            declared.append(self._lost_event(run, now))
        return declared

    def undeclare_lost(self, pipeline_id: str) -> None:
        """A LOST declaration that could not be made: the next sweep tries again."""
        run = self._runs.get(pipeline_id)
        if run is not None:
            run._book.lost_declared = False

    @staticmethod
    def _lost_event(run: RunState, now: datetime) -> PipelineErrorEvent:
        silent = (now - run._book.last_event_at).total_seconds()
        started = run.started_at or run._book.first_seen_at
        step = run.current_step()
        return PipelineErrorEvent(
            pipeline_id=run.pipeline_id, pipeline_name=run.pipeline_name,
            pipeline_type=run.pipeline_type, trace_id=run.trace_id, timestamp=now,
            status="LOST", error_type="RunLost", error=f"no event for {silent:.0f} s",
            failed_step=step.name if step else None,
            failed_step_index=step.index if step else None,
            duration_ms=max(0.0, (now - started).total_seconds() * 1000.0),
        )


def _start_key(run: RunState) -> datetime:
    return run.started_at or run._book.first_seen_at


__all__ = ["RUN_STATUSES", "RunState", "RunStatus", "RunStore", "StepState", "StepStatus"]
