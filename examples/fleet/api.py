"""Example FastAPI app that kicks flowtrace ETL pipelines onto the fleet's broker.

    uvicorn examples.fleet.api:app --host 0.0.0.0 --port 8080

``POST /etl`` (optional JSON body ``{"records": [...], "flaky": false}``) kicks
``extract -> transform -> load`` and answers ``{"pipeline_id": ...}``: subscribe to
``ws://<gateway>/ws/{pipeline_id}`` right away to watch the run live. A row without a
numeric ``value`` makes ``transform`` fail; ``"flaky": true`` makes ``load`` retry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

import flowtrace
from examples.fleet.worker import broker, extract, load, transform

SAMPLE_RECORDS: list[dict[str, Any]] = [
    {"id": 1, "value": 3.5},
    {"id": 2, "value": 7},
    {"id": 3, "value": 11.25},
]


class EtlRequest(BaseModel):
    records: list[dict[str, Any]] = Field(default_factory=lambda: list(SAMPLE_RECORDS))
    flaky: bool = False


class EtlKicked(BaseModel):
    pipeline_id: str


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await broker.startup()
    try:
        yield
    finally:
        await broker.shutdown()


app = FastAPI(title="flowtrace fleet example", lifespan=lifespan)

try:  # with the fastapi-instrumentation extra, every run joins its request's trace
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
except ImportError:  # pragma: no cover - optional
    pass
else:
    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz")


def etl_pipeline() -> flowtrace.Pipeline:
    return flowtrace.Pipeline(broker, extract, name="etl").call_next(transform).call_next(load)


@app.post("/etl")
async def run_etl(request: EtlRequest | None = None) -> EtlKicked:
    """Kick one ETL run; its id is the pipeline id flowtrace reports everywhere."""
    payload = (request or EtlRequest()).model_dump()
    task = await etl_pipeline().kiq(payload)
    return EtlKicked(pipeline_id=task.task_id)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
