"""The tasks and middlewares the four broker examples share.

Every example module builds its broker and result backend (from ``settings.py``), then
calls :func:`setup_broker` and ``flowtrace.instrument(broker)``. The tasks are registered
by a function so that a worker's broker and a kicking application's broker (the same
module imported by an API) get the same tasks under the same names.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, fields
from typing import Annotated, Any, TypeVar

from taskiq import AsyncBroker, Context, SimpleRetryMiddleware, TaskiqDepends
from taskiq.decor import AsyncTaskiqDecoratedTask
from taskiq_pipelines import PipelineMiddleware

B = TypeVar("B", bound=AsyncBroker)


def setup_broker(broker: B) -> B:
    """Add the pipeline and retry middlewares and register the example tasks."""
    broker.add_middlewares(PipelineMiddleware(), SimpleRetryMiddleware(default_retry_count=3))
    register_tasks(broker)
    return broker


def register_tasks(broker: AsyncBroker) -> None:
    """The example tasks, registered on ``broker`` under fixed names."""

    @broker.task(task_name="extract")
    async def extract(n: int) -> list[int]:
        """A batch of ``n`` items."""
        await asyncio.sleep(0.01)
        return list(range(n))

    @broker.task(task_name="double")
    async def double(x: int) -> int:
        await asyncio.sleep(0.01)
        return x * 2

    @broker.task(task_name="where")
    async def where(x: int) -> int:
        """For ``map``: which worker process ran this item (slow enough to spread)."""
        await asyncio.sleep(0.3)
        return os.getpid()

    @broker.task(task_name="is_big")
    async def is_big(x: int) -> bool:
        """For ``filter``."""
        await asyncio.sleep(0.05)
        return x >= 4

    @broker.task(task_name="total")
    async def total(xs: list[int]) -> int:
        return sum(xs)

    @broker.task(task_name="explode")
    async def explode(_: Any) -> int:
        raise ValueError("invalid input")

    @broker.task(task_name="flaky", retry_on_error=True, max_retries=3)
    async def flaky(x: Any, context: Annotated[Context, TaskiqDepends()]) -> str:
        """Fails its first attempt; ``SimpleRetryMiddleware`` re-kicks it with ``_retries``.

        Labels travel as strings on every broker (and come back typed only where
        taskiq's ``labels_types`` says so): compare them as ``int(...)``.
        """
        if int(context.message.labels.get("_retries", 0) or 0) == 0:
            raise ConnectionError("first attempt fails")
        return "ok"

    @broker.task(task_name="slow")
    async def slow(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds


@dataclass(frozen=True)
class Tasks:
    """The example tasks of one broker, looked up by name (for code that kicks them)."""

    extract: AsyncTaskiqDecoratedTask[Any, Any]
    double: AsyncTaskiqDecoratedTask[Any, Any]
    where: AsyncTaskiqDecoratedTask[Any, Any]
    is_big: AsyncTaskiqDecoratedTask[Any, Any]
    total: AsyncTaskiqDecoratedTask[Any, Any]
    explode: AsyncTaskiqDecoratedTask[Any, Any]
    flaky: AsyncTaskiqDecoratedTask[Any, Any]
    slow: AsyncTaskiqDecoratedTask[Any, Any]

    @classmethod
    def of(cls, broker: AsyncBroker) -> Tasks:
        found: dict[str, AsyncTaskiqDecoratedTask[Any, Any]] = {}
        for field in fields(cls):
            task = broker.find_task(field.name)
            if task is None:
                raise LookupError(f"task {field.name!r} is not registered: call setup_broker")
            found[field.name] = task
        return cls(**found)
