"""A user's type checker sees flowtrace's annotations (PEP 561: the ``py.typed`` marker).

Without the marker, ``mypy --strict`` on a user's code stops at ``import flowtrace``
("missing library stubs or py.typed marker") and every flowtrace name is ``Any``.
The user's file lives outside the repository, so mypy finds flowtrace as an installed
package, as it does in a user's project.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.typecheck import strict_mypy

USER_CODE = '''\
import flowtrace
from flowtrace import EventFilter, HookManager
from flowtrace.app import create_app
from flowtrace.events import PipelineErrorEvent, parse_event
from flowtrace.transport import InMemoryTransport
from taskiq import InMemoryBroker

broker = InMemoryBroker()
middleware = flowtrace.instrument(broker)
reveal_type(middleware)
reveal_type(create_app(InMemoryTransport()))
reveal_type(parse_event("{}"))


class Alerts:
    async def on_pipeline_error(self, event: PipelineErrorEvent) -> None:
        print(event.pipeline_name, event.error)


hooks = HookManager()
hooks.add_hook(Alerts(), EventFilter(event_types=["PipelineErrorEvent"]))


def kind(event: flowtrace.events.BaseEvent) -> str:
    return event.type


reveal_type(flowtrace.websocket.router)
'''


@pytest.mark.timeout(180)
def test_strict_mypy_on_a_users_code_sees_flowtraces_types(tmp_path: Path) -> None:
    returncode, report = strict_mypy(tmp_path, "user_app", USER_CODE)
    assert "py.typed marker" not in report, report  # checked first: it names the cause
    assert returncode == 0, report
    assert 'Revealed type is "flowtrace.middleware.FlowtraceMiddleware"' in report
    assert 'Revealed type is "fastapi.applications.FastAPI"' in report
    assert "flowtrace.events.PipelineErrorEvent" in report  # parse_event's union
    assert 'Revealed type is "fastapi.routing.APIRouter"' in report


def test_a_plain_import_reaches_the_public_submodules() -> None:
    """The README's ``flowtrace.websocket.router`` and ``flowtrace.cli.run_app`` after
    ``import flowtrace`` alone, in a fresh interpreter."""
    code = ("import flowtrace; print(type(flowtrace.websocket.router).__name__, "
            "flowtrace.app.create_app.__name__, flowtrace.cli.run_app.__name__)")
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert ran.stdout.split() == ["APIRouter", "create_app", "run_app"], ran.stderr
