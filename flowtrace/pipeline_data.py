"""Read the step list that taskiq-pipelines carries in the ``_pipe_data`` label.

The label is base64 text when a message is sent and JSON bytes when it is executed
(taskiq parses typed labels on receipt); both forms are accepted here.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

CURRENT_STEP = "_pipe_current_step"
PIPELINE_DATA = "_pipe_data"
MAP_WAITER = "taskiq_pipelines.shared.wait_tasks"
FILTER_WAITER = "taskiq_pipelines.shared.filter_tasks"
FAN_OUT_STEP_TYPES = frozenset({"mapper", "filter"})


@dataclass(frozen=True, slots=True)
class StepInfo:
    kind: str
    name: str
    task_id: str

    @property
    def fans_out(self) -> bool:
        return self.kind in FAN_OUT_STEP_TYPES


def parse_steps(value: Any) -> list[StepInfo] | None:
    """The pipeline's steps, or None when ``value`` is not pipeline data."""
    try:
        raw = value
        if isinstance(raw, str):
            raw = base64.b64decode(raw, validate=True)
        if not isinstance(raw, (bytes, bytearray)):
            return None
        dumped = json.loads(raw)
        return [
            StepInfo(str(step["step_type"]), str(step["step_data"]["task_name"]),
                     str(step["task_id"]))
            for step in dumped
        ]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None


def current_step(labels: dict[str, Any]) -> int | None:
    value = labels.get(CURRENT_STEP)
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def set_label_on_steps(steps: list[Any], key: str, value: str) -> None:
    """Add a label to every dumped step so each hop's message carries it."""
    for step in steps:
        labels = step.step_data.setdefault("labels", {})
        labels[key] = value
