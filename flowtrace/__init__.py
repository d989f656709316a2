"""flowtrace: drop-in observability for taskiq and taskiq-pipelines.

``flowtrace.instrument(broker)`` is the one call most users need; see SPEC §2.
Attributes are imported lazily so that ``import flowtrace.events`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowtrace._lazy import lazy_attributes

__version__ = "0.1.0"

_EXPORTS = {
    "instrument": "flowtrace.instrumentation",
    "FlowtraceMiddleware": "flowtrace.middleware",
    "Pipeline": "flowtrace.pipeline",
    "HookManager": "flowtrace.hooks",
    "EventFilter": "flowtrace.hooks",
}

if TYPE_CHECKING:
    from flowtrace.hooks import EventFilter, HookManager
    from flowtrace.instrumentation import instrument
    from flowtrace.middleware import FlowtraceMiddleware
    from flowtrace.pipeline import Pipeline


_SUBMODULES = frozenset({"app", "cli", "events", "hooks", "metrics", "tracing", "transport",
                         "websocket"})
"""The public submodules, reachable after a plain ``import flowtrace``."""

__getattr__ = lazy_attributes(__name__, _EXPORTS, _SUBMODULES)


__all__ = ["EventFilter", "FlowtraceMiddleware", "HookManager", "Pipeline", "instrument"]
