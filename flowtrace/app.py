"""``create_app``: the ready gateway (SPEC §6, §7) — REST, WebSocket, metrics and the page.

Everything one app needs is built here and hung on ``app.state``
(``flowtrace_manager``, ``flowtrace_gateway``, ``flowtrace_store``,
``flowtrace_metrics``, ``flowtrace_token``), so two apps in one process never share
state. Shutdown closes WebSocket clients with 1001 *before* the gateway stops, so
no client is left waiting on a feed that has ended.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from flowtrace import metrics as process_metrics
from flowtrace.gateway import Gateway
from flowtrace.hooks import HookManager, hooks_of
from flowtrace.metrics import CONTENT_TYPE, GatewayMetrics
from flowtrace.runs import RunStore
from flowtrace.transport.base import Transport
from flowtrace.transport.memory import InMemoryTransport
from flowtrace.websocket import FastAPIWebSocketManager, router

DEFAULT_TRACE_URL = "http://localhost:16686/trace/{trace_id}"
STATIC_DIR = Path(__file__).resolve().parent / "static"
CLOSE_GOING_AWAY = 1001
# The page and its files may be cached but are revalidated (ETag) on every load, so that
# a browser never keeps running an old app.js after an upgrade.
PAGE_CACHE_CONTROL = "no-cache"

PLACEHOLDER_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flowtrace</title></head>
<body><h1>flowtrace gateway</h1>
<p>The live page is not installed. Recent runs: <a href="/api/pipelines">/api/pipelines</a>,
metrics: <a href="/metrics">/metrics</a>, live events: <code>/ws/*</code>.</p>
</body></html>
"""


def create_app(transport: Transport | None = None, *, max_connections: int = 1000,
               token: str | None = None, allowed_origins: Iterable[str] | None = None,
               hooks: HookManager | Iterable[Any] | None = None, stale_after: float = 3600.0,
               max_runs: int = 10_000, send_queue_size: int = 1000,
               max_message_bytes: int = 4096, max_subscriptions: int = 100,
               max_bad_frames: int = 10, trace_url: str | None = None,
               static_dir: str | Path | None = None,
               lifespan: Callable[[FastAPI], AbstractAsyncContextManager[Any]] | None = None,
               ) -> FastAPI:
    """Build the gateway app around ``transport`` (default: a new in-memory one).

    A transport passed in belongs to the caller, who closes it; one created here is
    closed on shutdown. ``hooks`` (a HookManager or hook objects) see every event the
    gateway consumes, i.e. the whole fleet's. ``lifespan`` is the application's own (as
    ``FastAPI(lifespan=...)`` takes it: start a broker, say): it runs inside the gateway's,
    so the gateway is up before it starts and still up until it has finished.
    """
    owns_transport = transport is None
    if transport is None:
        transport = InMemoryTransport()
    _count_transport_drops(transport)
    metrics = GatewayMetrics()
    store = RunStore(max_runs=max_runs, metrics=metrics, stale_after=stale_after)
    manager = FastAPIWebSocketManager(
        transport=transport, store=store, metrics=metrics, max_connections=max_connections,
        send_queue_size=send_queue_size, max_message_bytes=max_message_bytes,
        max_subscriptions=max_subscriptions, max_bad_frames=max_bad_frames, token=token,
        allowed_origins=list(allowed_origins) if allowed_origins is not None else None)
    hook_manager = hooks_of(hooks)
    if hook_manager is not None:
        hook_manager.fed_by("gateway")
    gateway = Gateway(transport, store=store, manager=manager, hooks=hook_manager,
                      stale_after=stale_after)

    @asynccontextmanager
    async def gateway_lifespan(app: FastAPI) -> AsyncIterator[Any]:
        await gateway.start()
        try:
            if lifespan is None:
                yield
            else:
                async with lifespan(app) as state:
                    yield state
        finally:
            await close_clients(manager)
            await gateway.stop()
            if hook_manager is not None:
                await hook_manager.close()
            if owns_transport:
                await transport.close()

    app = FastAPI(title="flowtrace", version=_version(), lifespan=gateway_lifespan)
    app.state.flowtrace_manager = manager
    app.state.flowtrace_gateway = gateway
    app.state.flowtrace_store = store
    app.state.flowtrace_metrics = metrics
    app.state.flowtrace_transport = transport
    app.state.flowtrace_token = token
    if token:
        app.add_middleware(ApiTokenGuard, token=token)
    app.include_router(router)
    _add_routes(app, gateway, metrics, trace_url,
                Path(static_dir) if static_dir else STATIC_DIR)
    return app


async def close_clients(manager: FastAPIWebSocketManager, code: int = CLOSE_GOING_AWAY) -> None:
    """Close every WebSocket client of ``manager`` with ``code`` (1001: going away)."""
    await manager.close_all(code)


def _add_routes(app: FastAPI, gateway: Gateway, metrics: GatewayMetrics,
                trace_url: str | None, static_dir: Path) -> None:
    page = static_dir / "index.html"

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: 503 while the gateway cannot read its transport (liveness is /healthz)."""
        health = gateway.health()
        return JSONResponse(health, status_code=200 if gateway.transport_reachable else 503)

    @app.get("/api/config")
    async def config() -> dict[str, str]:
        return {"trace_url": trace_url or os.environ.get("FLOWTRACE_TRACE_URL")
                or DEFAULT_TRACE_URL}

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        # Looked up per request: the page may be installed after the app was built.
        headers = {"Cache-Control": PAGE_CACHE_CONTROL}
        if page.is_file():
            return FileResponse(page, media_type="text/html", headers=headers)
        return HTMLResponse(PLACEHOLDER_PAGE, headers=headers)

    if static_dir.is_dir():
        app.mount("/static", RevalidatedStaticFiles(directory=static_dir), name="static")


class RevalidatedStaticFiles(StaticFiles):
    """``StaticFiles`` whose answers (200 and 304) say ``Cache-Control: no-cache``."""

    def file_response(self, full_path: str | os.PathLike[str], stat_result: os.stat_result,
                      scope: Scope, status_code: int = 200) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = PAGE_CACHE_CONTROL
        return response


class ApiTokenGuard:
    """Pure ASGI middleware: ``/api/*`` needs ``Authorization: Bearer <token>`` or ``?token=``.

    ``/ws/*`` is guarded by the WebSocket manager (it must accept, then close 1008).
    """

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _is_api(scope["path"]) and not self._authorized(scope):
            response = JSONResponse({"detail": "missing or invalid token"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        offered: list[str] = []
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, credentials = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    offered.append(credentials.strip())
        query = scope.get("query_string", b"").decode("latin-1")
        offered.extend(parse_qs(query).get("token", []))
        return any(hmac.compare_digest(candidate.encode(), self.token) for candidate in offered)


def _is_api(path: str) -> bool:
    return path == "/api" or path.startswith("/api/")


def _count_transport_drops(transport: Transport) -> None:
    """The gateway reports its own drops (SPEC §5); register once per transport."""
    callbacks = getattr(transport, "_drop_callbacks", [])
    if process_metrics.count_drop not in callbacks:
        transport.on_drop(process_metrics.count_drop)


def _version() -> str:
    from flowtrace import __version__

    return __version__


__all__ = ["ApiTokenGuard", "close_clients", "create_app"]
