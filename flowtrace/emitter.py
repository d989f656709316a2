"""Turns what the middleware observed into events: previews, span events, fan-out.

Every event goes to the in-process hooks (non-blocking) and to the transport
(buffered, non-blocking); the event's span gets it as a span event.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from flowtrace.events import BaseEvent, preview
from flowtrace.hooks import HookManager
from flowtrace.tracing.spans import SpanRecord
from flowtrace.transport.base import Transport

logger = logging.getLogger("flowtrace")

_SPAN_EVENT_SKIP = frozenset({"type", "id", "timestamp", "trace_id", "span_id", "input", "result"})


def span_event_attributes(event: BaseEvent) -> dict[str, Any]:
    """The event's scalar fields, prefixed ``flowtrace.``."""
    return {
        f"flowtrace.{name}": value
        for name, value in event.__dict__.items()
        if name not in _SPAN_EVENT_SKIP and isinstance(value, (str, int, float, bool))
    }


class Emitter:
    def __init__(self, transport: Transport, hooks: HookManager | None, capture_payloads: bool,
                 max_payload_bytes: int, redact: Callable[[Any], Any] | None) -> None:
        self.transport = transport
        self.hooks = hooks
        self.capture_payloads = capture_payloads
        self.max_payload_bytes = max_payload_bytes
        self.redact = redact
        self._worker: tuple[int, str] | None = None

    def payload(self, value: Any) -> Any:
        """A bounded, JSON-safe, redacted preview of a task's input or result."""
        if not self.capture_payloads:
            return None
        if self.redact is not None:
            try:
                value = self.redact(value)
            except Exception:
                logger.exception("flowtrace: redact() raised; the payload is withheld")
                return "<redaction failed>"
        return preview(value, self.max_payload_bytes)

    @property
    def worker(self) -> str:
        """``host:pid`` of this process (recomputed after a fork)."""
        pid = os.getpid()
        if self._worker is None or self._worker[0] != pid:
            self._worker = (pid, f"{socket.gethostname()}:{pid}")
        return self._worker[1]

    async def emit(self, event: BaseEvent, span: SpanRecord | None, time_ns: int) -> None:
        if span is not None and span.sampled:
            span.add_event(event.__class__.__name__, span_event_attributes(event), time_ns)
        if self.hooks is not None:
            self.hooks.emit_nowait(event)
        await self.transport.publish(event)
