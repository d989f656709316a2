"""Single-process bridge: a hook that forwards every event to a WebSocket manager.

For one process (no transport) as in the reference design. With a gateway, the
gateway feeds the manager from the transport instead and no bridge is needed.

A manager without a run store gets one from the bridge, fed with every event before it
is broadcast: a client that subscribes to a run right after kicking it (or after it
ended) gets its ``snapshot`` first, then live events, with no gap (SPEC §2, §6); the
router's REST routes list this process's runs. There is no history to resume from:
``since`` needs the gateway's transport.
"""

from __future__ import annotations

import logging
from typing import Protocol

from flowtrace.events import BaseEvent
from flowtrace.runs import RunStore
from flowtrace.websocket.manager import FastAPIWebSocketManager, get_fastapi_ws_manager

logger = logging.getLogger("flowtrace.websocket")


class _HookManagerLike(Protocol):
    def add_hook(self, hook: object) -> object: ...


class BridgedRunStore(RunStore):
    """The run store a bridge gave a manager that had none: every bridge to it feeds it
    (a gateway feeds the store it gave its manager, and bridges leave that one alone)."""


class WebSocketBridgeHook:
    """``on_event`` → the manager's run store when bridges feed it → ``manager.broadcast``
    (which never waits on a socket)."""

    def __init__(self, manager: FastAPIWebSocketManager) -> None:
        self.manager = manager
        if manager.store is None:
            manager.store = BridgedRunStore()
        self.store = manager.store if isinstance(manager.store, BridgedRunStore) else None
        """The run store this bridge feeds; None when a gateway feeds the manager's."""

    async def on_event(self, event: BaseEvent) -> None:
        if self.store is not None:
            try:
                self.store.apply(event)
            except Exception:
                logger.exception("flowtrace: the bridge's run store could not apply %s",
                                 type(event).__name__)
        # No await since applying: a client subscribing now gets the snapshot or the event.
        await self.manager.broadcast(event)


def setup_websocket_bridge(hook_manager: _HookManagerLike,
                           manager: FastAPIWebSocketManager | None = None) -> WebSocketBridgeHook:
    """Add a bridge hook to ``hook_manager`` (default manager when none is given); return it."""
    hook = WebSocketBridgeHook(manager if manager is not None else get_fastapi_ws_manager())
    hook_manager.add_hook(hook)
    return hook


__all__ = ["BridgedRunStore", "WebSocketBridgeHook", "setup_websocket_bridge"]
