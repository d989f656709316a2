"""A sync hook stuck in a call never keeps its process alive (SPEC §2: a slow hook never
blocks): once the event loop has ended, the process exits, whatever the hook is doing.
Real processes and threads; the hook's call never returns."""

from __future__ import annotations

import subprocess
import sys

import pytest

STUCK_HOOK = """\
import asyncio, sys, threading
from flowtrace.events import PipelineStartEvent
from flowtrace.hooks import HookManager

async def main(close: bool) -> None:
    loop = asyncio.get_running_loop()
    called = loop.create_future()

    class Stuck:
        def on_event(self, event):
            loop.call_soon_threadsafe(called.set_result, None)
            threading.Event().wait()  # e.g. an HTTP call with no timeout: never returns

    hooks = HookManager()
    hooks.add_hook(Stuck())
    hooks.emit_nowait(PipelineStartEvent(pipeline_id="run"))
    await asyncio.wait_for(called, 30)
    if close:  # what the middleware does on broker.shutdown()
        await hooks.close(timeout=0.1)

asyncio.run(main(sys.argv[1] == "close"))
print("loop ended", flush=True)
"""


@pytest.mark.parametrize("how", ["close", "no-close"])
def test_a_process_exits_after_its_loop_ends_while_a_sync_hook_is_stuck(how: str) -> None:
    process = subprocess.Popen([sys.executable, "-c", STUCK_HOOK, how],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = process.communicate(timeout=60)  # generous: it exits right after the loop
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("the process did not exit: the stuck hook's thread kept it alive")
    assert (process.returncode, out) == (0, "loop ended\n"), err
