"""flowtrace: drop-in observability for taskiq and taskiq-pipelines.

``flowtrace.instrument(broker)`` is the one call most users need; see SPEC §2.
Attributes are imported lazily so that ``import flowtrace.events`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'flowtrace' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["EventFilter", "FlowtraceMiddleware", "HookManager", "Pipeline", "instrument"]
