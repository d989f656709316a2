"""Coalesced progress of a map/filter step, reported by the process running its waiter.

Items finish in any worker process; each counts itself in the transport's shared
per-step counters (Redis hash, or a dict in one process). The waiter's process
reads those counters a few times a second and emits a StepProgressEvent only when
they changed, so thousands of items cost a handful of events. All of a step's
progress events come from one process, so they stay in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from flowtrace.transport.base import Transport

logger = logging.getLogger("flowtrace.progress")

ProgressCallback = Callable[[int, int], Awaitable[None]]

SETTLE_TIMEOUT_S = 1.0
"""How long a finished step waits for its items' counts to arrive (an item whose worker
died between storing its result and shipping its count never arrives)."""
SETTLE_POLL_S = 0.01


def counter_key(pipeline_id: str, step_index: int) -> str:
    return f"{pipeline_id}:{step_index}"


class ProgressMonitor:
    """Polls a step's shared counters and reports changes through ``report(done, failed)``."""

    def __init__(self, transport: Transport, key: str, total: int, report: ProgressCallback,
                 interval: float = 0.25) -> None:
        self.transport = transport
        self.key = key
        self.total = total
        self.report = report
        self.interval = interval
        self.last: tuple[int, int] = (-1, -1)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="flowtrace-progress")

    async def _run(self) -> None:
        while True:
            try:
                await self._report_if_changed(*await self.transport.read_counts(self.key))
            except Exception:
                logger.exception("flowtrace: reading progress of %s failed", self.key)
            await asyncio.sleep(self.interval)

    async def _report_if_changed(self, done: int, failed: int) -> None:
        # An item redelivered after it counted itself counts again: the sum stays in total.
        done = min(done, self.total)
        counts = (done, min(failed, self.total - done))
        if counts != self.last:
            self.last = counts
            await self.report(*counts)

    async def settled(self, timeout: float = SETTLE_TIMEOUT_S) -> tuple[int, int]:
        """The counters once every item is counted, else (after ``timeout``) as they are.

        The waiter ends when every item's result is stored; an item counts itself just
        before its result is stored, but the count may still be on its way to Redis (a
        batch lingers a few ms). Waiting here, where the step ends, keeps the items' own
        path free of any wait.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            done, failed = await self.transport.read_counts(self.key)
            if done + failed >= self.total or loop.time() >= deadline:
                return done, failed
            await asyncio.sleep(SETTLE_POLL_S)

    async def finish(self, done: int, failed: int) -> None:
        """Stop polling and make sure the last report is the final counts (once)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.last != (done, failed):
            self.last = (done, failed)
            await self.report(done, failed)
