"""The ``/ws`` and ``/api`` routes of SPEC §6, as one ``APIRouter`` to mount anywhere.

Handlers use ``app.state.flowtrace_manager`` when the app set one (``create_app``
does), else the process-default manager.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, WebSocket

from flowtrace.websocket.endpoint import fastapi_websocket_endpoint, manager_for, token_matches
from flowtrace.websocket.manager import FastAPIWebSocketManager

RUN_STATUSES = ("RUNNING", "COMPLETED", "FAILED", "LOST")


def get_manager(request: Request) -> FastAPIWebSocketManager:
    return manager_for(request)


Manager = Annotated[FastAPIWebSocketManager, Depends(get_manager)]


def require_token(request: Request, manager: Manager) -> None:
    """With a token set, HTTP routes need it (``Authorization: Bearer`` or ``?token=``)."""
    if manager.token is None:
        return
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    candidates = [request.query_params.get("token")]
    if scheme.lower() == "bearer":
        candidates.append(credentials.strip())
    if not any(token_matches(candidate, manager.token) for candidate in candidates):
        raise HTTPException(status_code=401, detail="missing or invalid token",
                            headers={"WWW-Authenticate": "Bearer"})


router = APIRouter()
_protected = [Depends(require_token)]


# Declared before the WebSocket route so that /ws/metrics is never read as a pipeline id.
@router.get("/ws/metrics", dependencies=_protected, tags=["websocket"])
async def ws_metrics(manager: Manager) -> dict[str, Any]:
    """Connections, channels, messages sent and dropped, rejections, slow consumers."""
    return manager.stats()


@router.websocket("/ws/{pipeline_id}")
async def ws_pipeline(websocket: WebSocket, pipeline_id: str) -> None:
    """Live events of one run (``/ws/*``: every run); see SPEC §6 for the protocol."""
    await fastapi_websocket_endpoint(websocket, pipeline_id, manager_for(websocket))


@router.get("/api/ws/clients/{pipeline_id}", dependencies=_protected, tags=["websocket"])
async def ws_client_count(pipeline_id: str, manager: Manager) -> dict[str, Any]:
    return {"pipeline_id": pipeline_id, "client_count": manager.get_client_count(pipeline_id)}


@router.get("/api/ws/pipelines", dependencies=_protected, tags=["websocket"])
async def ws_pipelines(manager: Manager) -> dict[str, list[str]]:
    """Channels (pipeline ids, ``*``) that have at least one subscriber."""
    return {"pipelines": manager.get_channel_ids()}


@router.get("/api/pipelines", dependencies=_protected, tags=["runs"])
async def list_pipelines(
    manager: Manager,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 50,
    status: Annotated[str | None, Query(description="RUNNING, COMPLETED, FAILED or LOST")] = None,
) -> list[dict[str, Any]]:
    """Recent runs, newest first."""
    if status is not None:
        status = status.upper()
        if status not in RUN_STATUSES:
            raise HTTPException(status_code=422,
                                detail=f"status must be one of {', '.join(RUN_STATUSES)}")
    if manager.store is None:
        return []
    return [run.model_dump(mode="json") for run in manager.store.list(limit, status)]


@router.get("/api/pipelines/{pipeline_id}", dependencies=_protected, tags=["runs"])
async def get_pipeline(pipeline_id: str, manager: Manager) -> dict[str, Any]:
    """One run's state; 404 when this gateway does not know it."""
    run = manager.store.get(pipeline_id) if manager.store is not None else None
    if run is None:
        raise HTTPException(status_code=404, detail=f"unknown pipeline {pipeline_id!r}")
    return run.model_dump(mode="json")


__all__ = ["get_manager", "require_token", "router"]
