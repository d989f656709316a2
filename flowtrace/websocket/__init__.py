"""Live events over WebSocket (SPEC §6): manager, endpoint, routes and the hook bridge."""

from flowtrace.websocket.bridge import WebSocketBridgeHook, setup_websocket_bridge
from flowtrace.websocket.endpoint import fastapi_websocket_endpoint
from flowtrace.websocket.manager import FastAPIWebSocketManager, get_fastapi_ws_manager
from flowtrace.websocket.router import router

__all__ = [
    "FastAPIWebSocketManager",
    "WebSocketBridgeHook",
    "fastapi_websocket_endpoint",
    "get_fastapi_ws_manager",
    "router",
    "setup_websocket_bridge",
]
