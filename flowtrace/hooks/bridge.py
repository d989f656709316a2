"""``flowtrace.hooks.bridge``: the path the reference's multi-worker example imports
``setup_websocket_bridge`` from (the same function as ``flowtrace.hooks``')."""

from flowtrace.hooks import setup_websocket_bridge

__all__ = ["setup_websocket_bridge"]
