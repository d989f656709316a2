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
KICKED_AT_LABEL = "flowtrace_kicked_at"
"""Wall-clock ns when this message was sent: the start of its queue wait."""
NAME_LABEL = "flowtrace_pipeline_name"
"""Set by :class:`flowtrace.Pipeline` on every step so the name survives uninstrumented kickers."""


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
        """The label text (computed once)."""
        if self._label is None:
            # The JSON array json.dumps would write, built directly: this runs once per kick.
            self._label = (
                f"[{_json_str(self.pipeline_id)},{_json_str(self.name)},{_json_str(self.type)},"
                f'{self.started_ns},"{self.trace_id:032x}","{self.root_span_id:016x}",'
                f'"{self.parent_span_id:016x}",{int(self.sampled)}]'
            )
        return self._label

    @classmethod
    def decode(cls, text: Any) -> RunContext | None:
        """The context in a label, or None when absent or unreadable."""
        try:
            label = _text(text)
            pid, name, kind, started, tid, rsid, psid, sampled = _json_array(label)
            run = cls(str(pid), str(name), str(kind), int(started), int(tid, 16),
                      int(rsid, 16), int(psid, 16), bool(sampled))
        except (TypeError, ValueError):
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


_json_str = json.encoder.encode_basestring_ascii
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
