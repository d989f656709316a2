"""RunStore: run state transitions and the metrics they drive (SPEC §3, §5, §6)."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest

from flowtrace.events import (
    PipelineCompleteEvent,
    PipelineErrorEvent,
    PipelineStartEvent,
    StepCompleteEvent,
    StepErrorEvent,
    StepProgressEvent,
    StepStartEvent,
    parse_event,
)
from flowtrace.metrics import GatewayMetrics
from flowtrace.runs import RunState, RunStore

T0 = datetime(2025, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
NAME = "etl"
TRACE = "ab" * 16


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def common(run: str = "r1", t: float = 0.0, name: str = NAME) -> dict[str, object]:
    return {"pipeline_id": run, "pipeline_name": name, "timestamp": at(t), "trace_id": TRACE}


def start(run: str = "r1", t: float = 0.0, steps: tuple[str, ...] = ("extract", "load"),
          name: str = NAME) -> PipelineStartEvent:
    return PipelineStartEvent(**common(run, t, name), input={"x": 1}, total_steps=len(steps),
                              steps=list(steps))


def step_start(index: int, step: str, *, run: str = "r1", t: float = 0.0, attempt: int = 1,
               queue_wait_ms: float | None = 5.0) -> StepStartEvent:
    return StepStartEvent(**common(run, t), step_name=step, step_index=index, task_id=f"t{index}",
                          attempt=attempt, queue_wait_ms=queue_wait_ms, worker="w1")


def step_done(index: int, step: str, *, run: str = "r1", t: float = 0.0, attempt: int = 1,
              duration_ms: float = 100.0) -> StepCompleteEvent:
    return StepCompleteEvent(**common(run, t), step_name=step, step_index=index,
                             task_id=f"t{index}", attempt=attempt, result=1,
                             duration_ms=duration_ms)


def step_error(index: int, step: str, *, will_retry: bool, run: str = "r1", t: float = 0.0,
               attempt: int = 1) -> StepErrorEvent:
    return StepErrorEvent(**common(run, t), step_name=step, step_index=index, task_id=f"t{index}",
                          attempt=attempt, error="ValueError: boom", error_type="ValueError",
                          will_retry=will_retry, duration_ms=20.0)


def complete(run: str = "r1", t: float = 1.0, name: str = NAME) -> PipelineCompleteEvent:
    return PipelineCompleteEvent(**common(run, t, name), duration_ms=1000.0, result=[1])


def failed(run: str = "r1", t: float = 1.0, index: int = 0,
           step: str = "extract") -> PipelineErrorEvent:
    return PipelineErrorEvent(**common(run, t), error="ValueError: boom", error_type="ValueError",
                              failed_step=step, failed_step_index=index, duration_ms=1000.0)


class Metrics:
    """Readable access to one GatewayMetrics registry."""

    def __init__(self) -> None:
        self.gateway = GatewayMetrics()

    def value(self, name: str, **labels: str) -> float:
        found = self.gateway.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found

    def runs(self, status: str, pipeline: str = NAME) -> float:
        return self.value("flowtrace_pipeline_runs_total", pipeline=pipeline, status=status)

    def in_progress(self, pipeline: str = NAME) -> float:
        return self.value("flowtrace_pipelines_in_progress", pipeline=pipeline)

    def steps(self, step: str, status: str) -> float:
        return self.value("flowtrace_step_runs_total", pipeline=NAME, step=step, status=status)

    def events(self, event_type: str) -> float:
        return self.value("flowtrace_events_total", type=event_type)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def store(metrics: Metrics) -> RunStore:
    return RunStore(max_runs=100, metrics=metrics.gateway, stale_after=60.0)


def the_run(store: RunStore, run: str = "r1") -> RunState:
    state = store.get(run)
    assert state is not None
    return state


def test_pipeline_start_creates_a_running_run_with_pending_steps(store: RunStore,
                                                                 metrics: Metrics) -> None:
    store.apply(start())
    run = the_run(store)
    assert (run.status, run.pipeline_name, run.total_steps, run.trace_id) == (
        "RUNNING", NAME, 2, TRACE)
    assert run.started_at == T0
    assert [(s.index, s.name, s.status, s.attempt) for s in run.steps] == [
        (0, "extract", "PENDING", 0), (1, "load", "PENDING", 0)]
    assert metrics.in_progress() == 1
    assert metrics.events("PipelineStartEvent") == 1


def test_a_successful_run_walks_every_state(store: RunStore, metrics: Metrics) -> None:
    store.apply(start())
    store.apply(step_start(0, "extract", t=0.1, queue_wait_ms=250.0))
    assert the_run(store).steps[0].status == "RUNNING"
    assert the_run(store).steps[0].started_at == at(0.1)
    store.apply(StepProgressEvent(**common(t=0.2), step_name="extract", step_index=0, done=3,
                                  failed=1, total=10))
    step = the_run(store).steps[0]
    assert (step.done, step.total) == (3, 10)
    store.apply(step_done(0, "extract", t=0.3, duration_ms=200.0))
    step = the_run(store).steps[0]
    assert (step.status, step.finished_at, step.duration_ms) == ("COMPLETED", at(0.3), 200.0)
    store.apply(step_start(1, "load", t=0.4))
    store.apply(step_done(1, "load", t=0.5))
    store.apply(complete(t=1.0))

    run = the_run(store)
    assert (run.status, run.finished_at, run.duration_ms, run.error) == (
        "COMPLETED", at(1.0), 1000.0, None)
    assert [s.status for s in run.steps] == ["COMPLETED", "COMPLETED"]
    assert metrics.runs("completed") == 1
    assert metrics.in_progress() == 0
    assert metrics.steps("extract", "completed") == 1
    assert metrics.steps("load", "completed") == 1
    assert metrics.value("flowtrace_pipeline_duration_seconds_sum", pipeline=NAME,
                         status="completed") == pytest.approx(1.0)
    assert metrics.value("flowtrace_step_duration_seconds_sum", pipeline=NAME,
                         step="extract") == pytest.approx(0.2)
    assert metrics.value("flowtrace_step_queue_wait_seconds_sum", pipeline=NAME,
                         step="extract") == pytest.approx(0.25)
    assert metrics.value("flowtrace_step_queue_wait_seconds_count", pipeline=NAME,
                         step="extract") == 1
    for event_type in ("StepStartEvent", "StepCompleteEvent"):
        assert metrics.events(event_type) == 2
    assert metrics.events("PipelineCompleteEvent") == 1


def test_queue_wait_is_not_observed_when_null(store: RunStore, metrics: Metrics) -> None:
    store.apply(start())
    store.apply(step_start(0, "extract", queue_wait_ms=None))
    assert metrics.value("flowtrace_step_queue_wait_seconds_count", pipeline=NAME,
                         step="extract") == 0


def test_retry_then_success(store: RunStore, metrics: Metrics) -> None:
    store.apply(start())
    store.apply(step_start(0, "extract"))
    store.apply(step_error(0, "extract", will_retry=True))
    step = the_run(store).steps[0]
    assert (step.status, step.attempt) == ("RETRYING", 1)
    assert the_run(store).status == "RUNNING"
    store.apply(step_start(0, "extract", attempt=2, t=0.5))
    step = the_run(store).steps[0]
    assert (step.status, step.attempt, step.finished_at) == ("RUNNING", 2, None)
    store.apply(step_done(0, "extract", attempt=2))
    assert the_run(store).steps[0].status == "COMPLETED"
    assert metrics.steps("extract", "retried") == 1
    assert metrics.steps("extract", "completed") == 1
    assert metrics.steps("extract", "failed") == 0
    assert metrics.in_progress() == 1


def test_step_failure_fails_the_run(store: RunStore, metrics: Metrics) -> None:
    store.apply(start())
    store.apply(step_start(0, "extract"))
    store.apply(step_error(0, "extract", will_retry=False))
    assert the_run(store).steps[0].status == "FAILED"
    store.apply(failed())
    run = the_run(store)
    assert (run.status, run.error, run.finished_at) == ("FAILED", "ValueError: boom", at(1.0))
    assert [s.status for s in run.steps] == ["FAILED", "PENDING"]
    assert metrics.steps("extract", "failed") == 1
    assert metrics.runs("failed") == 1
    assert metrics.in_progress() == 0


def test_pipeline_error_marks_a_silent_failed_step(store: RunStore) -> None:
    store.apply(start())
    store.apply(step_start(1, "load"))
    store.apply(failed(index=1, step="load"))
    assert the_run(store).steps[1].status == "FAILED"


def test_duplicate_pipeline_start_counts_the_run_once(store: RunStore, metrics: Metrics) -> None:
    store.apply(start())
    store.apply(step_start(0, "extract"))
    store.apply(start(t=0.5))  # redelivered first step repeats PipelineStartEvent
    run = the_run(store)
    assert run.started_at == T0
    assert run.steps[0].status == "RUNNING"
    assert metrics.in_progress() == 1
    store.apply(complete())
    store.apply(complete())
    assert metrics.runs("completed") == 1
    assert metrics.in_progress() == 0
    assert metrics.events("PipelineStartEvent") == 2  # every consumed event counts
    assert metrics.events("PipelineCompleteEvent") == 2


def test_redelivered_step_outcome_counts_once(store: RunStore, metrics: Metrics) -> None:
    store.apply(start())
    store.apply(step_start(0, "extract"))
    store.apply(step_done(0, "extract"))
    store.apply(step_start(0, "extract"))
    store.apply(step_done(0, "extract"))
    assert metrics.steps("extract", "completed") == 1
    assert the_run(store).steps[0].status == "COMPLETED"


def test_a_run_first_seen_through_a_step_event(store: RunStore, metrics: Metrics) -> None:
    store.apply(step_start(1, "load", t=3.0))
    run = the_run(store)
    assert (run.status, run.pipeline_name, run.total_steps, run.started_at) == (
        "RUNNING", NAME, None, at(3.0))
    assert [(s.index, s.status) for s in run.steps] == [(0, "PENDING"), (1, "RUNNING")]
    assert metrics.in_progress() == 1
    store.apply(start(t=0.0))  # the start arrives late: fills in, does not count again
    run = the_run(store)
    assert (run.total_steps, run.started_at, run.steps[0].name) == (2, T0, "extract")
    assert metrics.in_progress() == 1


def test_a_run_first_seen_through_its_terminal_event(store: RunStore, metrics: Metrics) -> None:
    store.apply(complete())
    assert the_run(store).status == "COMPLETED"
    assert metrics.runs("completed") == 1
    assert metrics.in_progress() == 0


def test_events_after_a_terminal_event_change_nothing(store: RunStore, metrics: Metrics) -> None:
    store.apply(start())
    store.apply(failed())
    before = the_run(store).model_dump()
    store.apply(step_start(1, "load"))
    store.apply(step_done(1, "load"))
    store.apply(complete())
    assert the_run(store).model_dump() == before
    assert metrics.steps("load", "completed") == 0
    assert metrics.runs("completed") == 0
    assert metrics.runs("failed") == 1


def test_sweep_declares_a_silent_run_lost_once(store: RunStore, metrics: Metrics) -> None:
    seen = datetime.now(timezone.utc)
    store.apply(start(), now=seen)
    store.apply(step_start(0, "extract"), now=seen)
    store.apply(step_done(0, "extract"), now=seen)
    store.apply(step_start(1, "load"), now=seen)
    store.apply(start("quiet-but-done", name="other"), now=seen)
    store.apply(complete("quiet-but-done", name="other"), now=seen)

    assert store.sweep_lost(seen + timedelta(seconds=59)) == []
    later = seen + timedelta(seconds=61)
    [lost] = store.sweep_lost(later)
    assert (lost.pipeline_id, lost.status, lost.error_type, lost.error) == (
        "r1", "LOST", "RunLost", "no event for 61 s")
    assert (lost.failed_step, lost.failed_step_index, lost.trace_id) == ("load", 1, TRACE)
    assert lost.duration_ms == pytest.approx((later - T0).total_seconds() * 1000)
    assert store.sweep_lost(later + timedelta(seconds=1)) == []  # declared once
    assert the_run(store).status == "RUNNING"  # until the event comes back

    store.apply(parse_event(lost.model_dump(mode="json")))  # back through the transport
    store.apply(parse_event(lost.model_dump(mode="json")))  # another gateway's duplicate
    run = the_run(store)
    assert (run.status, run.error) == ("LOST", "no event for 61 s")
    assert metrics.runs("lost") == 1
    assert metrics.in_progress() == 0

    store.apply(step_done(1, "load"))  # the worker comes back late
    store.apply(complete())
    assert the_run(store).status == "LOST"
    assert the_run(store).steps[1].status == "RUNNING"
    assert metrics.steps("load", "completed") == 0
    assert metrics.runs("completed") == 0
    assert metrics.runs("lost") == 1
    assert store.sweep_lost(later + timedelta(hours=5)) == []


def test_a_run_is_declared_lost_at_most_once(store: RunStore) -> None:
    """Its LOST event will come back however late (it may wait out an outage in the
    gateway's buffer): a second declaration could only add a second LOST."""
    seen = datetime.now(timezone.utc)
    store.apply(start(), now=seen)
    assert len(store.sweep_lost(seen + timedelta(seconds=61))) == 1
    assert store.sweep_lost(seen + timedelta(seconds=200)) == []  # the event is not back yet
    store.apply(step_start(0, "extract"), now=seen + timedelta(seconds=201))  # alive after all
    assert store.sweep_lost(seen + timedelta(hours=5)) == []
    assert the_run(store).status == "RUNNING"


def test_silence_restarted_counts_from_then(store: RunStore) -> None:
    """While the gateway could not hear the workers their silence says nothing: after it,
    every running run gets a fresh stale_after, however long it was silent before."""
    seen = datetime.now(timezone.utc)
    store.apply(start("old"), now=seen)
    store.apply(start("recent"), now=seen + timedelta(seconds=50))
    store.apply(start("done"), now=seen)
    store.apply(complete("done"), now=seen)
    back = seen + timedelta(seconds=40)
    store.restart_silence(back)
    store.restart_silence(back - timedelta(seconds=10))  # an earlier restart changes nothing
    assert store.sweep_lost(back + timedelta(seconds=59)) == []
    [old] = store.sweep_lost(back + timedelta(seconds=61))
    assert (old.pipeline_id, old.error) == ("old", "no event for 101 s")
    [recent] = store.sweep_lost(seen + timedelta(seconds=111))  # its own silence ends later
    assert recent.pipeline_id == "recent"


def test_list_is_newest_first_with_limit_and_status(store: RunStore) -> None:
    for i in range(5):
        store.apply(start(f"r{i}", t=float(i)))
    store.apply(complete("r1"))
    store.apply(failed("r3"))
    store.apply(step_start(0, "extract", run="r0", t=9.0))  # activity does not reorder
    assert [r.pipeline_id for r in store.list()] == ["r4", "r3", "r2", "r1", "r0"]
    assert [r.pipeline_id for r in store.list(limit=2)] == ["r4", "r3"]
    assert [r.pipeline_id for r in store.list(status="RUNNING")] == ["r4", "r2", "r0"]
    assert [r.pipeline_id for r in store.list(status="failed")] == ["r3"]
    assert store.list(status="LOST") == []
    assert store.get("nope") is None


def test_lru_eviction_keeps_the_gauge_exact(metrics: Metrics) -> None:
    store = RunStore(max_runs=3, metrics=metrics.gateway)
    store.apply(start("a", name="p"))
    store.apply(start("b", name="p"))
    store.apply(complete("b"))
    store.apply(start("c", name="p"))
    store.apply(step_start(0, "extract", run="a"))  # touching "a" keeps it
    assert metrics.in_progress("p") == 2
    store.apply(start("d", name="p"))  # evicts "b" (finished): gauge unchanged
    assert "b" not in store
    assert metrics.in_progress("p") == 3
    store.apply(start("e", name="p"))  # evicts "c" (running): gauge follows
    assert "c" not in store
    assert sorted(r.pipeline_id for r in store.list(limit=None)) == ["a", "d", "e"]
    assert len(store) == 3
    assert metrics.in_progress("p") == 3


def test_run_state_serializes_as_the_spec_says(store: RunStore) -> None:
    store.apply(start())
    store.apply(step_start(0, "extract"))
    data = the_run(store).model_dump(mode="json")
    # SPEC §6's fields, and one beyond it each (what the page shows after a reload).
    assert set(data) == {"pipeline_id", "pipeline_name", "pipeline_type", "status", "started_at",
                         "finished_at", "duration_ms", "trace_id", "total_steps", "error", "steps",
                         "result"}
    assert set(data["steps"][0]) == {"index", "name", "status", "attempt", "started_at",
                                     "finished_at", "duration_ms", "done", "total", "error"}
    assert data["started_at"] == "2025-01-01T12:00:00Z"
    assert data["steps"][0]["status"] == "RUNNING"


@pytest.mark.parametrize("copy_run", [lambda r: r.model_copy(), lambda r: r.model_copy(deep=True),
                                      copy.copy, copy.deepcopy,
                                      lambda r: pickle.loads(pickle.dumps(r))])
def test_a_copied_run_state_is_equal_and_still_swept(copy_run: Callable[[RunState], RunState],
                                                     store: RunStore) -> None:
    """The store's bookkeeping lives outside pydantic's fields: a copy still carries it."""
    seen = datetime.now(timezone.utc)
    store.apply(start(), now=seen)
    copied = copy_run(the_run(store))
    assert copied == the_run(store)
    assert copied.last_event_at == seen
    assert RunState.model_validate(copied.model_dump()) == copied


def test_gauge_follows_a_name_learned_late(store: RunStore, metrics: Metrics) -> None:
    store.apply(StepStartEvent(pipeline_id="r1", step_name="extract"))  # no name yet
    assert metrics.in_progress("") == 1
    store.apply(start())
    store.apply(complete())
    assert (metrics.in_progress(""), metrics.in_progress()) == (0, 0)
    assert metrics.runs("completed") == 1


def test_run_state_keeps_the_result_and_a_steps_last_error(store: RunStore) -> None:
    store.apply(start())
    store.apply(step_start(0, "extract"))
    store.apply(StepErrorEvent(pipeline_id="r1", pipeline_name="etl", step_name="extract",
                               error="ConnectionError: try again", error_type="ConnectionError",
                               will_retry=True, duration_ms=1.0))
    assert the_run(store).steps[0].error == "ConnectionError: try again"
    store.apply(StepCompleteEvent(pipeline_id="r1", pipeline_name="etl", step_name="extract",
                                  attempt=2, result=[1, 2], duration_ms=1.0))
    assert the_run(store).steps[0].error is None
    store.apply(PipelineCompleteEvent(pipeline_id="r1", pipeline_name="etl", duration_ms=3.0,
                                      result={"rows": 2}))
    assert the_run(store).result == {"rows": 2}
