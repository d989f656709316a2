"""What travels in a message's labels from hop to hop.

flowtrace uses its own label keys (never ``traceparent``), so it coexists with
taskiq's OpenTelemetryMiddleware. Values are plain strings so that every broker
and formatter carries them unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

RUN_LABEL = "flowtrace_run"
"""The run's identity and root trace context: same on every hop of a run."""
STEP_LABEL = "flowtrace_step"
"""A map/filter step's preallocated span, on its items and on its waiter."""
STEP_WORKER_LABEL = "flowtrace_step_worker"
"""On a map/filter step's waiter: the ``worker`` of the StepStartEvent its kicker emitted
(a label of its own, so that workers of earlier versions still read ``flowtrace_step``)."""
KICKED_AT_LABEL = "flowtrace_kicked_at"
"""Wall-clock ns when this message was sent: the start of its queue wait."""
NAME_LABEL = "flowtrace_pipeline_name"
"""Set by :class:`flowtrace.Pipeline` on every step so the name survives uninstrumented kickers."""


_IDS = 65
"""Length of a run label's fixed head: sampled flag, trace, root span and parent span ids."""
_NO_PARENT = "0" * 16
_SPAN_ID_BITS = 64
_SPAN_ID_MASK = (1 << _SPAN_ID_BITS) - 1


@dataclass(slots=True, eq=True)
class RunContext:
    """A run as every process of it sees it. Treated as immutable: build a new one to change it."""

    pipeline_id: str
    name: str
    type: str
    started_ns: int
    trace_id: int = 0
    root_span_id: int = 0
    parent_span_id: int = 0
    sampled: bool = False
    # The label text, once known; not an init field, so ``replace()`` starts without it.
    _label: str | None = field(default=None, init=False, compare=False, repr=False)

    def encode(self) -> str:
        """The label text (computed once): ``<sampled><trace><root><parent>`` in fixed-width
        hex, then ``<started_ns>:<type>:<len(pipeline_id)>:<pipeline_id><name>``.

        Sliced, not parsed, on every hop: the ids need no JSON, and the length prefix
        lets the id and the name hold any character.
        """
        if self._label is None:
            # %-format: f-string format specs look up a bound __format__ per field.
            # The trace and root span ids side by side are one 48-digit number: one
            # conversion here, one parse in decode().
            self._label = "%d%048x%016x%d:%s:%d:%s%s" % (  # noqa: UP031
                self.sampled, self.trace_id << _SPAN_ID_BITS | self.root_span_id,
                self.parent_span_id, self.started_ns, self.type, len(self.pipeline_id),
                self.pipeline_id, self.name,
            )
        return self._label

    def hex_ids(self) -> tuple[str, str]:
        """The trace id and the root span id as events carry them (32 and 16 hex digits),
        cut from the label: no formatting."""
        label = self._label or self.encode()
        return label[1:33], label[33:49]

    @classmethod
    def decode(cls, text: Any) -> RunContext | None:
        """The context in a label, or None when absent or unreadable."""
        try:
            label = _text(text)
            started, kind, size, rest = label[_IDS:].split(":", 3)
            length = int(size)
            flag = label[0]
            if flag not in "01" or not 0 <= length <= len(rest):
                return None
            ids = int(label[1:49], 16)
            parent = label[49:_IDS]
            run = cls(rest[:length], rest[length:], kind, int(started), ids >> _SPAN_ID_BITS,
                      ids & _SPAN_ID_MASK, 0 if parent == _NO_PARENT else int(parent, 16),
                      flag == "1")
        except (TypeError, ValueError, IndexError):
            return None
        run._label = label  # the next hop carries the same text on
        return run

    def with_name(self, name: str) -> RunContext:
        return replace(self, name=name)


@dataclass(frozen=True, slots=True)
class StepContext:
    """A map/filter step started by the process that kicked its items."""

    index: int
    span_id: int
    started_ns: int
    total: int = 0
    item_index: int = -1

    def encode(self) -> str:
        return json.dumps([self.index, f"{self.span_id:016x}", self.started_ns, self.total,
                           self.item_index], separators=(",", ":"))

    @classmethod
    def decode(cls, text: Any) -> StepContext | None:
        try:
            index, span_id, started, total, item = _json_array(_text(text))
            return cls(int(index), int(span_id, 16), int(started), int(total), int(item))
        except (TypeError, ValueError):
            return None


_scan_json = json.decoder.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _json_array(text: str) -> list[Any]:
    """A label's JSON array, read by the C scanner alone (``json.loads`` costs twice as much)."""
    try:
        value, end = _scan_json(text, 0)
    except StopIteration as exc:
        raise ValueError("label is not JSON") from exc
    if end != len(text) or not isinstance(value, list):
        raise ValueError("label is not a JSON array")
    return value


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if not isinstance(value, str):
        raise TypeError("label is not text")
    return value


def kicked_at(labels: dict[str, Any]) -> int | None:
    value = labels.get(KICKED_AT_LABEL)
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
