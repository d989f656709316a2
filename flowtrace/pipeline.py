"""``flowtrace.Pipeline``: a taskiq-pipelines ``Pipeline`` with a name."""

from __future__ import annotations

from typing import Any

import taskiq_pipelines
from taskiq import AsyncBroker, AsyncTaskiqTask

from flowtrace.labels import NAME_LABEL
from flowtrace.pipeline_data import set_label_on_steps


class Pipeline(taskiq_pipelines.Pipeline):  # type: ignore[type-arg]
    """A drop-in ``taskiq_pipelines.Pipeline`` whose runs are reported under ``name``.

    The name rides on every step's labels, so it survives hops through processes
    that do not run flowtrace. Without a name, a run is named after its first step.
    """

    def __init__(self, broker: AsyncBroker, task: Any = None, name: str | None = None) -> None:
        super().__init__(broker, task)
        self.name = name

    async def kiq(self, *args: Any, **kwargs: Any) -> AsyncTaskiqTask[Any]:
        if self.name:
            set_label_on_steps(self.steps, NAME_LABEL, self.name)
        return await super().kiq(*args, **kwargs)
