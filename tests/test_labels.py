"""Run labels: what carries a run's identity and trace context from hop to hop."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from flowtrace.labels import RunContext

ids = st.integers(min_value=0, max_value=2**128 - 1)
span_ids = st.integers(min_value=0, max_value=2**64 - 1)


@given(pipeline_id=st.text(), name=st.text(), kind=st.sampled_from(["task", "sequential"]),
       started=st.integers(min_value=0, max_value=2**63), trace_id=ids, root=span_ids,
       parent=span_ids, sampled=st.booleans())
def test_every_run_survives_its_label(pipeline_id: str, name: str, kind: str, started: int,
                                      trace_id: int, root: int, parent: int,
                                      sampled: bool) -> None:
    run = RunContext(pipeline_id, name, kind, started, trace_id, root, parent, sampled)
    label = run.encode()
    assert RunContext.decode(label) == run
    assert RunContext.decode(label.encode()) == run  # brokers may hand labels back as bytes
    assert run.hex_ids() == (f"{trace_id:032x}", f"{root:016x}")


@given(st.one_of(st.text(), st.binary(), st.none(), st.integers(), st.lists(st.text())))
def test_garbage_is_no_run_and_never_raises(garbage: object) -> None:
    run = RunContext.decode(garbage)
    assert run is None or RunContext.decode(run.encode()) == run


def test_a_label_from_another_writer_is_no_run() -> None:
    good = RunContext("id", "etl", "task", 1, 2, 3, 0, True).encode()
    for bad in ("", good[:64], "2" + good[1:], good.replace(":2:id", ":99:id"),
                '["id","etl","task",1]', good[:10] + "zz" + good[12:]):
        assert RunContext.decode(bad) is None, bad


@given(trace_id=ids, root=span_ids, parent=span_ids, sampled=st.booleans())
def test_label_text_is_what_earlier_versions_wrote(trace_id: int, root: int, parent: int,
                                                   sampled: bool) -> None:
    """Workers of different flowtrace versions read each other's labels during a rollout."""
    earlier = f"{int(sampled)}{trace_id:032x}{root:016x}{parent:016x}7:task:2:idnoop"
    run = RunContext("id", "noop", "task", 7, trace_id, root, parent, sampled)
    assert run.encode() == earlier
    assert RunContext.decode(earlier) == run
