"""Turns what the middleware observed into events: previews, span events, fan-out.

Every event goes to the in-process hooks and to the transport, both without
waiting; the event's span gets it as a span event (its attributes are taken
from the event when an exporter reads the span). Events travel as their field
dicts (:data:`~flowtrace.events.EventFields`): a model is built only where one is used.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from flowtrace.events import EventFields, preview
from flowtrace.hooks import HookManager
from flowtrace.tracing.spans import SpanRecord
from flowtrace.transport.base import Transport

logger = logging.getLogger("flowtrace")

_this_worker = ""


def _identify_worker() -> str:
    global _this_worker
    _this_worker = f"{socket.gethostname()}:{os.getpid()}"
    return _this_worker


def _forget_worker() -> None:
    global _this_worker
    _this_worker = ""


os.register_at_fork(after_in_child=_forget_worker)


class Emitter:
    def __init__(self, transport: Transport, hooks: HookManager | None, capture_payloads: bool,
                 max_payload_bytes: int, redact: Callable[[Any], Any] | None) -> None:
        self.transport = transport
        self.hooks = hooks
        if hooks is not None:
            hooks.fed_by("middleware")
        self.capture_payloads = capture_payloads
        self.max_payload_bytes = max_payload_bytes
        self.redact = redact

    def payload(self, value: Any) -> Any:
        """A bounded, JSON-safe, redacted preview of a task's input or result."""
        if not self.capture_payloads or (value is None and self.redact is None):
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
        """``host:pid`` of this process (taskiq forks its workers: recomputed after a fork)."""
        return _this_worker or _identify_worker()

    def emit(self, fields: EventFields, span: SpanRecord | None, time_ns: int) -> None:
        """Hand an event (its fields) to its span, the hooks and the transport; never waits."""
        if span is not None and span.sampled:
            span.event_data += (fields["type"], fields, time_ns)
        hooks = self.hooks
        if hooks is not None:
            hooks.emit_nowait(fields)
        self.transport.publish_fields_nowait(fields)
