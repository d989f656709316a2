"""Single-process bridge: a hook that forwards every event to a WebSocket manager.

For one process (no transport) as in the reference design. With a gateway, the
gateway feeds the manager from the transport instead and no bridge is needed.
"""

from __future__ import annotations

from typing import Protocol

from flowtrace.events import BaseEvent
from flowtrace.websocket.manager import FastAPIWebSocketManager, get_fastapi_ws_manager


class _HookManagerLike(Protocol):
    def add_hook(self, hook: object) -> object: ...


class WebSocketBridgeHook:
    """``on_event`` → ``manager.broadcast`` (which never waits on a socket)."""

    def __init__(self, manager: FastAPIWebSocketManager) -> None:
        self.manager = manager

    async def on_event(self, event: BaseEvent) -> None:
        await self.manager.broadcast(event)


def setup_websocket_bridge(hook_manager: _HookManagerLike,
                           manager: FastAPIWebSocketManager | None = None) -> WebSocketBridgeHook:
    """Add a bridge hook to ``hook_manager`` (default manager when none is given); return it."""
    hook = WebSocketBridgeHook(manager if manager is not None else get_fastapi_ws_manager())
    hook_manager.add_hook(hook)
    return hook


__all__ = ["WebSocketBridgeHook", "setup_websocket_bridge"]
