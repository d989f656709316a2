"""Typed lifecycle events: the spine every consumer of flowtrace reads.

Every event is a pydantic v2 model discriminated by ``type`` (its class name).
``model_dump(mode="json")`` and :func:`parse_event` round-trip every event.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic_core import to_jsonable_python
from typing_extensions import Self

PipelineType = Literal["sequential", "task", "dataflow"]

TRUNCATION_MARK = "…[truncated]"


def utc_now() -> datetime:
    """Current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


class InvalidEvent(ValueError):
    """Raised by :func:`parse_event` for data that is not a flowtrace event."""


def _slot_setter(name: str) -> Any:
    """The setter of one of pydantic's instance slots (what ``model_construct`` fills)."""
    descriptor = BaseModel.__dict__.get(name)
    return descriptor.__set__ if descriptor is not None else None


_set_dict = _slot_setter("__dict__")
_set_fields_set = _slot_setter("__pydantic_fields_set__")
_set_extra = _slot_setter("__pydantic_extra__")
_set_private = _slot_setter("__pydantic_private__")
_FAST_PATH = None not in (_set_dict, _set_fields_set, _set_extra, _set_private)


class BaseEvent(BaseModel):
    """Fields every event carries."""

    model_config = ConfigDict(extra="ignore")

    id: str | None = None
    pipeline_id: str
    pipeline_name: str = ""
    pipeline_type: PipelineType = "sequential"
    trace_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    span_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    # After the ids: an event is built as ``{**ids, "timestamp": ..., ...}`` (declared order).
    timestamp: datetime = Field(default_factory=utc_now)

    _template: ClassVar[dict[str, Any] | None] = None
    if TYPE_CHECKING:  # each event class declares its own literal ``type`` field
        type: str

    @field_validator("timestamp")
    @classmethod
    def _aware_utc(cls, value: datetime) -> datetime:
        """UTC. A naive time is local time, as Python reads it (``datetime.now()``)."""
        return value.astimezone(timezone.utc)

    @classmethod
    def trusted(cls, values: dict[str, Any]) -> Self:
        """Build an event from values flowtrace produced itself, without validating them.

        Validation costs more than the rest of an event. ``timestamp`` (aware UTC) and every
        field without a plain default must be in ``values``. Falls back to validation if
        this pydantic lays models out differently.
        """
        template = cls._template
        if template is None:
            return cls(**values)
        return trusted_event(cls, {**template, **values})  # declared order: serialisation


E = TypeVar("E", bound=BaseEvent)
_new = object.__new__


_trusted_fields: dict[type[BaseEvent], set[str]] = {}
"""The classes :func:`trusted_event` builds directly, with their shared fields-set. A dict:
an attribute of a pydantic model class goes through its metaclass's ``__getattr__`` hook."""


def trusted_event(cls: type[E], fields: dict[str, Any]) -> E:
    """:meth:`BaseEvent.trusted` given every field, in declared order (the middleware's path).

    ``fields`` becomes the event's own dict. A function, not a classmethod: no bound
    method to allocate per event.
    """
    names = _trusted_fields.get(cls)
    if names is None:
        return cls(**fields)
    event = _new(cls)
    _set_dict(event, fields)
    # Every field is set; one set per class is shared: pydantic only ever adds a field
    # name to it (on assignment), and every field name is in it already.
    _set_fields_set(event, names)
    _set_extra(event, None)
    _set_private(event, None)
    return event


class PipelineStartEvent(BaseEvent):
    type: Literal["PipelineStartEvent"] = "PipelineStartEvent"
    input: Any = None
    total_steps: int = 1
    steps: list[str] = Field(default_factory=list)


class StepStartEvent(BaseEvent):
    type: Literal["StepStartEvent"] = "StepStartEvent"
    step_name: str
    step_index: int = 0
    task_id: str = ""
    attempt: int = 1
    queue_wait_ms: float | None = None
    worker: str = ""


class StepProgressEvent(BaseEvent):
    type: Literal["StepProgressEvent"] = "StepProgressEvent"
    step_name: str
    step_index: int = 0
    done: int = 0
    failed: int = 0
    total: int = 0


class StepCompleteEvent(BaseEvent):
    type: Literal["StepCompleteEvent"] = "StepCompleteEvent"
    step_name: str
    step_index: int = 0
    task_id: str = ""
    attempt: int = 1
    result: Any = None
    duration_ms: float = 0.0


class StepErrorEvent(BaseEvent):
    type: Literal["StepErrorEvent"] = "StepErrorEvent"
    step_name: str
    step_index: int = 0
    task_id: str = ""
    attempt: int = 1
    error: str
    error_type: str = ""
    will_retry: bool = False
    duration_ms: float = 0.0


class PipelineCompleteEvent(BaseEvent):
    type: Literal["PipelineCompleteEvent"] = "PipelineCompleteEvent"
    status: Literal["COMPLETED"] = "COMPLETED"
    duration_ms: float = 0.0
    result: Any = None


class PipelineErrorEvent(BaseEvent):
    type: Literal["PipelineErrorEvent"] = "PipelineErrorEvent"
    status: Literal["FAILED", "LOST"] = "FAILED"
    error: str
    error_type: str = ""
    failed_step: str | None = None
    failed_step_index: int | None = None
    duration_ms: float = 0.0


Event = Annotated[
    PipelineStartEvent
    | StepStartEvent
    | StepProgressEvent
    | StepCompleteEvent
    | StepErrorEvent
    | PipelineCompleteEvent
    | PipelineErrorEvent,
    Field(discriminator="type"),
]

EVENT_CLASSES: dict[str, type[BaseEvent]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        PipelineStartEvent,
        StepStartEvent,
        StepProgressEvent,
        StepCompleteEvent,
        StepErrorEvent,
        PipelineCompleteEvent,
        PipelineErrorEvent,
    )
}
EVENT_TYPES: tuple[str, ...] = tuple(EVENT_CLASSES)

EventFields = dict[str, Any]
"""An event before it is a model: every field, in declared order, ``type`` included (what
:func:`trusted_event` takes). The middleware emits these; a model is built only where one is
needed (a hook's call, a transport's subscriber or wire format), from the same dict."""


def event_of(fields: EventFields) -> Event:
    """The model of an event's fields (it shares the dict: ids set later show)."""
    return trusted_event(EVENT_CLASSES[fields["type"]], fields)  # type: ignore[return-value]


def _enable_trusted_construction(cls: type[BaseEvent]) -> None:
    """Use :meth:`BaseEvent.trusted`'s fast path for ``cls`` if it builds what validation does."""
    fields = cls.model_fields
    # Every field, in declared order; required and factory-made ones are given by callers.
    template = {
        name: None if field.is_required() or field.default_factory else field.default
        for name, field in fields.items()
    }
    sample: dict[str, Any] = {name: "x" for name, field in fields.items() if field.is_required()}
    sample["timestamp"] = datetime(2026, 1, 1, tzinfo=timezone.utc)
    if "steps" in cls.model_fields:
        sample["steps"] = ["a"]
    if not _FAST_PATH:
        return
    try:
        cls._template = template
        _trusted_fields[cls] = set(template)
        fast = cls.trusted(sample)
        same = fast.model_dump_json() == cls(**sample).model_dump_json() and fast == cls(**sample)
    except Exception:  # noqa: BLE001 - any surprise: keep validating
        same = False
    if not same:
        cls._template = None
        _trusted_fields.pop(cls, None)


for _cls in EVENT_CLASSES.values():
    _enable_trusted_construction(_cls)
TERMINAL_TYPES = frozenset({"PipelineCompleteEvent", "PipelineErrorEvent"})

_EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(data: dict[str, Any] | str | bytes) -> Event:
    """Build an event from its JSON form (a dict, JSON text or JSON bytes).

    Raises :class:`InvalidEvent` with a readable reason for anything else.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidEvent(f"event is not UTF-8 text: {exc}") from exc
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError) as exc:  # (RecursionError: nested too deep)
            raise InvalidEvent(f"event is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidEvent(f"event must be a JSON object, got {type(data).__name__}")
    event_type = data.get("type")
    if not isinstance(event_type, str) or event_type not in EVENT_CLASSES:
        raise InvalidEvent(f"unknown event type {event_type!r}; known: {', '.join(EVENT_TYPES)}")
    try:
        return _EVENT_ADAPTER.validate_python(data)
    except (ValidationError, RecursionError) as exc:
        raise InvalidEvent(f"invalid {event_type}: {exc}") from exc


def event_to_json(event: BaseEvent) -> str:
    """The event's wire form (JSON text)."""
    return event.model_dump_json()


class _StopEncoding(Exception):
    pass


def preview(value: Any, max_bytes: int = 1024, capture: bool = True) -> Any:
    """A JSON-safe, bounded preview of a task's input or result.

    The value itself when its JSON form fits in ``max_bytes`` (UTF-8 bytes, a string's
    quotes and escapes included); otherwise a string marked as truncated whose JSON form
    fits. Models, dataclasses,
    datetimes, UUIDs, decimals and sets take the JSON form pydantic (and so taskiq) gives
    them; values nothing can encode are shown through ``repr``. Never raises.
    """
    if not capture:
        return None
    if value is None or isinstance(value, (bool, int, float)):
        return value if not isinstance(value, float) or math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return _truncate(value, max_bytes)
    try:
        if _json_size_bound(value, 4 * max_bytes) is not None:
            text = _COMPACT.encode(value)  # small: the C encoder in one go
            complete = len(text) <= max_bytes and len(text.encode("utf-8")) <= max_bytes
        else:
            text, complete = _bounded_json(value, max_bytes)
    except Exception:  # noqa: BLE001 - anything unencodable falls back to repr
        text, complete = _bounded_repr(value, max_bytes), False
    if complete:
        return value if _is_plain_json(value) else json.loads(text)
    return _truncate(text, max_bytes)


# What the encoder cannot encode itself takes pydantic's JSON form (a model's fields, ISO
# datetimes, ...); what pydantic cannot encode either raises, and preview() shows its repr.
_COMPACT = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                            default=to_jsonable_python)


def _json_size_bound(value: Any, budget: int) -> int | None:
    """An upper bound of ``value``'s JSON size, or None once it exceeds ``budget``.

    Cheap for small values, and stops early on big ones, so a 10 MB result never
    gets encoded whole.
    """
    stack = [value]
    size = 0
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            size += 6 * len(item) + 2
        elif isinstance(item, (list, tuple)):
            size += 2 + len(item)
            stack.extend(item)
        elif isinstance(item, dict):
            size += 2 + 2 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        else:
            size += 32
        if size > budget:
            return None
    return size


def _bounded_json(value: Any, max_bytes: int) -> tuple[str, bool]:
    """Encode to JSON, stopping once more than ``max_bytes`` were produced."""
    parts: list[str] = []
    size = 0
    for chunk in _COMPACT.iterencode(value):
        parts.append(chunk)
        size += len(chunk.encode("utf-8"))
        if size > max_bytes:
            return "".join(parts), False
    return "".join(parts), True


def _bounded_repr(value: Any, max_bytes: int) -> str:
    try:
        text = repr(value)
    except Exception as exc:  # noqa: BLE001 - a broken __repr__ must not break us
        text = f"<unrepresentable {type(value).__name__}: {type(exc).__name__}>"
    return text[: max_bytes * 2]


def _literal_size(text: str) -> int:
    """UTF-8 bytes of ``text`` as a JSON string literal, quotes included (as events carry it)."""
    return len(_COMPACT.encode(text).encode("utf-8"))


def _truncate(text: str, max_bytes: int) -> str:
    """``text`` if its JSON literal fits in ``max_bytes``, else its longest prefix that fits
    with :data:`TRUNCATION_MARK` appended (only the mark when even that is too long)."""
    if len(text) + 2 <= max_bytes and (6 * len(text) + 2 <= max_bytes  # (6: the longest escape)
                                       or _literal_size(text) <= max_bytes):
        return text
    budget = max(0, max_bytes - _literal_size(TRUNCATION_MARK))
    cut = text[:budget]  # every character takes at least one byte
    while cut and (over := _literal_size(cut) - 2 - budget) > 0:
        cut = cut[: len(cut) - max(1, over // 6)]  # no character takes more than 6
    return cut + TRUNCATION_MARK


def _is_plain_json(value: Any) -> bool:
    """True when ``value`` is made only of JSON types (no tuples, no subclasses)."""
    kind = type(value)
    if kind in (str, int, float, bool) or value is None:
        return True
    if kind is list:
        return all(_is_plain_json(item) for item in value)
    if kind is dict:
        return all(type(k) is str and _is_plain_json(v) for k, v in value.items())
    return False


ERROR_TEXT_MAX_CHARS = 4096
"""An event's ``error`` is cut here: an exception's message can be megabytes (a whole
response body, say), and it goes to every client, the run store and the trace."""


def error_text(exc: BaseException) -> str:
    """``"ValueError: invalid input"``: the form StepErrorEvent.error uses, bounded."""
    message = str(exc)
    name = type(exc).__name__
    text = f"{name}: {message}" if message else name
    if len(text) <= ERROR_TEXT_MAX_CHARS:
        return text
    return text[: ERROR_TEXT_MAX_CHARS - len(TRUNCATION_MARK)] + TRUNCATION_MARK


__all__ = [
    "EVENT_CLASSES",
    "EVENT_TYPES",
    "TERMINAL_TYPES",
    "BaseEvent",
    "Event",
    "EventFields",
    "InvalidEvent",
    "PipelineCompleteEvent",
    "PipelineErrorEvent",
    "PipelineStartEvent",
    "PipelineType",
    "StepCompleteEvent",
    "StepErrorEvent",
    "StepProgressEvent",
    "StepStartEvent",
    "error_text",
    "event_of",
    "event_to_json",
    "parse_event",
    "preview",
    "trusted_event",
    "utc_now",
]
