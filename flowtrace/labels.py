"""What travels in a message's labels from hop to hop.

flowtrace uses its own label keys (never ``traceparent``), so it coexists with
taskiq's OpenTelemetryMiddleware. Values are plain strings so that every broker
and formatter carries them unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

RUN_LABEL = "flowtrace_run"
"""The run's identity and root trace context: same on every hop of a run."""
STEP_LABEL = "flowtrace_step"
"""A map/filter step's preallocated span, on its items and on its waiter."""
KICKED_AT_LABEL = "flowtrace_kicked_at"
"""Wall-clock ns when this message was sent: the start of its queue wait."""
NAME_LABEL = "flowtrace_pipeline_name"
"""Set by :class:`flowtrace.Pipeline` on every step so the name survives uninstrumented kickers."""


@dataclass(frozen=True)
class RunContext:
    """A run as every process of it sees it (immutable; its label text is computed once)."""

    pipeline_id: str
    name: str
    type: str
    started_ns: int
    trace_id: int = 0
    root_span_id: int = 0
    parent_span_id: int = 0
    sampled: bool = False

    def encode(self) -> str:
        return self._encoded

    @cached_property
    def _encoded(self) -> str:
        return json.dumps(
            [self.pipeline_id, self.name, self.type, self.started_ns, f"{self.trace_id:032x}",
             f"{self.root_span_id:016x}", f"{self.parent_span_id:016x}", int(self.sampled)],
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: Any) -> RunContext | None:
        """The context in a label, or None when absent or unreadable."""
        try:
            pid, name, kind, started, tid, rsid, psid, sampled = json.loads(_text(text))
            return cls(str(pid), str(name), str(kind), int(started), int(tid, 16),
                       int(rsid, 16), int(psid, 16), bool(sampled))
        except (TypeError, ValueError):
            return None

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
            index, span_id, started, total, item = json.loads(_text(text))
            return cls(int(index), int(span_id, 16), int(started), int(total), int(item))
        except (TypeError, ValueError):
            return None


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
