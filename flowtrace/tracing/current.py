"""The current span of the running task: reading it (a run's parent) and setting it (a step's).

OpenTelemetry keeps the current context in a ``ContextVar`` of its runtime context.
With the SDK's default runtime, flowtrace reads, sets and resets that variable directly,
without ``attach``'s and ``detach``'s layers; any other runtime context goes through the
public API.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any, NamedTuple

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.trace import INVALID_SPAN, Span, SpanContext, set_span_in_context


def _runtime_variable() -> contextvars.ContextVar[Context] | None:
    """The variable behind the SDK's default runtime context; None for any other runtime."""
    runtime = getattr(otel_context, "_RUNTIME_CONTEXT", None)
    if type(runtime) is not ContextVarsRuntimeContext:
        return None
    variable = getattr(runtime, "_current_context", None)
    return variable if isinstance(variable, contextvars.ContextVar) else None


def _span_key() -> str | None:
    """The key under which the current span is kept (``set_span_in_context``'s)."""
    probe = INVALID_SPAN
    keys = [key for key, value in set_span_in_context(probe, Context()).items() if value is probe]
    return keys[0] if len(keys) == 1 else None


Token = Any
"""What :func:`make_current` returns and :func:`restore_current` takes back."""


def _set_through_api(span: Span) -> Token:
    return otel_context.attach(set_span_in_context(span))


class _Direct(NamedTuple):
    set_current: Callable[[Span], Token]
    restore: Callable[[Token], None]
    get_current: Callable[[], Any]


def _direct_access() -> _Direct | None:
    """The current span through the variable itself, when that is what the API does
    (checked here, on a copy of the caller's context); None otherwise."""
    variable, key = _runtime_variable(), _span_key()
    if variable is None or key is None:
        return None

    def set_current(span: Span) -> Token:
        current = variable.get()
        return variable.set(Context({**current, key: span}) if current else Context({key: span}))

    def get_current() -> Any:
        return variable.get().get(key, INVALID_SPAN)

    direct = _Direct(set_current, variable.reset, get_current)

    def fits() -> bool:
        span = trace.NonRecordingSpan(SpanContext(5, 7, is_remote=False))
        before = trace.get_current_span()
        token = direct.set_current(span)
        current = trace.get_current_span() is span and direct.get_current() is span
        direct.restore(token)
        return current and trace.get_current_span() is before

    try:
        return direct if contextvars.copy_context().run(fits) else None
    except Exception:  # noqa: BLE001 - any surprise: the public API
        return None


_direct = _direct_access()
make_current: Callable[[Span], Token] = _direct.set_current if _direct else _set_through_api
"""Make a span the current span of the running asyncio task, until :func:`restore_current`."""
restore_current: Callable[[Token], None] = _direct.restore if _direct else otel_context.detach
"""Make current again what was current before :func:`make_current` returned ``token``."""
_current_span: Callable[[], Any] = _direct.get_current if _direct else trace.get_current_span


def current_parent() -> SpanContext | None:
    """The span active in the caller (a FastAPI request, say), if any."""
    span = _current_span()
    if span is INVALID_SPAN:  # nothing is current: the usual case, answered at once
        return None
    context = span.get_span_context()
    return context if context.is_valid else None
