"""A user's own FastAPI app that mounts ``flowtrace.websocket.router`` (README "The gateway").

One process: an instrumented ``InMemoryBroker`` whose events reach the router's default
manager through ``setup_websocket_bridge``. ``POST /kick`` runs a plain task.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from taskiq import InMemoryBroker

import flowtrace
from flowtrace.websocket import router, setup_websocket_bridge

broker = InMemoryBroker()
hooks = flowtrace.HookManager()
setup_websocket_bridge(hooks)
flowtrace.instrument(broker, hooks=hooks)


@broker.task(task_name="own.add_one")
async def add_one(value: int) -> int:
    return value + 1


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    await broker.startup()
    yield
    await broker.shutdown()


app = FastAPI(lifespan=lifespan)
app.include_router(router)


@app.post("/kick")
async def kick() -> dict[str, str]:
    task = await add_one.kiq(1)
    return {"pipeline_id": task.task_id}
