"""Events: JSON round trip, bounded previews, clear errors on bad input."""

from __future__ import annotations

import decimal
import json
import time
import uuid
from datetime import datetime, timezone

import pytest
from pydantic import BaseModel

from flowtrace import events
from flowtrace.events import (
    EVENT_CLASSES,
    InvalidEvent,
    PipelineErrorEvent,
    StepCompleteEvent,
    StepStartEvent,
    parse_event,
    preview,
)


def _sample(cls: type[events.BaseEvent]) -> events.BaseEvent:
    extra = {
        "StepStartEvent": {"step_name": "s", "queue_wait_ms": 1.5, "worker": "h:1"},
        "StepProgressEvent": {"step_name": "s", "done": 1, "failed": 0, "total": 3},
        "StepCompleteEvent": {"step_name": "s", "result": {"a": [1, 2]}, "duration_ms": 2.0},
        "StepErrorEvent": {"step_name": "s", "error": "ValueError: x", "error_type": "ValueError",
                           "will_retry": True},
        "PipelineStartEvent": {"input": [1, "two"], "total_steps": 2, "steps": ["a", "b"]},
        "PipelineCompleteEvent": {"result": None, "duration_ms": 3.0},
        "PipelineErrorEvent": {"error": "boom", "status": "LOST", "error_type": "RunLost"},
    }[cls.__name__]
    return cls(pipeline_id="p1", pipeline_name="etl", pipeline_type="sequential",
               trace_id="a" * 32, span_id="b" * 16, id="1-1", **extra)


@pytest.mark.parametrize("cls", list(EVENT_CLASSES.values()), ids=list(EVENT_CLASSES))
def test_every_event_round_trips_through_json(cls: type[events.BaseEvent]) -> None:
    event = _sample(cls)
    as_dict = event.model_dump(mode="json")
    assert as_dict["type"] == cls.__name__
    assert parse_event(as_dict) == event
    assert parse_event(json.dumps(as_dict)) == event
    assert parse_event(event.model_dump_json().encode()) == event


@pytest.mark.parametrize("cls", list(EVENT_CLASSES.values()), ids=list(EVENT_CLASSES))
def test_trusted_construction_builds_what_validation_builds(
        cls: type[events.BaseEvent]) -> None:
    # The middleware builds events without validation (the hot path); what it gets must be
    # indistinguishable from a validated event, on every wire and to every consumer.
    validated = _sample(cls)
    fields = validated.model_dump()
    trusted = cls.trusted(fields)
    assert cls._template is not None, "the fast path is off for this pydantic"
    assert trusted == validated
    assert trusted.model_dump_json() == validated.model_dump_json()
    assert parse_event(trusted.model_dump_json()) == validated
    trusted.id = "2-2"  # assignment still works (a shared fields-set is only ever added to)
    assert trusted.model_dump()["id"] == "2-2" and trusted.model_fields_set >= set(fields)


def test_timestamps_are_aware_utc_iso8601() -> None:
    naive = StepCompleteEvent(pipeline_id="p", step_name="s", timestamp=datetime(2026, 1, 1))
    assert naive.timestamp.tzinfo is not None
    text = naive.model_dump(mode="json")["timestamp"]
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    assert parsed.utcoffset() == timezone.utc.utcoffset(None)


@pytest.mark.parametrize("garbage", [
    b"\xff\xfe", "not json", "[1, 2]", "42", {"no": "type"}, {"type": 7},
])
def test_parse_event_rejects_garbage_with_a_clear_error(garbage: object) -> None:
    with pytest.raises(InvalidEvent):
        parse_event(garbage)  # type: ignore[arg-type]


def test_parse_event_names_an_unknown_type() -> None:
    with pytest.raises(InvalidEvent, match="unknown event type 'TeleportEvent'"):
        parse_event({"type": "TeleportEvent", "pipeline_id": "x"})


@pytest.mark.parametrize("ids", [{"trace_id": "xyz"}, {"span_id": "1"},
                                 {"trace_id": "AB" * 16}, {"span_id": "0" * 17}])
def test_parse_event_rejects_ids_that_are_not_lowercase_hex(ids: dict[str, str]) -> None:
    """SPEC §3: ``trace_id`` is 32 hex digits or null, ``span_id`` 16."""
    good = {"type": "StepProgressEvent", "pipeline_id": "p", "step_name": "s",
            "trace_id": "a" * 32, "span_id": "b" * 16}
    assert parse_event(good).trace_id == "a" * 32
    with pytest.raises(InvalidEvent, match=next(iter(ids))):
        parse_event({**good, **ids})


def test_parse_event_reports_missing_fields() -> None:
    with pytest.raises(InvalidEvent, match="StepErrorEvent"):
        parse_event({"type": "StepErrorEvent", "pipeline_id": "x", "step_name": "s"})


def test_preview_keeps_small_json_values_and_truncates_big_ones() -> None:
    assert preview({"a": [1, 2, {"b": None}]}) == {"a": [1, 2, {"b": None}]}
    assert preview((1, 2)) == [1, 2]
    big = preview(list(range(100_000)), max_bytes=1024)
    assert isinstance(big, str) and big.endswith(events.TRUNCATION_MARK)
    assert len(big.encode()) <= 1024
    assert preview("x", capture=False) is None


def test_preview_of_non_json_value_is_a_string_and_never_raises() -> None:
    class Weird:
        def __repr__(self) -> str:
            raise RuntimeError("no repr for you")

    assert isinstance(preview(object()), str)
    assert "unrepresentable" in preview(Weird())
    assert preview(float("nan")) == "nan"
    assert preview([1.0, float("inf")]) == "[1.0, inf]"


def test_preview_gives_models_and_rich_types_their_json_form() -> None:
    """What taskiq stores for a result (pydantic's JSON form), not Python's ``repr``."""

    class User(BaseModel):
        id: int
        joined: datetime

    joined = datetime(2026, 12, 4, 1, 2, 3, tzinfo=timezone.utc)
    ident = uuid.UUID(int=7)
    shown = preview({"user": User(id=1, joined=joined), "tags": {"a"}, "id": ident,
                     "price": decimal.Decimal("1.50")})
    assert shown == {"user": {"id": 1, "joined": "2026-12-04T01:02:03Z"}, "tags": ["a"],
                     "id": str(ident), "price": "1.50"}
    big = preview([User(id=i, joined=joined) for i in range(1000)], max_bytes=1024)
    assert isinstance(big, str) and big.endswith(events.TRUNCATION_MARK)


def test_ten_megabyte_result_is_bounded() -> None:
    result = {"blob": "x" * 10_000_000}
    shown = preview(result, max_bytes=1024)
    assert isinstance(shown, str) and len(shown.encode()) <= 1024
    event = StepCompleteEvent(pipeline_id="p", step_name="s", result=shown)
    assert len(event.model_dump_json()) < 4096


def test_error_text_matches_the_spec_form() -> None:
    assert events.error_text(ValueError("invalid input")) == "ValueError: invalid input"
    assert events.error_text(KeyError()) == "KeyError"
    assert PipelineErrorEvent(pipeline_id="p", error="x").status == "FAILED"


@pytest.mark.parametrize("text", ['"' * 1000, "\n" * 1000, "\0" * 1000, "é" * 2000,
                                  "😀" * 600, "x" * 1023, 'a"b' * 600],
                         ids=["quotes", "newlines", "nuls", "accents", "emoji", "ascii", "mixed"])
def test_string_previews_fit_max_bytes_as_json(text: str) -> None:
    """SPEC §3: the value itself only when it *serializes* to at most max_payload_bytes;
    quotes, control characters and non-ASCII grow in JSON."""
    shown = preview(text, max_bytes=1024)
    event = StepCompleteEvent(pipeline_id="p", step_name="s", result=shown)
    literal = json.dumps(json.loads(event.model_dump_json())["result"], ensure_ascii=False)
    assert len(literal.encode()) <= 1024
    assert shown == text or (shown.endswith(events.TRUNCATION_MARK)
                             and text.startswith(shown[: -len(events.TRUNCATION_MARK)]))
    assert preview("x" * 1022, max_bytes=1024) == "x" * 1022  # 1024 bytes with its quotes


@pytest.mark.parametrize("payload", [
    '{"type": ["StepStartEvent"], "pipeline_id": "p"}',
    '{"type": {"a": 1}, "pipeline_id": "p"}',
    "[" * 5000 + "]" * 5000,
    '{"type": "PipelineStartEvent", "pipeline_id": "p", "input": ' + "[" * 5000 + "]" * 5000 + "}",
], ids=["list-type", "object-type", "deep-array", "deep-input"])
def test_parse_event_rejects_odd_json_with_invalid_event(payload: str) -> None:
    """Anything a transport may carry fails with InvalidEvent (counted and skipped by a
    subscriber), never with another exception that would stop it."""
    with pytest.raises(InvalidEvent):
        parse_event(payload)


def test_a_naive_timestamp_is_local_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """``datetime.now()`` (the reference's examples) is local time, as Python reads it."""
    monkeypatch.setenv("TZ", "Europe/Paris")
    time.tzset()
    try:
        event = StepStartEvent(pipeline_id="p", step_name="s",
                               timestamp=datetime(2026, 12, 4, 12, 0, 0))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert event.timestamp == datetime(2026, 12, 4, 11, 0, 0, tzinfo=timezone.utc)
